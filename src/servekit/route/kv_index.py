"""The KV-event index: which block hashes each replica holds, replayed from its KV events.

Each replica numbers its events (block stored / removed / all cleared) with a sequence number
that grows by one per event. The index applies them in order; a gap (events were dropped) or a
regression (the replica restarted) means its picture of that replica is stale, so that
replica's entry is cleared before the event is applied. After a reset the index knows less than
the replica holds (blocks stored before the gap are forgotten) but never claims a block the
replica has not reported since. It implements :class:`servekit.route.CacheIndex`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from servekit.route.errors import InvalidRouteParameterError


class KVEventIndex:
    """Block hashes per replica, with an inverted index for prefix matching.

    ``cached_blocks(hashes)`` walks the prompt's chained hashes from the first and counts, for
    each replica holding the first, how many leading ones it holds: O(matched blocks x replicas
    holding them). ``resets`` counts per replica how often a gap or regression cleared it.
    """

    def __init__(self) -> None:
        self._blocks: dict[str, set[int]] = {}
        self._holders: dict[int, set[str]] = {}
        self._seq: dict[str, int] = {}
        self.resets: dict[str, int] = {}

    # ---- membership -------------------------------------------------------------------------

    @property
    def replicas(self) -> tuple[str, ...]:
        """The replicas the index has seen."""
        return tuple(self._blocks)

    def last_seq(self, replica: str) -> int | None:
        """The sequence number of the last event applied for ``replica`` (None: none yet)."""
        return self._seq.get(replica)

    def blocks(self, replica: str) -> frozenset[int]:
        """The block hashes ``replica`` is known to hold."""
        return frozenset(self._blocks.get(replica, ()))

    def remove_replica(self, replica: str) -> None:
        """Forget ``replica`` entirely (it left the fleet)."""
        self._clear(replica)
        self._blocks.pop(replica, None)
        self._seq.pop(replica, None)

    def reset(self, replica: str) -> None:
        """Forget what ``replica`` holds and its sequence (the next event starts afresh)."""
        self._clear(replica)
        self._seq.pop(replica, None)
        self.resets[replica] = self.resets.get(replica, 0) + 1

    # ---- events -----------------------------------------------------------------------------

    def stored(self, replica: str, seq: int, block_hashes: Iterable[int]) -> None:
        """Event ``seq``: ``replica`` stored ``block_hashes``."""
        self._advance(replica, seq)
        mine = self._blocks.setdefault(replica, set())
        holders = self._holders
        for h in block_hashes:
            if h not in mine:
                mine.add(h)
                holders.setdefault(h, set()).add(replica)

    def removed(self, replica: str, seq: int, block_hashes: Iterable[int]) -> None:
        """Event ``seq``: ``replica`` evicted ``block_hashes``."""
        self._advance(replica, seq)
        mine = self._blocks.setdefault(replica, set())
        for h in block_hashes:
            if h in mine:
                mine.discard(h)
                self._unhold(h, replica)

    def cleared(self, replica: str, seq: int) -> None:
        """Event ``seq``: ``replica`` reset its prefix cache."""
        self._advance(replica, seq)
        self._clear(replica)

    # ---- queries ----------------------------------------------------------------------------

    def cached_blocks(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        """For each replica holding the first block, how many leading blocks it holds."""
        if not block_hashes:
            return {}
        live = set(self._holders.get(block_hashes[0], ()))
        counts: dict[str, int] = {}
        depth = 0
        for h in block_hashes:
            holders = self._holders.get(h)
            still = live & holders if holders else set()
            for gone in live - still:
                counts[gone] = depth
            live = still
            depth += 1
            if not live:
                break
        for r in live:
            counts[r] = depth
        return counts

    # ---- internals --------------------------------------------------------------------------

    def _advance(self, replica: str, seq: int) -> None:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise InvalidRouteParameterError("seq", f"must be an integer >= 0, got {seq!r}")
        last = self._seq.get(replica)
        if last is not None and seq != last + 1:
            self.reset(replica)
        self._seq[replica] = seq
        self._blocks.setdefault(replica, set())

    def _clear(self, replica: str) -> None:
        for h in self._blocks.get(replica, ()):
            self._unhold(h, replica)
        if replica in self._blocks:
            self._blocks[replica] = set()

    def _unhold(self, h: int, replica: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[h]
