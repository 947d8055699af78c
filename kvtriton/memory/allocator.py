"""GPUMemoryAllocator: the arenas of one or more devices (CUDA or CPU) and the model pools carved from them."""

from __future__ import annotations

import contextlib
import itertools
import threading

import torch

from ..errors import AllocatorClosedError, PoolClosedError
from ..spec import get_spec
from ..telemetry import Instrumentation
from ..devices import parse_device
from .arena import DEFAULT_CHUNK_BYTES, Arena
from .checks import is_int
from .pool import CachePool

_SELECTIONS = ("round_robin", "least_loaded")


class GPUMemoryAllocator:
    """Owns one :class:`Arena` per device and the :class:`CachePool` of each model.

    The name is the original design's; nothing in it needs a GPU. On a "cpu" device the arena is host
    memory and the same pools, caches, moves and statistics work there (the ops run their Triton
    kernels in the interpreter, or the plain-PyTorch references): that is how the tests, the CPU
    replays and the host-side benchmarks use it.

    ``devices``: "cpu", "cuda", "cuda:N" or torch.devices (default: every CUDA device, else the CPU).
    Each arena is sized by ``budget_bytes`` (an int for every device, or a dict device -> bytes) or
    ``memory_fraction`` of the device's free memory (default 0.9 on CUDA; on CPU a 1 GiB budget).
    Arenas are allocated by ``start()`` (also on entering the ``with`` block, or on the first
    ``create_pool``); ``close()`` releases every cache and pool and frees them.
    ``device_selection`` picks a pool's device when ``create_pool`` gets none: "round_robin" or
    "least_loaded" (the arena with the most free chunks).

    When a pool cannot find blocks, the allocator asks the other pools on its device to give back
    their empty chunks (no moves) and the request is retried once. Locking: the allocator's lock is
    taken before any pool's moves lock or lock, never while one is held (the reclaim path reads an
    immutable snapshot of the pools instead); ``stats`` alone holds several pool locks, in
    ``pool_id`` order, then the arenas' locks, so its totals are one snapshot. After ``close`` every
    method but ``close`` raises AllocatorClosedError.
    """

    def __init__(self, devices=None, budget_bytes=None, memory_fraction: float | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, device_selection: str = "round_robin",
                 tracer_provider=None, meter_provider=None):
        if devices is None:
            devices = ([f"cuda:{i}" for i in range(torch.cuda.device_count())]
                       if torch.cuda.is_available() else ["cpu"])
        elif isinstance(devices, (str, torch.device)):
            devices = [devices]
        devs = [parse_device(d) for d in devices]
        if not devs:
            raise ValueError("devices must name at least one device")
        if len(set(devs)) != len(devs):
            raise ValueError(f"devices must be distinct, got {[str(d) for d in devs]}")
        if device_selection not in _SELECTIONS:
            raise ValueError(f"device_selection must be one of {_SELECTIONS}, got {device_selection!r}")
        if budget_bytes is not None and memory_fraction is not None:
            raise ValueError("give budget_bytes or memory_fraction, not both")
        if isinstance(budget_bytes, dict):
            budgets = {parse_device(k): v for k, v in budget_bytes.items()}
            unknown = set(budgets) - set(devs)
            if unknown:
                raise ValueError(f"budget_bytes names devices {sorted(map(str, unknown))} not in "
                                 f"devices {[str(d) for d in devs]}")
        else:
            budgets = {d: budget_bytes for d in devs}
        self.devices = devs
        self._budgets = budgets
        self._fraction = memory_fraction
        self.chunk_bytes = chunk_bytes
        self.device_selection = device_selection
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self.arenas: dict[torch.device, Arena] = {}
        self._pools: dict[str, CachePool] = {}
        self._pool_list: tuple[CachePool, ...] = ()   # replaced, never edited: read without the lock
        self._pool_ids = itertools.count()
        self._rr = 0
        self.lock = threading.RLock()
        self._close_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._tel = Instrumentation(tracer_provider, meter_provider)

    # ---------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise AllocatorClosedError(f"allocator over {[str(d) for d in self.devices]} is closed")

    def start(self) -> "GPUMemoryAllocator":
        """Allocate the arenas (idempotent). A budget above a device's free memory raises ValueError
        and leaves nothing allocated."""
        with self.lock:
            self._check_open()
            if self._started:
                return self
            arenas = {}
            for d in self.devices:
                budget = self._budgets.get(d)
                frac = self._fraction
                if budget is None and frac is None and d.type == "cpu":
                    budget = 1 << 30
                arenas[d] = Arena(d, budget_bytes=budget, memory_fraction=frac, chunk_bytes=self.chunk_bytes)
            self.arenas = arenas
            self._started = True
            self._register_metrics()
            return self

    def close(self) -> None:
        """Close every pool (each waits for its ``stable_blocks`` holders) and free the arenas;
        idempotent."""
        with self._close_lock:
            with self.lock:
                if self._closed:
                    return
                pools = list(self._pools.values())
                inside = [p.name for p in pools if p._moves.held_shared_by_me]
                if inside:  # checked before anything changes: the close would wait for this thread
                    raise RuntimeError(f"close() called inside stable_blocks() of pools {inside}")
                self._closed = True          # from here every other method raises
            # Outside the allocator's lock: a pool's close waits for its stable_blocks() holders,
            # who may be calling into the allocator.
            for pool in pools:
                pool.close()
            with self.lock:
                self._pools.clear()
                self._pool_list = ()
                for a in self.arenas.values():
                    a.close()

    def __enter__(self) -> "GPUMemoryAllocator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _register_metrics(self):
        import weakref
        ref = weakref.ref(self)

        def read():
            alloc = ref()
            if alloc is None or alloc._closed:
                return None
            return [(a.free_chunks, {"device": str(d)}) for d, a in alloc.arenas.items()]

        self._tel.observe("kvtriton.arena.free_chunks", "gauge", "{chunk}", "Free arena chunks", read)

    # ---------------------------------------------------------------- pools
    def _pick_device(self) -> torch.device:
        if self.device_selection == "round_robin":
            d = self.devices[self._rr % len(self.devices)]
            self._rr += 1
            return d
        return max(self.devices, key=lambda d: (self.arenas[d].free_chunks, -self.devices.index(d)))

    def create_pool(self, name: str, spec, policy="lru", device=None, **pool_kwargs) -> CachePool:
        """A new pool for model ``spec`` (a ModelSpec or a preset name from ``kvtriton.spec.PRESETS``)
        with eviction ``policy`` (a name from ``kvtriton.policies``). ``pool_kwargs``: ``initial_chunks``
        or ``initial_bytes``, ``max_chunks`` or ``max_bytes``, ``grow_chunks``, ``policy_kwargs``."""
        spec = get_spec(spec)
        with self.lock:
            self._check_open()
            self.start()
            if not isinstance(name, str) or not name:
                raise ValueError(f"name must be a non-empty str, got {name!r}")
            if name in self._pools:
                raise ValueError(f"a pool named {name!r} exists; pools: {sorted(self._pools)}")
            rr = self._rr
            if device is None:
                dev = self._pick_device()
            else:
                dev = parse_device(device)
                if dev not in self.arenas:
                    raise ValueError(f"device must be one of {[str(d) for d in self.devices]}, got {device!r}")
            arena = self.arenas[dev]
            for key in ("initial", "max"):
                b = pool_kwargs.pop(f"{key}_bytes", None)
                if b is not None:
                    if f"{key}_chunks" in pool_kwargs:
                        raise ValueError(f"give {key}_bytes or {key}_chunks, not both")
                    if not is_int(b) or b < 0:
                        raise ValueError(f"{key}_bytes must be an int >= 0, got {b!r}")
                    pool_kwargs[f"{key}_chunks"] = -(-b // arena.chunk_bytes)
            try:
                pool = CachePool(name, spec, arena, policy, pool_id=next(self._pool_ids),
                                 tracer_provider=self._tracer_provider, meter_provider=self._meter_provider,
                                 **pool_kwargs)
            except BaseException:
                self._rr = rr  # a failed create_pool leaves the allocator as it was
                raise
            pool._reclaim = self._reclaim_for
            self._pools[name] = pool
            self._pool_list = self._pool_list + (pool,)
            return pool

    def _reclaim_for(self, pool: CachePool) -> bool:
        """Ask the other pools on ``pool``'s arena for their empty chunks; True when any came back.
        Called with no lock held, possibly inside ``pool.stable_blocks()``: it takes no allocator lock
        (a close holding it may be waiting for that very hold) and only pool locks, one at a time."""
        got = 0
        for p in self._pool_list:
            if p is pool or p.arena is not pool.arena or p._closed:
                continue
            try:
                got += p.release_free_chunks()
            except PoolClosedError:
                pass  # destroyed meanwhile: its chunks went back to the arena anyway
        return got > 0

    def get_pool(self, name: str) -> CachePool:
        with self.lock:
            self._check_open()
            if name not in self._pools:
                raise KeyError(f"no pool named {name!r}; pools: {sorted(self._pools)}")
            return self._pools[name]

    def destroy_pool(self, name: str) -> None:
        """Close pool ``name`` (its caches are released) and return its chunks to the arena; waits for
        the pool's ``stable_blocks`` holders (and running ``write_kv``/``read_kv``) to leave."""
        with self.lock:
            pool = self.get_pool(name)   # listed until closed, so stats() always adds up
        # Outside the allocator's lock: the close waits for the pool's stable_blocks() holders, who
        # may be calling into the allocator.
        pool.close()
        with self.lock:
            if self._pools.get(name) is pool:
                del self._pools[name]
                self._pool_list = tuple(p for p in self._pool_list if p is not pool)

    @property
    def pools(self) -> dict[str, CachePool]:
        with self.lock:
            self._check_open()
            return dict(self._pools)

    def stats(self) -> dict:
        """``{"devices": {device: {...}}, "pools": {name: pool.stats()}}``; every leaf a plain number.

        One snapshot: every pool's lock (in ``pool_id`` order) and then every arena's lock are held
        while the figures are read, so per device ``pools_held_bytes + free_bytes == arena_bytes``
        and the per-pool figures add up to the device totals."""
        with self.lock:
            self._check_open()
            pools = dict(self._pools)
            arenas = dict(self.arenas)
            with contextlib.ExitStack() as held:
                for p in sorted(pools.values(), key=lambda p: p.pool_id):
                    held.enter_context(p.lock)
                for a in arenas.values():
                    held.enter_context(a.lock)
                pools = {name: p for name, p in pools.items() if not p._closed}  # destroyed, holds nothing
                pstats = {name: p._stats_locked() for name, p in pools.items()}
                astats = {d: a.stats() for d, a in arenas.items()}
        for name, p in pools.items():
            pstats[name].update(p._latency_stats())
        devices = {}
        for d, a in arenas.items():
            s = astats[d]
            s.pop("device")
            mine = [n for n, p in pools.items() if p.arena is a]
            for key in ("capacity_bytes", "used_bytes", "cached_bytes", "free_bytes", "held_bytes",
                        "evictions", "hit_blocks", "miss_blocks", "requests"):
                s[f"pools_{key}"] = sum(pstats[n][key] for n in mine)
            s["num_pools"] = len(mine)
            s["utilization"] = s["pools_used_bytes"] / s["arena_bytes"]
            devices[str(d)] = s
        return {"devices": devices, "pools": pstats}

    def __repr__(self) -> str:
        return (f"GPUMemoryAllocator(devices={[str(d) for d in self.devices]}, pools={sorted(self._pools)}, "
                f"started={self._started}, closed={self._closed})")
