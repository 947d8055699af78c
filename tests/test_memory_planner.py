"""The chunk planner (pure numpy) against the per-chunk, per-block Python loops it replaced, on random
arena ownerships, block sizes that tile chunks or straddle them, and random block states."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtriton.memory.arena import FREE
from kvtriton.memory.chunk_planner import (ChunkGeometry, ReleasePlan, empty_chunks, plan_growth, plan_moves,
                                           ranges)

ME, OTHER = 3, 5


@st.composite
def pool_states(draw):
    """``(geom, owner, usable, used, idle, pinned)``: an arena's ownership and one pool's block states."""
    C = 256 * draw(st.integers(1, 4))
    B = draw(st.sampled_from([C // 4, C // 2, C, 2 * C, 3 * C // 4 if C % 4 == 0 else C, 160, 96, 448]))
    n_chunks = draw(st.integers(1, 20))
    n = n_chunks * C // B
    if n < 1:
        n_chunks, n = -(-B // C), 1
    geom = ChunkGeometry(n, B, C)
    owner = np.array(draw(st.lists(st.sampled_from([FREE, ME, ME, OTHER]), min_size=n_chunks, max_size=n_chunks)),
                     dtype=np.int64)
    usable = np.array([(owner[geom.first_chunk[b]:geom.last_chunk[b] + 1] == ME).all() for b in range(n)])
    state = np.array(draw(st.lists(st.sampled_from("fffuuip"), min_size=n, max_size=n)))
    state[~usable] = "f"
    used, idle, pinned = np.isin(state, ["u", "p"]), state == "i", state == "p"
    return geom, owner, usable, used, idle, pinned


def loop_release(geom, owner, usable, used, idle, pinned, k, evict):
    """The original ``CachePool._shrink`` probe: score every held chunk by the blocks it would force to
    move, pick the ``k`` emptiest; ValueError or ``(chosen, used_lost, idle_lost, free_left, idle_left,
    feasible)``."""
    held = np.flatnonzero(owner == ME).tolist()
    if k > len(held):
        raise ValueError("more than held")
    scores = []
    for c in held:
        lo, hi = geom.block_range(c)
        u = i = 0
        pin = False
        for b in range(lo, hi + 1):
            if not usable[b]:
                continue
            if pinned[b]:
                pin = True
                break
            u += bool(used[b])
            i += bool(idle[b])
        if not pin:
            scores.append((u, i, -c, c))
    if len(scores) < k:
        raise ValueError("pinned")
    scores.sort()
    chosen = [s[3] for s in scores[:k]]
    lost = {b for c in chosen for b in range(geom.block_range(c)[0], geom.block_range(c)[1] + 1) if usable[b]}
    used_lost = sorted(b for b in lost if used[b])
    idle_lost = sorted(b for b in lost if idle[b])
    n_free = int((usable & ~used & ~idle).sum())
    free_left = n_free - sum(1 for b in lost if not used[b] and not idle[b])
    idle_left = int(idle.sum()) - len(idle_lost)
    ok = not (len(used_lost) > free_left + (idle_left if evict else 0)
              or (not evict and len(used_lost) + len(idle_lost) > free_left))
    return chosen, used_lost, idle_lost, free_left, idle_left, ok


def plan_of(geom, owner, usable, used, idle, pinned):
    return ReleasePlan(geom, np.flatnonzero(owner == ME), usable, used, idle, pinned,
                       int((usable & ~used & ~idle).sum()), int(idle.sum()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=pool_states(), evict=st.booleans())
def test_release_plan_matches_the_loops(s, evict):
    geom, owner, usable, used, idle, pinned = s
    plan = plan_of(*s)
    held = int((owner == ME).sum())
    for k in range(held + 2):
        try:
            chosen, used_lost, idle_lost, free_left, idle_left, ok = loop_release(*s, k, evict)
        except ValueError:
            assert k > plan.candidates
            continue
        assert k <= plan.candidates
        assert plan.chosen(k).tolist() == chosen
        lost = plan.lost(k)
        assert np.flatnonzero(lost & used).tolist() == used_lost
        assert np.flatnonzero(lost & idle).tolist() == idle_lost
        assert plan.counts(k) == (len(used_lost), len(idle_lost), free_left, idle_left)
        assert bool(plan.feasible(k, evict)) == ok
    # compaction: the largest k <= k_max that a binary search over the probes finds
    for k_max in range(held + 1):
        lo, hi = 0, k_max
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                ok = loop_release(*s, mid, evict)[-1]
            except ValueError:
                ok = False
            lo, hi = (mid, hi) if ok else (lo, mid - 1)
        assert plan.max_feasible(k_max, evict) == lo


def loop_growth(geom, owner, me, usable, need, min_chunks, limit):
    """The original growth loops (claims applied to a copy of ``owner``)."""
    owner = owner.copy()
    usable = usable.copy()
    if geom.unit is not None:
        return None  # the aligned path is the same numpy code; checked through the pool's tests
    fc, lc = geom.first_chunk, geom.last_chunk
    not_ok = np.concatenate(([0], np.cumsum((owner != FREE) & (owner != me))))
    is_free = np.concatenate(([0], np.cumsum(owner == FREE)))
    feasible = ((not_ok[lc + 1] - not_ok[fc]) == 0) & ((is_free[lc + 1] - is_free[fc]) > 0)
    cost = is_free[lc + 1] - is_free[fc]
    order = sorted(np.flatnonzero(feasible).tolist(), key=lambda b: (cost[b], b))
    claimed, newly = [], []
    for b in order:
        if len(newly) >= need and len(claimed) >= min_chunks:
            break
        if limit is not None and len(claimed) >= limit:
            break
        new_chunks = [c for c in range(int(fc[b]), int(lc[b]) + 1) if owner[c] == FREE]
        if not new_chunks or (limit is not None and len(claimed) + len(new_chunks) > limit):
            continue
        owner[new_chunks] = me
        claimed.extend(new_chunks)
        lo, hi = geom.block_range(new_chunks[0])[0], geom.block_range(new_chunks[-1])[1]
        for bb in range(lo, hi + 1):
            if not usable[bb] and (owner[fc[bb]:lc[bb] + 1] == me).all():
                usable[bb] = True
                newly.append(bb)
    return claimed, newly


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=pool_states(), need=st.integers(0, 12), min_chunks=st.integers(0, 4),
       limit=st.one_of(st.none(), st.integers(0, 6)))
def test_growth_plan_matches_the_loops(s, need, min_chunks, limit):
    geom, owner, usable = s[:3]
    before = owner.copy(), usable.copy()
    got = plan_growth(geom, owner, ME, usable, need, min_chunks, limit)
    assert np.array_equal(owner, before[0]) and np.array_equal(usable, before[1])   # pure
    want = loop_growth(geom, owner, ME, usable, need, min_chunks, limit)
    if want is not None:
        assert got == want
    chunks, blocks = got
    assert len(set(chunks)) == len(chunks) and all(owner[c] == FREE for c in chunks)
    after = owner.copy()
    after[chunks] = ME
    for b in blocks:  # every newly usable block lies in chunks the pool holds after the claim
        assert not usable[b] and (after[geom.first_chunk[b]:geom.last_chunk[b] + 1] == ME).all()
    if limit is not None:
        assert len(chunks) <= max(limit, 0)


@settings(max_examples=200, deadline=None)
@given(s=pool_states())
def test_empty_chunks_and_blocks_of_match_the_loops(s):
    geom, owner, usable, used, idle, pinned = s
    held = np.flatnonzero(owner == ME)
    want = [c for c in held.tolist()
            if all(not usable[b] or not (used[b] or idle[b])
                   for b in range(geom.block_range(c)[0], geom.block_range(c)[1] + 1))]
    assert empty_chunks(geom, held, usable, used | idle) == want
    chunks = held[::2]
    want_blocks = sorted({b for c in chunks.tolist()
                          for b in range(geom.block_range(c)[0], geom.block_range(c)[1] + 1)})
    assert geom.blocks_of(chunks).tolist() == want_blocks


def test_ranges_and_moves():
    assert ranges(np.array([2, 5, 9]), np.array([4, 4, 10])).tolist() == [2, 3, 4, 9, 10]
    lost = np.zeros(10, dtype=bool)
    lost[[1, 7]] = True
    # The free list is a stack: its last entries that are not lost become the destinations, in order.
    assert plan_moves([3, 1, 8, 7, 9, 2], lost, [7, 1]) == ([9, 2], [3, 8])
    assert plan_moves([3, 1], lost, []) == ([], [3])


@pytest.mark.parametrize("B, C, unit", [(1024, 4096, (1, 4)), (8192, 4096, (2, 1)), (768, 4096, None)])
def test_geometry_units(B, C, unit):
    g = ChunkGeometry(40, B, C)
    assert g.unit == unit
    for b in range(40):
        assert g.first_chunk[b] == b * B // C and g.last_chunk[b] == ((b + 1) * B - 1) // C
