"""Type stub of the optional C core ``servekit.sched._csched`` (see ``_csched.c``)."""

from collections.abc import Sequence

def advance_decodes(
    token_lists: list[list[int]], sampled: Sequence[int], computed: list[int], /
) -> list[int]: ...
