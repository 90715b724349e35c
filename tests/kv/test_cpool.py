"""The optional C core (servekit.kv._cpool): selection, bounds checks, and a differential test
against the pure-Python loops it mirrors."""

from __future__ import annotations

import functools
import os
from array import array
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from servekit.kv import (
    BlockPool,
    KVCacheManager,
    KVEvent,
    KVSequence,
)
from servekit.kv import blocks as blocks_mod
from servekit.kv.blocks import NO_HASH, ROOT_LINK, SALTED_ROOT_LINK, speedups_available
from servekit.kv.hashing import HASH_MASK, extend_block_hashes, get_hash_fn, pack_tokens

needs_c = pytest.mark.skipif(
    not speedups_available(), reason="servekit.kv._cpool (the optional C core) is not built"
)

# -- selection -----------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only where CI=true")
def test_ci_builds_and_uses_the_c_core() -> None:
    """CI must never silently measure or test the fallback."""
    import servekit.kv._cpool  # noqa: F401

    assert speedups_available()
    assert BlockPool(4, 4).speedups
    assert KVCacheManager(4, 4).pool.speedups


@needs_c
def test_default_uses_the_c_core_unless_the_environment_says_no(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SERVEKIT_NO_SPEEDUPS", raising=False)
    assert BlockPool(4, 4).speedups and KVCacheManager(4, 4).pool.speedups
    monkeypatch.setenv("SERVEKIT_NO_SPEEDUPS", "0")
    assert BlockPool(4, 4).speedups
    monkeypatch.setenv("SERVEKIT_NO_SPEEDUPS", "1")
    assert not BlockPool(4, 4).speedups and not KVCacheManager(4, 4).pool.speedups
    assert BlockPool(4, 4, speedups=True).speedups  # an explicit True wins
    assert KVCacheManager(4, 4, speedups=True).pool.speedups
    monkeypatch.delenv("SERVEKIT_NO_SPEEDUPS")
    assert not BlockPool(4, 4, speedups=False).speedups
    assert not KVCacheManager(4, 4, speedups=False).pool.speedups


def test_without_the_c_core_the_default_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocks_mod, "_cpool", None)
    monkeypatch.delenv("SERVEKIT_NO_SPEEDUPS", raising=False)
    assert not speedups_available()
    assert not BlockPool(4, 4).speedups
    with pytest.raises(ImportError, match=r"_cpool.*not built.*pip install -e"):
        BlockPool(4, 4, speedups=True)
    with pytest.raises(ImportError, match=r"setup\.sh"):
        KVCacheManager(4, 4, speedups=True)


# -- bounds checks ---------------------------------------------------------------------------


def pool_state(pool: BlockPool) -> tuple[object, ...]:
    return (
        list(pool.next), list(pool.prev), list(pool.ref), list(pool.hashes), list(pool.serial),
        list(pool.parent), list(pool.keys), list(pool.values), pool.tokens.tolist(),
        pool.num_free, pool.num_cached, pool._next_serial, dict(pool._salts),
    )


@needs_c
def test_out_of_range_block_ids_raise_and_change_nothing() -> None:
    pool = BlockPool(4, 2, speedups=True)
    held = pool.allocate(2)
    before = pool_state(pool)
    for bad in (4, -1, 1 << 40):
        with pytest.raises((IndexError, OverflowError)):
            pool.free([held[0], bad])
        with pytest.raises((IndexError, OverflowError)):
            pool.touch([held[0], bad])
        assert pool_state(pool) == before
    with pytest.raises(TypeError):
        pool.free(["0"])  # type: ignore[list-item]
    with pytest.raises(IndexError):
        pool.allocate(5)  # more than the pool
    assert pool_state(pool) == before
    with pytest.raises(IndexError, match="free list ran out"):
        pool.allocate(3)  # more than num_free: stops at the sentinel instead of running on


@needs_c
def test_commit_checks_its_inputs_before_writing() -> None:
    from servekit.kv import _cpool

    mgr = KVCacheManager(4, 2, speedups=True)
    pool = mgr.pool
    seq = KVSequence("a", [1, 2, 3, 4, 5])
    assert mgr.allocate(seq, 5)
    seq.block_ids[1] = 99  # a corrupt block table: commit must not write block 99
    before = pool_state(pool)
    with pytest.raises(IndexError, match="99"):
        mgr.commit(seq, 4)
    assert pool_state(pool) == before
    def no_hash(data: bytes, parent: int) -> int:
        raise AssertionError("the hashes are known")

    # token_ids, block_hashes, block_ids, start, n_full, link, next_serial, salt, salts, fn,
    # raw, stored
    args: list[Any] = [pool.keys, pool.values, pool.parent, pool.serial, pool.hashes,
                       pool.token_bytes, [1, 2, 3, 4], [5, 6], [0, 1], 0, 2, ROOT_LINK, 0, None,
                       {}, no_hash, False, None]
    with pytest.raises(ValueError, match="commit range"):
        _cpool.commit(*args[:9], 0, 3, *args[11:])  # beyond token_ids
    with pytest.raises(ValueError, match="commit range"):
        _cpool.commit(*args[:8], [0], *args[9:])  # beyond block_ids
    with pytest.raises(ValueError, match="non-negative"):
        _cpool.commit(*args[:7], [-5, 6], *args[8:])
    with pytest.raises(TypeError, match=r"hashes"):
        _cpool.commit(*args[:4], array("d", [0.0] * 4), *args[5:])
    with pytest.raises(TypeError, match="18 arguments"):
        _cpool.commit(*args[:17])
    with pytest.raises(ValueError, match="lookup range"):  # max_blocks beyond token_ids
        _cpool.find_hit(*args[:4], pool.token_bytes, [1, 2, 3], [5, 6], 0, 2, ROOT_LINK, None,
                        {}, [], [])
    assert pool_state(pool) == before


@needs_c
def test_corrupt_pool_arrays_raise_instead_of_crashing() -> None:
    mgr = KVCacheManager(4, 2, speedups=True)
    pool = mgr.pool
    a = KVSequence("a", [1, 2, 3, 4, 5])
    assert mgr.allocate(a, 5)
    mgr.commit(a, 5)
    mgr.free(a)
    slot = next(i for i, k in enumerate(pool.keys) if k != NO_HASH)
    pool.values[slot] = 1000  # an index entry pointing outside the pool
    with pytest.raises(IndexError):
        mgr.get_num_cached_tokens(KVSequence("b", [1, 2, 3, 4, 5]))
    b = KVSequence("c", [1, 2, 3, 4, 5])
    assert mgr.allocate(b, 5)  # reuses the uncached block, then evicts cached ones
    pool2 = BlockPool(4, 2, speedups=True)
    pool2.next[4] = 77  # a corrupt free-list head
    with pytest.raises(IndexError):
        pool2.allocate(1)
    with pytest.raises(IndexError):
        pool2.free([])
    pool3 = BlockPool(4, 2, speedups=True)
    pool3.keys = array("q", [NO_HASH] * 6)  # not a power of two
    with pytest.raises(ValueError, match="power-of-two"):
        pool3.allocate(1)
    pool4 = BlockPool(4, 2, speedups=True)
    pool4.ref = array("i", [0] * 9)  # lengths that disagree
    with pytest.raises(ValueError, match="lengths"):
        pool4.touch([0])


# -- differential: the C core against the pure-Python loops -----------------------------------


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except Exception as exc:  # compared between the implementations
        return (type(exc).__name__, str(exc))


def assert_same_pools(c: BlockPool, p: BlockPool) -> None:
    assert pool_state(c) == pool_state(p)
    assert c.free_block_ids() == p.free_block_ids()
    assert c.cached_blocks() == p.cached_blocks()


def colliding_hash(data: bytes | memoryview, parent: int) -> int:
    """8 hash values: forces collisions, chained duplicates and long probe runs."""
    return (len(bytes(data)) + sum(bytes(data)) + parent) % 8


def constant_hash(data: bytes | memoryview, parent: int) -> int:
    """Every block collides, whatever its salt: the salt comparison on a salted root decides."""
    return 5


def salt_blind_hash(data: bytes | memoryview, parent: int) -> int:
    """Only a block's last token: equal first blocks under different salts share a hash."""
    return (int.from_bytes(bytes(data)[-4:], "little") * 31 + parent) % 1_000_003


HASH_FNS = {
    "xxhash": None,
    "sha256": get_hash_fn("sha256"),
    "weak": colliding_hash,
    "constant": constant_hash,
    "salt-blind": salt_blind_hash,
}


@needs_c
@settings(max_examples=300, deadline=None)
@given(data=st.data(), num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4]))
def test_pool_ops_match_the_python_loops(
    data: st.DataObject, num_blocks: int, block_size: int
) -> None:
    """allocate / free (double frees included) / touch / register / lookup / reset, with
    clustered small hashes so deletions shift runs across the table's wrap."""
    ev_c: list[KVEvent] = []
    ev_p: list[KVEvent] = []
    c = BlockPool(num_blocks, block_size, on_event=ev_c.append, speedups=True)
    p = BlockPool(num_blocks, block_size, on_event=ev_p.append, speedups=False)
    ids = st.integers(0, num_blocks - 1)
    for _ in range(data.draw(st.integers(1, 40), label="ops")):
        op = data.draw(st.sampled_from(["allocate", "free", "touch", "register", "register",
                                        "lookup", "reset"]))
        args: tuple[Any, ...] = ()
        if op == "allocate":
            args = (data.draw(st.integers(0, p.num_free), label="n"),)
        elif op in ("free", "touch"):
            blocks = data.draw(st.lists(ids, max_size=6), label="blocks")
            args = (tuple(blocks) if data.draw(st.booleans(), label="tuple") else blocks,)
        elif op == "register":
            free_ids = [b for b in range(num_blocks) if p.hashes[b] == NO_HASH]
            if not free_ids:
                continue
            new_hashes = [h for h in range(4 * num_blocks + 4) if p.lookup(h) == -1]
            serials = [s for s in p.serial if s >= 0]
            link = data.draw(st.sampled_from([ROOT_LINK, SALTED_ROOT_LINK, *serials]), label="link")
            args = (
                data.draw(st.sampled_from(free_ids), label="block"),
                data.draw(st.sampled_from(new_hashes), label="hash"),
                link,
                data.draw(st.sampled_from([None, "a", "b"])) if link == SALTED_ROOT_LINK else None,
                data.draw(st.lists(st.integers(0, 3), min_size=block_size, max_size=block_size)),
            )
        elif op == "lookup":
            args = (data.draw(st.integers(0, 4 * num_blocks + 4), label="hash"),)
        assert apply_op(c, op, args) == apply_op(p, op, args), op
        assert_same_pools(c, p)
        assert ev_c == ev_p


def apply_op(pool: BlockPool, op: str, args: tuple[Any, ...]) -> tuple[str, Any]:
    if op == "register":
        block, block_hash, link, salt, row = args

        def register() -> int:
            serial = pool.register(block, block_hash, link, salt)
            pool.set_tokens([block], np.array([row], dtype=np.int32))
            return serial

        return outcome(register)
    return outcome(lambda: getattr(pool, op)(*args))


def admit(mgr: KVCacheManager, seq: KVSequence, chunk: int) -> tuple[object, ...]:
    hit = mgr.get_num_cached_tokens(seq)
    end = min(len(seq.token_ids), hit + chunk)
    ok = outcome(lambda: mgr.allocate(seq, end, hit))
    if ok == ("ok", True):
        mgr.commit(seq, end)
    return hit, ok, end


@needs_c
@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    num_blocks=st.integers(2, 16),
    block_size=st.sampled_from([1, 2, 4]),
    hash_fn=st.sampled_from(sorted(HASH_FNS)),
)
def test_manager_ops_match_the_python_loops(
    data: st.DataObject, num_blocks: int, block_size: int, hash_fn: str
) -> None:
    """Admissions with hits (salted and not), growth, commits that register, chain onto an
    identical block or stop at a collision, forks, frees, re-admissions and resets."""
    events: tuple[list[KVEvent], list[KVEvent]] = ([], [])
    mgrs = tuple(
        KVCacheManager(num_blocks, block_size, on_event=ev.append, speedups=flag)
        for ev, flag in zip(events, (True, False), strict=True)
    )
    fn = HASH_FNS[hash_fn]
    if fn is not None:
        for m in mgrs:
            m._hash_fn = fn
    live: dict[str, tuple[KVSequence, ...]] = {}
    done: dict[str, int] = {}
    freed: dict[str, tuple[KVSequence, ...]] = {}
    tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=12)
    for n_op in range(data.draw(st.integers(1, 30), label="ops")):
        op = data.draw(st.sampled_from(["new", "new", "step", "step", "free", "fork",
                                        "readmit", "reset"]))
        results: list[object] = []
        if op == "new":
            tokens = data.draw(tokens_st, label="tokens")
            salt = data.draw(st.sampled_from([None, None, "a", "b"]), label="salt")
            chunk = data.draw(st.integers(1, 12), label="chunk")
            pair = tuple(KVSequence(f"s{n_op}", list(tokens), salt) for _ in mgrs)
            results = [admit(m, s, chunk) for m, s in zip(mgrs, pair, strict=True)]
            _, ok, end = results[0]  # type: ignore[misc]
            if ok == ("ok", True):
                live[pair[0].seq_id], done[pair[0].seq_id] = pair, end
            else:
                freed[pair[0].seq_id] = pair
        elif op == "step" and live:
            sid = data.draw(st.sampled_from(sorted(live)), label="seq")
            chunk = data.draw(st.integers(1, 6), label="chunk")
            new = data.draw(st.lists(st.integers(0, 2), max_size=3), label="new")
            end = 0
            for m, s in zip(mgrs, live[sid], strict=True):
                if done[sid] == len(s.token_ids):
                    s.token_ids.extend(new)
                end = min(len(s.token_ids), done[sid] + chunk)
                ok = outcome(lambda m=m, s=s, end=end: m.allocate(s, end))
                if ok == ("ok", True):
                    m.commit(s, end)
                results.append(ok)
            if results[0] == ("ok", True):
                done[sid] = end
        elif op == "free" and live:
            sid = data.draw(st.sampled_from(sorted(live)), label="seq")
            for m, s in zip(mgrs, live[sid], strict=True):
                m.free(s)
            freed[sid] = live.pop(sid)
        elif op == "fork" and live:
            sid = data.draw(st.sampled_from(sorted(live)), label="seq")
            children = tuple(KVSequence(f"s{n_op}") for _ in mgrs)
            results = [outcome(lambda m=m, s=s, ch=ch: m.fork(s, ch))
                       for m, s, ch in zip(mgrs, live[sid], children, strict=True)]
            if results[0][0] == "ok":  # type: ignore[index]
                live[children[0].seq_id] = children
                done[children[0].seq_id] = min(done[sid], len(children[0].block_ids) * block_size)
        elif op == "readmit" and freed:
            sid = data.draw(st.sampled_from(sorted(freed)), label="seq")
            chunk = data.draw(st.integers(1, 12), label="chunk")
            pair = freed.pop(sid)
            results = [admit(m, s, chunk) for m, s in zip(mgrs, pair, strict=True)]
            _, ok, end = results[0]  # type: ignore[misc]
            if ok == ("ok", True):
                live[sid], done[sid] = pair, end
            else:
                freed[sid] = pair
        elif op == "reset":
            results = [m.reset_prefix_cache() for m in mgrs]
        assert results[:1] == results[1:], op
        for pair in [*live.values(), *freed.values()]:
            a, b = pair
            assert (a.block_ids, a.block_hashes, a._kv_committed, a._kv_link) == (
                b.block_ids, b.block_hashes, b._kv_committed, b._kv_link)
        assert_same_pools(mgrs[0].pool, mgrs[1].pool)
        assert events[0] == events[1]


# -- differential: packing and hashing from the token list ------------------------------------


class BadIndex:
    """An __index__ that raises: the error must come through as it is, on both paths."""

    def __index__(self) -> int:
        raise ValueError("no index")

    def __repr__(self) -> str:
        return "BadIndex()"


GOOD_TOKENS = st.one_of(
    st.integers(0, 3),
    st.sampled_from([2**31 - 1, 2**31 - 2, 0, -1, -(2**31), True, np.int64(2**31 - 1)]),
)
BAD_TOKENS = st.sampled_from(
    [-(2**31) - 1, 2**31, 2**63, 2**70, 1.5, "7", None, np.int64(2**31), BadIndex()]
)


def token_lists(max_size: int, bad: bool = True) -> st.SearchStrategy[list[Any]]:
    """Valid token ids (extremes of int32, and what struct.pack also takes: negative int32s,
    bools, numpy ints), now and then with one bad id."""
    good = st.lists(GOOD_TOKENS, max_size=max_size)
    if not bad:
        return good
    return st.one_of(
        good,
        good,
        good,
        st.tuples(good, BAD_TOKENS, st.integers(0, max_size)).map(
            lambda t: [*t[0][: t[2]], t[1], *t[0][t[2] :]]
        ),
    )


def flaky_fn() -> Callable[[bytes, int], int]:
    """A weak hash that raises on every 7th call: both paths must call it alike."""
    calls = [0]

    def fn(data: bytes, parent: int) -> int:
        calls[0] += 1
        if calls[0] % 7 == 0:
            raise RuntimeError("flaky hash")
        return colliding_hash(data, parent)

    return fn


def extend_hashes_c(
    hashes: list[int], tokens: list[Any], bs: int, n: int, salt: str | None, fn: Any
) -> None:
    from servekit.kv import _cpool
    from servekit.kv.hashing import _xxhash_fn
    from servekit.kv.manager import _XXH3

    raw = fn is _xxhash_fn
    _cpool.extend_hashes(tokens, hashes, n, bs, salt, _XXH3 if raw else fn, raw)


@needs_c
@settings(max_examples=200, deadline=None)
@given(
    tokens=token_lists(24),
    block_size=st.sampled_from([1, 2, 4]),
    salt=st.sampled_from([None, "", "a", "\u00fc\u4e2d"]),
    split=st.integers(0, 8),
    extra=st.integers(0, 3),
    algorithm=st.sampled_from(["xxhash", "sha256", "weak", "flaky"]),
)
def test_extend_hashes_matches_extend_block_hashes(
    tokens: list[Any], block_size: int, salt: str | None, split: int, extra: int, algorithm: str
) -> None:
    """In two pieces, up to `extra` blocks beyond the tokens (a slice clamps): same hashes,
    same exception (struct.error for a bad token, the hash function's own), same partial
    list after an error."""
    results = []
    for extend in (extend_block_hashes, extend_hashes_c):
        if algorithm == "weak":
            fn: Any = colliding_hash
        elif algorithm == "flaky":
            fn = flaky_fn()
        else:
            fn = get_hash_fn(algorithm)
        hashes: list[int] = []
        n = len(tokens) // block_size + extra
        steps = [
            outcome(lambda m=m, ext=extend, fn=fn, h=hashes: ext(h, tokens, block_size, m, salt, fn))
            for m in (min(split, n), n)
        ]
        results.append((steps, list(hashes)))
    assert results[0] == results[1]
    if algorithm in ("xxhash", "sha256"):
        assert all(0 <= h <= HASH_MASK for h in results[0][1])


@needs_c
@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    block_size=st.sampled_from([1, 2, 4]),
    algorithm=st.sampled_from(["xxhash", "sha256", "weak", "flaky"]),
)
def test_commit_and_lookup_from_token_lists_match_the_python_path(
    data: st.DataObject, block_size: int, algorithm: str
) -> None:
    """Lookups, commits in several pieces (partial blocks included) and generated tokens, with
    token ids at the int32 extremes and bad ones (same exception, nothing registered), salts,
    hits whose stored tokens differ (a collision, or tokens poked after hashing), re-admissions
    and hash functions that raise: sequences, pools and events stay identical."""
    events: tuple[list[KVEvent], list[KVEvent]] = ([], [])
    algo = "sha256" if algorithm == "sha256" else "xxhash"
    mgrs = tuple(
        KVCacheManager(24, block_size, hash_algorithm=algo, on_event=ev.append, speedups=flag)
        for ev, flag in zip(events, (True, False), strict=True)
    )
    for m in mgrs:
        if algorithm == "weak":
            m._hash_fn = colliding_hash
        elif algorithm == "flaky":
            m._hash_fn = flaky_fn()
    seqs: tuple[list[KVSequence], list[KVSequence]] = ([], [])
    prefix: list[Any] = []
    for _ in range(data.draw(st.integers(1, 16), label="ops")):
        op = data.draw(st.sampled_from(["admit", "admit", "commit", "append", "poke", "free",
                                        "readmit"]))
        if op != "admit" and not seqs[0]:
            continue
        k = data.draw(st.integers(0, len(seqs[0]) - 1), label="seq") if seqs[0] else 0
        if op == "admit":
            shared = data.draw(st.sampled_from([len(prefix), len(prefix) // 2, 0]),
                               label="shared")
            tokens = [*prefix[:shared], *data.draw(token_lists(12), label="tokens")]
            if not tokens:
                continue
            if outcome(lambda t=tokens: pack_tokens(t))[0] == "ok":  # share only good prefixes
                prefix = tokens
            salt = data.draw(st.sampled_from([None, None, "a", "\u00fc"]), label="salt")
            for ss in seqs:
                ss.append(KVSequence(f"s{len(ss)}", list(tokens), salt))
        args: dict[str, Any] = {}
        if op in ("admit", "readmit", "commit", "append"):  # commit up to that many tokens
            args["n"] = data.draw(st.integers(0, 40), label="n")
        if op == "append":
            args["new"] = data.draw(token_lists(9), label="new")
        elif op == "poke":
            args["pos"] = data.draw(st.integers(0, 40), label="pos")
            args["value"] = data.draw(st.one_of(GOOD_TOKENS, BAD_TOKENS), label="value")
        serial_before = mgrs[0].pool._next_serial
        step = functools.partial(apply_token_op, op=op, args=args)
        results = [
            outcome(functools.partial(step, m, ss[-1] if op == "admit" else ss[k]))
            for m, ss in zip(mgrs, seqs, strict=True)
        ]
        assert results[0] == results[1], op
        if results[0][0] == "error":  # struct.error: a bad token id, nothing registered
            assert mgrs[0].pool._next_serial == serial_before
        for a, b in zip(*seqs, strict=True):
            assert (a.token_ids, a.block_ids, a.block_hashes, a._kv_committed, a._kv_link) == (
                b.token_ids, b.block_ids, b.block_hashes, b._kv_committed, b._kv_link)
        assert_same_pools(mgrs[0].pool, mgrs[1].pool)
        assert events[0] == events[1]
        memos = [m._memo and m._memo[:5] for m in mgrs]  # all but the hash function
        assert memos[0] == memos[1]


def apply_token_op(m: KVCacheManager, seq: KVSequence, op: str, args: dict[str, Any]) -> object:
    n = args.get("n", 0)
    if op in ("admit", "readmit"):
        hit = m.get_num_cached_tokens(seq)
        ok = m.allocate(seq, len(seq.token_ids), hit)
        if ok:
            m.commit(seq, min(hit + n, len(seq.token_ids)))
        return hit, ok
    if op == "commit":
        m.commit(seq, min(n, len(seq.token_ids)))
    elif op == "append":
        seq.token_ids.extend(args["new"])
        ok = m.allocate(seq, len(seq.token_ids))
        if ok:
            m.commit(seq, min(seq._kv_committed * m.block_size + n, len(seq.token_ids)))
        return ok
    elif op == "poke":
        seq.token_ids[args["pos"] % len(seq.token_ids)] = args["value"]
    elif op == "free":
        m.free(seq)
    return None


@needs_c
@pytest.mark.parametrize("salt", [None, "s"])
def test_long_sequences_match_the_python_path(salt: str | None) -> None:
    """More blocks and tokens than the C core's stack buffers hold (its heap paths)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 2**31, 2101).tolist()
    events: tuple[list[KVEvent], list[KVEvent]] = ([], [])
    mgrs = [KVCacheManager(1200, 4, on_event=ev.append, speedups=flag)
            for ev, flag in zip(events, (True, False), strict=True)]
    seqs = []
    for m in mgrs:
        a, b = KVSequence("a", list(tokens), salt), KVSequence("b", [*tokens[:2000], 7, 7], salt)
        assert m.get_num_cached_tokens(a) == 0 and m.allocate(a, len(tokens))
        m.commit(a, 1000)
        m.commit(a, len(tokens))  # 275 blocks, hashes known up to 525
        m.free(a)
        assert m.get_num_cached_tokens(b) == 2000  # 500 blocks found and verified
        assert m.allocate(b, 2002, 2000)
        m.commit(b, 2002)
        seqs.append((a, b))
    assert [(s.block_hashes, s.block_ids) for s in seqs[0]] == [
        (s.block_hashes, s.block_ids) for s in seqs[1]]
    assert_same_pools(mgrs[0].pool, mgrs[1].pool)
    assert events[0] == events[1]
