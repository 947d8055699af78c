"""Arena sizing and ownership, and the prefix hashes."""

import pytest
import torch

from kvtriton.memory import Arena, block_hashes_from_tokens, expand_hash_ids, hash_block_tokens
from kvtriton.memory.arena import device_free_bytes


def test_arena_sizes_and_rejects_bad_budgets():
    a = Arena("cpu", budget_bytes=10_000, chunk_bytes=4096)
    assert a.num_chunks == 2 and a.num_bytes == 8192 and a.buffer.dtype == torch.uint8
    assert a.buffer.numel() == 8192 and a.free_chunks == 2
    free = device_free_bytes(torch.device("cpu"))
    with pytest.raises(ValueError, match=f"budget_bytes={free + 4096}.*maximum is"):
        Arena("cpu", budget_bytes=free + 4096)
    with pytest.raises(ValueError, match="budget_bytes"):
        Arena("cpu", budget_bytes=100, chunk_bytes=4096)
    with pytest.raises(ValueError, match="chunk_bytes"):
        Arena("cpu", budget_bytes=1 << 20, chunk_bytes=1000)
    with pytest.raises(ValueError, match="memory_fraction"):
        Arena("cpu", memory_fraction=1.5)
    with pytest.raises(ValueError, match="not both"):
        Arena("cpu", budget_bytes=1 << 20, memory_fraction=0.1)
    with pytest.raises(ValueError, match="device"):
        Arena("meta", budget_bytes=1 << 20)
    small = Arena("cpu", memory_fraction=1e-4, chunk_bytes=4096)
    assert 0 < small.num_bytes <= free * 1e-4


def test_arena_ownership():
    a = Arena("cpu", budget_bytes=4 * 4096, chunk_bytes=4096)
    a.claim([0, 2], 7)
    assert a.free_chunks == 2 and a.chunks_of(7).tolist() == [0, 2]
    with pytest.raises(RuntimeError, match="not free"):
        a.claim([2, 3], 8)
    assert a.free_chunks == 2
    with pytest.raises(RuntimeError, match="not owned"):
        a.give_back([1], 7)
    a.give_back([2], 7)
    assert a.release_all(7) == 1 and a.free_chunks == 4


def test_chained_block_hashes():
    toks = list(range(10))
    h = block_hashes_from_tokens(toks, 4)
    assert len(h) == 2                                   # the partial third block gets none
    assert h[0] == hash_block_tokens(None, toks[:4]) and h[1] == hash_block_tokens(h[0], toks[4:8])
    assert block_hashes_from_tokens(toks[:8], 4) == h    # deterministic, prefix-stable
    assert block_hashes_from_tokens([9] + toks[1:], 4)[1] != h[1]  # a change propagates down the chain
    with pytest.raises(ValueError, match="block_size"):
        block_hashes_from_tokens(toks, 0)


def test_expand_coarse_hash_ids():
    # 512-token Mooncake ids to 16-token blocks: 32 per id; only full blocks of the prompt.
    hs = expand_hash_ids([5, 6], 512, 16, num_tokens=600)
    assert len(hs) == 37 and len(set(hs)) == 37
    assert expand_hash_ids([5, 7], 512, 16, num_tokens=600)[:32] == hs[:32]
    assert expand_hash_ids([5, 7], 512, 16, num_tokens=600)[32] != hs[32]
    # Blocks larger than an id: each block is keyed by the id covering its last token.
    assert len(expand_hash_ids([1, 2, 3], 4, 8)) == 1
    with pytest.raises(ValueError, match="hash_block_tokens"):
        expand_hash_ids([1], 0, 16)
