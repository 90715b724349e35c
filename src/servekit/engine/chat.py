"""Chat prompts: messages through the tokenizer's own chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from servekit.errors import ServekitError

__all__ = ["ChatTemplateError", "render_chat"]


class ChatTemplateError(ServekitError, ValueError):
    """The tokenizer has no chat template, or the messages do not fit it."""


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template (or ``chat_template``)."""
    if not messages:
        raise ChatTemplateError("messages: must not be empty")
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ChatTemplateError(f"messages[{i}]: needs 'role' and 'content'")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError("chat_template: the tokenizer has none; pass chat_template=")
    try:
        text = tokenizer.apply_chat_template(
            list(messages), chat_template=template, add_generation_prompt=add_generation_prompt,
            tokenize=False, **template_kwargs,
        )
    except Exception as exc:  # jinja errors are not a stable type
        raise ChatTemplateError(f"messages: the chat template failed: {exc}") from exc
    # the template already holds any BOS it wants: do not add special tokens twice
    return list(tokenizer.encode(str(text), add_special_tokens=False))
