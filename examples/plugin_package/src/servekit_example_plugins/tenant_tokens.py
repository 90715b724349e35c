"""A metrics hook that counts prompt and generated tokens per tenant.

Each finished request adds its tokens to its tenant's totals; with ``log_every`` > 0 the hook
logs the tenant's running totals (logger ``servekit_example_plugins``) every ``log_every``
finished requests of that tenant.

    servekit serve --hook tenant_tokens
    servekit serve --hook 'tenant_tokens:{"log_every": 1}'
"""

from __future__ import annotations

import logging

from attrs import define

from servekit.metrics import Hook, RequestFinished

logger = logging.getLogger("servekit_example_plugins")


@define(slots=True)
class TenantTotals:
    """One tenant's totals."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0


class TenantTokensHook(Hook):
    """Tokens per tenant (``None``: requests without a tenant), in :attr:`totals`."""

    api_version = 1  # the Hook interface version this implements

    def __init__(self, log_every: int = 0) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
            raise ValueError(f"log_every must be an integer >= 0, got {log_every!r}")
        self.log_every = log_every
        self.totals: dict[str | None, TenantTotals] = {}

    def on_request_finished(self, event: RequestFinished) -> None:
        totals = self.totals.get(event.tenant)
        if totals is None:
            totals = self.totals[event.tenant] = TenantTotals()
        totals.requests += 1
        totals.prompt_tokens += event.prompt_tokens
        totals.output_tokens += event.output_tokens
        if self.log_every and totals.requests % self.log_every == 0:
            logger.info("tenant_tokens tenant=%s requests=%d prompt_tokens=%d output_tokens=%d",
                        event.tenant, totals.requests, totals.prompt_tokens,
                        totals.output_tokens)
