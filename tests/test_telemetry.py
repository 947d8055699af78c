"""OpenTelemetry: spans and metrics of the memory manager through the SDK's in-memory exporter and reader,
and the no-op fast path when no SDK is configured."""

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from _memory_helpers import SMALL
from kvtriton import GPUMemoryAllocator
from kvtriton.ops import backend
from kvtriton.telemetry import Instrumentation, get_meter, get_tracer, is_tracing


@pytest.fixture
def otel():
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    yield tp, exporter, mp, reader
    tp.shutdown()
    mp.shutdown()


def _metrics(reader):
    out = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = list(m.data.data_points)
    return out


def test_spans_and_metrics_of_a_pool(otel):
    tp, exporter, mp, reader = otel
    with backend("reference"), GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096,
                                                  tracer_provider=tp, meter_provider=mp) as alloc:
        pool = alloc.create_pool("m", SMALL, max_chunks=2)
        a = pool.request(token_ids=list(range(20)))       # grows 2 chunks
        a.release()
        b = pool.request(token_ids=list(range(8)))        # 2 hits
        c = pool.request(20)                              # 3 free blocks: evicts 2 of the 3 unpinned cached ones
        pool.release(c)
        pool.compact(evict=True)                          # shrinks one chunk
        spans = exporter.get_finished_spans()
        names = [s.name for s in spans]
        for name in ("kvtriton.allocate", "kvtriton.release", "kvtriton.evict", "kvtriton.grow",
                     "kvtriton.shrink", "kvtriton.compact"):
            assert name in names, (name, names)
        alloc_spans = [s for s in spans if s.name == "kvtriton.allocate"]
        assert len(alloc_spans) == 3
        first = alloc_spans[0].attributes
        assert first["pool"] == "m" and first["blocks"] == 5 and first["bytes"] == 5 * SMALL.bytes_per_block
        assert alloc_spans[1].attributes["hit_blocks"] == 2
        ev = next(s for s in spans if s.name == "kvtriton.evict")
        assert ev.attributes["blocks"] == 2 and ev.attributes["pool"] == "m"

        m = _metrics(reader)
        hist = m["kvtriton.pool.allocation.duration"]
        assert sum(p.count for p in hist) == 3
        states = {p.attributes["state"]: p.value for p in m["kvtriton.pool.blocks"]}
        s = pool.stats()
        assert states == {"capacity_blocks": s["capacity_blocks"], "used_blocks": 2,
                          "cached_blocks": s["cached_blocks"], "free_blocks": s["free_blocks"]}
        assert m["kvtriton.pool.evictions"][0].value == 2
        assert m["kvtriton.pool.hit_blocks"][0].value == 2
        assert m["kvtriton.pool.chunks"][0].value == s["chunks_held"] == 1
        assert {p.attributes["state"] for p in m["kvtriton.pool.fragmentation"]} == {
            "internal_fragmentation", "external_fragmentation"}
        assert m["kvtriton.arena.free_chunks"][0].value == 15
        b.release()
    # After close the observable callbacks report nothing rather than failing.
    m = _metrics(reader)
    assert not m.get("kvtriton.pool.blocks")


def test_noop_api_skips_spans():
    # No SDK configured globally: the proxy tracer records nothing and spans are never created.
    assert trace._TRACER_PROVIDER is None or not is_tracing(get_tracer())
    inst = Instrumentation()
    if trace._TRACER_PROVIDER is None:
        assert inst.tracing is False
        with inst.span("x", a=1) as span:
            assert span is None
    assert is_tracing(trace.NoOpTracer()) is False
    get_meter().create_counter("kvtriton.test").add(1)  # the no-op meter accepts calls


def test_explicit_provider_is_used(otel):
    tp, exporter, mp, _ = otel
    inst = Instrumentation(tp, mp, {"pool": "p"})
    assert inst.tracing
    with inst.span("kvtriton.test", blocks=3):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.attributes == {"pool": "p", "blocks": 3}
    with pytest.raises(ValueError, match="kind"):
        inst.observe("x", "histogram", "1", "", lambda: [])


def test_every_pool_reports_under_one_meter(otel):
    tp, _, mp, reader = otel
    with GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096,
                            tracer_provider=tp, meter_provider=mp) as alloc:
        a, b = alloc.create_pool("a", SMALL), alloc.create_pool("b", SMALL)
        a.request(5)
        b.request(9)
        m = _metrics(reader)
        used = {p.attributes["pool"]: p.value for p in m["kvtriton.pool.blocks"]
                if p.attributes["state"] == "used_blocks"}
        assert used == {"a": 2, "b": 3}
        assert {p.attributes["pool"] for p in m["kvtriton.pool.allocation.duration"]} == {"a", "b"}


def test_one_collection_reads_one_snapshot_per_pool(otel):
    """All the gauges and counters of one collection share one snapshot of each pool (taken once, under
    the pool's lock), and the next collection takes a new one."""
    _, _, mp, reader = otel
    with backend("reference"), GPUMemoryAllocator(devices=["cpu"], budget_bytes=64 << 10, chunk_bytes=4096,
                                                  meter_provider=mp) as alloc:
        pools = {n: alloc.create_pool(n, SMALL) for n in ("a", "b")}
        taken = {n: 0 for n in pools}
        for name, p in pools.items():
            real = p._stats_snapshot

            def counted(name=name, real=real):
                taken[name] += 1
                return real()

            p._stats_snapshot = counted
            p.stats = None  # the gauges must not call stats() (it also computes latency percentiles)
        x = pools["a"].request(5)

        def used(m):
            return {p.attributes["pool"]: p.value for p in m["kvtriton.pool.blocks"]
                    if p.attributes["state"] == "used_blocks"}

        m = _metrics(reader)
        assert taken == {"a": 1, "b": 1}
        assert used(m) == {"a": 2, "b": 0}
        assert {p.attributes["pool"]: p.value for p in m["kvtriton.pool.requests"]} == {"a": 1, "b": 0}
        x.append(8)                                        # 13 tokens: 4 blocks
        m = _metrics(reader)
        assert taken == {"a": 2, "b": 2}
        assert used(m) == {"a": 4, "b": 0}
