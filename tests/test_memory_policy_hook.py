"""The pool hands what it knows about a request to the policy's ``on_request`` hook."""

from kvtriton import GPUMemoryAllocator, PoolExhaustedError
from kvtriton.policies import make_policy
from kvtriton.workloads import Request


class Recording:
    """Wraps a real LRU and records the hook's arguments."""

    def __init__(self):
        self.inner = make_policy("lru")
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __contains__(self, key):
        return key in self.inner

    def on_request(self, keys, num_hit, request=None):
        self.calls.append((list(keys), num_hit, request))


def test_on_request_gets_keys_hits_and_request():
    rec = Recording()
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=8 << 20) as alloc:
        pool = alloc.create_pool("tiny", "tiny", policy=make_policy("lru"))
        pool.policy = rec  # a recording wrapper around the same kind of policy
        req = Request(request_id=7, arrival_s=0.0, input_length=48, output_length=4, hash_ids=(1, 2, 3))
        c1 = pool.request(48, block_hashes=["a", "b", "c"], request=req)
        pool.release(c1)
        c2 = pool.request(40, block_hashes=["a", "b"], request=req)
        assert rec.calls[0] == (["a", "b", "c"], 0, req)
        assert rec.calls[1] == (["a", "b"], 2, req)
        pool.release(c2)
        pool.validate()


def test_failed_request_does_not_reach_the_policy():
    rec = Recording()
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=4 << 20) as alloc:
        pool = alloc.create_pool("tiny", "tiny", max_chunks=1)
        pool.policy = rec
        held = pool.request(pool.spec.block_size * 8)
        big = pool.capacity_blocks * pool.spec.block_size + 1
        try:
            pool.request(big, block_hashes=["x"], request=None)
        except PoolExhaustedError:
            pass
        else:  # pragma: no cover
            raise AssertionError("expected PoolExhaustedError")
        assert rec.calls == []
        pool.release(held)
