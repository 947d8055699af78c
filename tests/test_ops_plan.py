"""PagedAttentionPlan: plan once, run per layer; the same results as the functional ops, bit for bit.

Runs the kernels in Triton's interpreter on CPU (tests/conftest.py) and the vectorised PyTorch path
under ``backend("reference")``; CUDA graphs and the direct launch path are checked in the gpu tests."""

import math

import pytest
import torch

from kvtriton import ops
from kvtriton.ops import _launch
from kvtriton.ops import reference as ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
PATHS = ["auto", "reference"]


def _rel_err(out, expect):
    out, expect = out.double(), expect.double()
    assert torch.equal(torch.isnan(expect), torch.isnan(out)), "NaN entries differ"
    finite = torch.isfinite(expect)
    assert torch.equal(finite, torch.isfinite(out)), "non-finite entries differ"
    return ((out[finite] - expect[finite]).norm() / expect[finite].norm().clamp_min(1e-30)).item()


def _case(lens, chunks, hq, hkv, d, bs, dtype, gen, layers=2, spare=3, device=DEV):
    """Arena ``[num_blocks, layers, 2, bs, hkv, d]`` (K/V of ``layers`` layers as views), a random
    permutation block table, ``q`` for every layer packed by ``cu_seqlens_q`` (host)."""
    batch = len(lens)
    max_blocks = max(1, -(-max(lens, default=1) // bs))
    nb = batch * max_blocks + spare
    arena = torch.randn(nb, layers, 2, bs, hkv, d, generator=gen).to(dtype).to(device)
    caches = [(arena[:, i, 0], arena[:, i, 1]) for i in range(layers)]
    tables = torch.randperm(nb, generator=gen)[: batch * max_blocks].view(batch, max_blocks).int()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(chunks, dtype=torch.int64).cumsum(0)
    qs = [torch.randn(int(cu[-1]), hq, d, generator=gen).to(dtype).to(device) for _ in range(layers)]
    return qs, caches, tables, seq_lens, cu


def _plan(tables, lens, cu, hq, hkv, d, bs, nb, dtype, **kw):
    return ops.PagedAttentionPlan().plan(tables, lens, cu, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                         block_size=bs, num_blocks=nb, dtype=dtype, device=DEV, **kw)


def _dev(*ts):
    return [t.to(DEV) for t in ts]


# ---------------------------------------------------------------------------------------------------
# Equal to the functional ops


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,num_splits,window", [(torch.float32, None, None), (torch.bfloat16, 3, None),
                                                     (torch.float32, 2, 9)])
def test_decode_plan_equals_functional(path, dtype, num_splits, window):
    gen = torch.Generator().manual_seed(1)
    lens = [37, 1, 0, 70]
    qs, caches, tables, seq_lens, _ = _case(lens, [1] * 4, 9, 3, 64, 16, dtype, gen)
    with ops.backend(path):
        plan = _plan(tables, seq_lens, None, 9, 3, 64, 16, caches[0][0].shape[0], dtype, return_lse=True,
                     num_splits=num_splits, sliding_window=window)
        assert plan.mode == "decode" and plan.num_rows == 4
        t, s = _dev(tables, seq_lens)
        for q, (kc, vc) in zip(qs, caches):
            out, lse = plan.run(q, kc, vc)
            f_out, f_lse = ops.paged_decode_attention(q, kc, vc, t, s, return_lse=True, num_splits=num_splits,
                                                      sliding_window=window)
            assert torch.equal(out, f_out) and torch.equal(lse, f_lse)
            r_out, r_lse = ref.paged_decode_attention(q, kc, vc, t, s, return_lse=True, sliding_window=window)
            assert _rel_err(out, r_out) < TOL[dtype] and _rel_err(lse, r_lse) < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_plan_equals_functional(path, dtype):
    """No one-token chunk: one launch of the prefill kernel over the whole batch (empty chunks included),
    exactly what paged_prefill_attention computes."""
    gen = torch.Generator().manual_seed(2)
    lens, chunks = [40, 0, 23, 9], [12, 0, 23, 2]
    qs, caches, tables, seq_lens, cu = _case(lens, chunks, 9, 3, 64, 16, dtype, gen)
    with ops.backend(path):
        plan = _plan(tables, seq_lens, cu, 9, 3, 64, 16, caches[0][0].shape[0], dtype, return_lse=True,
                     sliding_window=11)
        assert plan.mode == "prefill" and [p["kernel"] for p in plan.describe()] == ["prefill"]
        t, s, c = _dev(tables, seq_lens, cu)
        for q, (kc, vc) in zip(qs, caches):
            out, lse = plan.run(q, kc, vc)
            f_out, f_lse = ops.paged_prefill_attention(q, kc, vc, t, s, c, return_lse=True, sliding_window=11)
            assert torch.equal(out, f_out) and torch.equal(lse, f_lse)
            r_out, r_lse = ref.paged_prefill_attention(q, kc, vc, t, s, c, return_lse=True, sliding_window=11)
            assert _rel_err(out, r_out) < TOL[dtype] and _rel_err(lse, r_lse) < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,window", [(torch.float32, None), (torch.bfloat16, 13)])
def test_mixed_plan_equals_functional_parts(path, dtype, window):
    """Decode tokens, a prefix-cache hit, an empty chunk, a plain prefill and a speculative chunk in one
    plan: the one-token chunks give what paged_decode_attention gives on them, the others what
    paged_prefill_attention gives on them, bit for bit; the whole matches the float64 reference."""
    gen = torch.Generator().manual_seed(3)
    lens, chunks = [50, 1, 77, 33, 0, 20, 9, 64], [1, 1, 30, 1, 0, 20, 4, 1]
    qs, caches, tables, seq_lens, cu = _case(lens, chunks, 9, 3, 64, 16, dtype, gen)
    with ops.backend(path):
        plan = _plan(tables, seq_lens, cu, 9, 3, 64, 16, caches[0][0].shape[0], dtype, return_lse=True,
                     sliding_window=window)
        assert plan.mode == "mixed"
        assert [(p["kernel"], p["sequences"], p["rows"]) for p in plan.describe()] == [
            ("decode", 4, 4), ("prefill", 3, 54)]
        one = [0, 1, 3, 7]
        many = [2, 5, 6]
        d_rows = cu[one].long()
        p_rows = torch.cat([torch.arange(int(cu[b]), int(cu[b + 1])) for b in many])
        p_cu = torch.zeros(4, dtype=torch.int32)
        p_cu[1:] = (cu[1:] - cu[:-1])[many].cumsum(0)
        t, s, c = _dev(tables, seq_lens, cu)
        for q, (kc, vc) in zip(qs, caches):
            out, lse = plan.run(q, kc, vc)
            d_out, d_lse = ops.paged_decode_attention(q[d_rows.to(DEV)], kc, vc, t[one], s[one], return_lse=True,
                                                      sliding_window=window)
            assert torch.equal(out[d_rows.to(DEV)], d_out) and torch.equal(lse[d_rows.to(DEV)], d_lse)
            p_out, p_lse = ops.paged_prefill_attention(q[p_rows.to(DEV)], kc, vc, t[many], s[many], p_cu.to(DEV),
                                                       return_lse=True, sliding_window=window)
            assert torch.equal(out[p_rows.to(DEV)], p_out) and torch.equal(lse[p_rows.to(DEV)], p_lse)
            r_out, r_lse = ref.paged_prefill_attention(q, kc, vc, t, s, c, return_lse=True, sliding_window=window)
            assert _rel_err(out, r_out) < TOL[dtype] and _rel_err(lse, r_lse) < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_all_one_token_chunks_plan_as_decode(path):
    gen = torch.Generator().manual_seed(4)
    qs, caches, tables, seq_lens, cu = _case([5, 17, 33], [1, 1, 1], 8, 2, 32, 8, torch.float32, gen, layers=1)
    (q,), ((kc, vc),) = qs, caches
    with ops.backend(path):
        plan = _plan(tables, seq_lens, cu, 8, 2, 32, 8, kc.shape[0], torch.float32)
        assert plan.mode == "decode"
        out = plan.run(q, kc, vc)
        assert isinstance(out, torch.Tensor)
        t, s = _dev(tables, seq_lens)
        assert torch.equal(out, ops.paged_decode_attention(q, kc, vc, t, s))


@pytest.mark.parametrize("path", PATHS)
def test_strided_index_views_and_layouts(path):
    """Index tensors as strided, transposed and offset views; q head-major; caches views of an arena with
    three layers: the same results as contiguous inputs."""
    gen = torch.Generator().manual_seed(5)
    lens, chunks = [40, 1, 23, 7], [12, 1, 23, 1]
    qs, caches, tables, seq_lens, cu = _case(lens, chunks, 6, 2, 32, 8, torch.float32, gen, layers=3)
    q, (kc, vc) = qs[2], caches[2]
    assert not kc.is_contiguous()
    wide = torch.zeros(tables.shape[0], tables.shape[1] * 2, dtype=torch.int32)
    wide[:, ::2] = tables
    lens_nc = torch.stack([seq_lens, seq_lens + 7], 1)[:, 0]
    cu_nc = torch.stack([cu, cu * 3], 1)[:, 0]
    q_nc = q.transpose(0, 1).contiguous().transpose(0, 1)
    with ops.backend(path):
        expect = _plan(tables, seq_lens, cu, 6, 2, 32, 8, kc.shape[0], torch.float32).run(q, kc, vc).clone()
        for t in (wide[:, ::2], tables.t().contiguous().t()):
            out = _plan(t, lens_nc, cu_nc, 6, 2, 32, 8, kc.shape[0], torch.float32).run(q_nc, kc, vc)
            assert torch.equal(out, expect)


@pytest.mark.parametrize("path", PATHS)
def test_replan_with_a_different_batch(path):
    """plan() again with another batch (other shapes), then with the first batch's shapes but other
    tables and lengths: same-shape re-plans keep the device buffers (CUDA graphs stay valid)."""
    gen = torch.Generator().manual_seed(6)
    qa, ca, ta, la, cua = _case([30, 1, 9], [5, 1, 9], 4, 2, 32, 8, torch.float32, gen, layers=1)
    qb, cb, tb, lb, cub = _case([3, 17, 60, 1], [1, 1, 1, 1], 4, 2, 32, 8, torch.float32, gen, layers=1)
    with ops.backend(path):
        plan = ops.PagedAttentionPlan()
        for q, (kc, vc), t, s, c in ((qa[0], ca[0], ta, la, cua), (qb[0], cb[0], tb, lb, cub)):
            plan.plan(t, s, c, num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=8, num_blocks=kc.shape[0],
                      dtype=torch.float32, device=DEV)
            out = plan.run(q, kc, vc)
            r = ref.paged_prefill_attention(q, kc, vc, *_dev(t, s, c))
            assert _rel_err(out, r) < 1e-5
        meta = plan._state.meta
        nb = cb[0][0].shape[0]
        t2 = torch.randperm(nb, generator=gen)[: tb.numel()].view_as(tb).int()
        l2 = torch.tensor([50, 2, 8, 33], dtype=torch.int32)[:, None].clamp(max=tb.shape[1] * 8)[:, 0]
        plan.plan(t2, l2, cub, num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=8, num_blocks=nb,
                  dtype=torch.float32, device=DEV)
        assert plan._state.meta is meta                      # same buffers, new values
        out = plan.run(qb[0], *cb[0])
        assert _rel_err(out, ref.paged_prefill_attention(qb[0], *cb[0], *_dev(t2, l2, cub))) < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_device_resident_tables_without_value_reads(monkeypatch, path):
    """Tables already on the device (CUDA without debug checks): the plan never reads their values and
    builds the sub-batches with device ops; the same results (forced here on CPU)."""
    from kvtriton.ops import batch_attention
    gen = torch.Generator().manual_seed(15)
    qs, caches, tables, seq_lens, cu = _case([40, 1, 23, 7, 0], [12, 1, 23, 1, 0], 6, 2, 32, 8, torch.float32,
                                             gen, layers=1)
    q, (kc, vc) = qs[0], caches[0]
    with ops.backend(path):
        expect = _plan(tables, seq_lens, cu, 6, 2, 32, 8, kc.shape[0], torch.float32).run(q, kc, vc).clone()
        monkeypatch.setattr(batch_attention, "_read_tables", lambda bt, sl: (None, None))
        plan = _plan(tables, seq_lens, cu, 6, 2, 32, 8, kc.shape[0], torch.float32)
        assert plan.mode == "mixed"
        assert torch.equal(plan.run(q, kc, vc), expect)
        bad = tables.clone()
        bad[0, 0] = 10**6                                  # not read, so not refused: the kernels skip it
        plan.plan(bad, seq_lens, cu, num_q_heads=6, num_kv_heads=2, head_dim=32, block_size=8,
                  num_blocks=kc.shape[0], dtype=torch.float32, device=DEV)
        assert torch.isfinite(plan.run(q, kc, vc)).all()


def test_run_output_is_the_plans_buffer_unless_out_given():
    gen = torch.Generator().manual_seed(7)
    qs, caches, tables, seq_lens, cu = _case([20, 9], [4, 1], 4, 2, 32, 8, torch.float32, gen)
    plan = _plan(tables, seq_lens, cu, 4, 2, 32, 8, caches[0][0].shape[0], torch.float32)
    first = plan.run(qs[0], *caches[0])
    kept = first.clone()
    second = plan.run(qs[1], *caches[1])
    assert second is first and not torch.equal(second, kept)       # overwritten by the next run
    mine = torch.empty_like(qs[0])
    res = plan.run(qs[0], *caches[0], out=mine)
    assert res is mine and torch.equal(mine, kept) and torch.equal(first, second)


@pytest.mark.parametrize("path", PATHS)
def test_every_output_row_is_written(path):
    gen = torch.Generator().manual_seed(8)
    qs, caches, tables, seq_lens, cu = _case([20, 1, 0, 33, 5], [3, 1, 0, 1, 5], 9, 3, 32, 8, torch.bfloat16,
                                             gen, layers=1)
    with ops.backend(path):
        plan = _plan(tables, seq_lens, cu, 9, 3, 32, 8, caches[0][0].shape[0], torch.bfloat16, return_lse=True)
        plan._state.out.fill_(float("nan"))
        plan._state.lse.fill_(float("nan"))
        out, lse = plan.run(qs[0], *caches[0])
    assert not out.isnan().any() and not lse.isnan().any()


@pytest.mark.parametrize("cu_chunks,lens", [([0, 0], [3, 0]), ([], [])])
def test_empty_batches(cu_chunks, lens):
    tables = torch.zeros(len(lens), 2, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    kc = torch.randn(4, 8, 2, 32, device=DEV)
    plan = _plan(tables, seq_lens, cu, 4, 2, 32, 8, 4, torch.float32, return_lse=True)
    assert plan.mode == "empty"
    out, lse = plan.run(torch.empty(0, 4, 32, device=DEV), kc, kc.clone())
    assert out.shape == (0, 4, 32) and lse.shape == (0, 4)


# ---------------------------------------------------------------------------------------------------
# Refusals


def _good_plan():
    gen = torch.Generator().manual_seed(9)
    qs, caches, tables, seq_lens, cu = _case([20, 1, 9], [6, 1, 2], 8, 2, 32, 8, torch.float32, gen, layers=1)
    plan = _plan(tables, seq_lens, cu, 8, 2, 32, 8, caches[0][0].shape[0], torch.float32)
    return plan, qs[0], caches[0], tables, seq_lens, cu


@pytest.mark.parametrize("mutate,word", [
    (lambda a: a.update(q=a["q"][:-1]), "q must have the planned shape"),
    (lambda a: a.update(q=a["q"][:, :4]), "q must have the planned shape"),
    (lambda a: a.update(q=a["q"].double()), "q dtype torch.float64 must be the planned dtype"),
    (lambda a: a.update(q=a["q"].to("meta")), "q is on meta"),
    (lambda a: a.update(q=a["q"].numpy()), "q must be a torch.Tensor"),
    (lambda a: a.update(key_cache=a["key_cache"][:-1]), "key_cache must have the planned shape"),
    (lambda a: a.update(value_cache=a["value_cache"].half()), "value_cache dtype"),
    (lambda a: a.update(key_cache=a["key_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
     "key_cache must have a contiguous last dimension"),
    (lambda a: a.update(out=torch.empty(3, 8, 32, device=DEV)), "out must be"),
    (lambda a: a.update(lse=torch.empty(9, 8, device=DEV)), "lse= needs a plan made with return_lse"),
])
def test_run_refuses_what_does_not_match_the_plan(mutate, word):
    plan, q, (kc, vc), *_ = _good_plan()
    args = dict(q=q, key_cache=kc, value_cache=vc)
    mutate(args)
    with pytest.raises(ValueError, match=word):
        plan.run(args.pop("q"), args.pop("key_cache"), args.pop("value_cache"), **args)


def test_run_before_plan():
    with pytest.raises(RuntimeError, match="before plan"):
        ops.PagedAttentionPlan().run(torch.zeros(1, 8, 32), torch.zeros(1, 8, 2, 32), torch.zeros(1, 8, 2, 32))


@pytest.mark.parametrize("mutate,exc,word", [
    (lambda a: a["tables"].__setitem__((0, 1), 10**6), IndexError, "block_tables values must be in"),
    (lambda a: a["tables"].__setitem__((0, 0), -1), IndexError, "block_tables"),
    (lambda a: a.update(lens=a["lens"] + 100), IndexError, "seq_lens values must be in"),
    (lambda a: a.update(lens=a["lens"][:2]), ValueError, "seq_lens must have shape"),
    (lambda a: a.update(tables=a["tables"].short()), ValueError, "block_tables must have dtype"),
    (lambda a: a.update(cu=torch.tensor([0, 6, 5, 9], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda a: a.update(cu=torch.tensor([1, 6, 7, 9], dtype=torch.int32)), ValueError, "start at 0"),
    (lambda a: a.update(cu=torch.tensor([0, 6, 9, 10], dtype=torch.int32)), ValueError,
     "seq_lens\\[1\\] = 1 must be >= its chunk length"),
    (lambda a: a.update(cu=a["cu"][:3]), ValueError, "cu_seqlens_q must have shape"),
    (lambda a: a.update(cu=a["cu"].to("meta")), ValueError, "cu_seqlens_q must be a host"),
    (lambda a: a["kw"].update(num_q_heads=7), ValueError, "multiple of num_kv_heads"),
    (lambda a: a["kw"].update(head_dim=48), ValueError, "head_dim"),
    (lambda a: a["kw"].update(block_size=12), ValueError, "block_size"),
    (lambda a: a["kw"].update(num_blocks=-1), ValueError, "num_blocks"),
    (lambda a: a["kw"].update(num_blocks=True), ValueError, "num_blocks"),
    (lambda a: a["kw"].update(dtype=torch.float64), ValueError, "dtype"),
    (lambda a: a["kw"].update(scale=0.0), ValueError, "scale"),
    (lambda a: a["kw"].update(sliding_window=0), ValueError, "sliding_window"),
    (lambda a: a["kw"].update(num_splits=0), ValueError, "num_splits"),
])
def test_bad_metadata_is_refused_and_the_plan_left_as_it_was(mutate, exc, word):
    plan, q, (kc, vc), tables, seq_lens, cu = _good_plan()
    before = plan.run(q, kc, vc).clone()
    state = plan._state
    args = dict(tables=tables.clone(), lens=seq_lens.clone(), cu=cu.clone(),
                kw=dict(num_q_heads=8, num_kv_heads=2, head_dim=32, block_size=8, num_blocks=kc.shape[0],
                        dtype=torch.float32, device=DEV))
    mutate(args)
    with pytest.raises(exc, match=word):
        plan.plan(args["tables"], args["lens"], args["cu"], **args["kw"])
    assert plan._state is state and plan.mode == "mixed"
    assert torch.equal(plan.run(q, kc, vc), before)


# ---------------------------------------------------------------------------------------------------
# torch.compile and the registered ops


def test_compile_runs_the_registered_ops_with_the_same_results():
    gen = torch.Generator().manual_seed(10)
    qs, caches, tables, seq_lens, cu = _case([30, 1, 12], [7, 1, 12], 6, 2, 32, 8, torch.float32, gen, layers=1)
    q, (kc, vc) = qs[0], caches[0]
    plan = _plan(tables, seq_lens, cu, 6, 2, 32, 8, kc.shape[0], torch.float32, return_lse=True)
    eager_out, eager_lse = (t.clone() for t in plan.run(q, kc, vc))
    fn = torch.compile(lambda q, k, v: plan.run(q, k, v), backend="eager", fullgraph=True)
    out, lse = fn(q, kc, vc)
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
    # The registered ops, on exactly the arguments the plan passes them (views of its metadata buffer).
    for p in plan._state.parts:
        qp = q if p.rows is None else q.index_select(0, p.rows)
        if p.kind == "decode":
            torch.library.opcheck(torch.ops.kvtriton.paged_decode_attention.default,
                                  (qp, kc, vc, p.block_tables, p.seq_lens, plan._state.scale, 0, False, 0))
        else:
            torch.library.opcheck(torch.ops.kvtriton.paged_prefill_attention.default,
                                  (qp, kc, vc, p.block_tables, p.seq_lens, p.cu_seqlens_q, plan._state.scale, 0))


# ---------------------------------------------------------------------------------------------------
# The launcher's direct path (CUDA only in use; its bookkeeping checked here with a stand-in kernel)


class _FakeCompiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, *args):
        self.log.append(("direct", args))


class _FakeKernel:
    arg_names = ["X", "n", "stride", "B"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def call(*args, **options):
            self.log.append(("jit", grid, args, options))
            return _FakeCompiled(self.log)
        return call


class _FakeDriver:
    class active:
        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(dev):
            return 1234


class _FakeKnobs:
    class runtime:
        launch_enter_hook = None
        launch_exit_hook = None


def test_launcher_reuses_the_compiled_kernel_per_specialisation(monkeypatch):
    monkeypatch.setattr(_launch, "_FAST", True)
    monkeypatch.setattr(_launch, "_driver", _FakeDriver)
    monkeypatch.setattr(_launch, "_knobs", _FakeKnobs)
    k = _FakeKernel()
    launcher = _launch.KernelLauncher(k, (3, 2), dict(X=None, n=7, stride=None, B=16), ("X", "stride"),
                                      dict(num_warps=4))
    x = torch.zeros(64)
    launcher(x, 8)                                   # compile (JIT path), keep the compiled kernel
    launcher(x, 8)                                   # same key: direct launch with every argument
    launcher(x[1:], 8)                               # another alignment: JIT path again
    launcher(x, 1)                                   # a stride of 1 is specialised by Triton: JIT path
    kinds = [e[0] for e in k.log]
    assert kinds == ["jit", "direct", "jit", "jit"]
    assert k.log[0] == ("jit", (3, 2, 1), (x, 7, 8, 16), {"num_warps": 4})
    assert k.log[1][1] == (3, 2, 1, 1234, "fn", "meta", None, None, None, x, 7, 8, 16)
    _FakeKnobs.runtime.launch_enter_hook = lambda *a: None    # a profiler's hook: back to the JIT path
    try:
        launcher(x, 8)
    finally:
        _FakeKnobs.runtime.launch_enter_hook = None
    assert k.log[-1][0] == "jit"
    monkeypatch.setenv("KVTRITON_FAST_LAUNCH", "0")
    launcher(x, 8)
    assert k.log[-1][0] == "jit"
    with pytest.raises(TypeError, match="missing"):
        _launch.KernelLauncher(k, (1,), dict(X=None, n=1), ("X",), {})


# ---------------------------------------------------------------------------------------------------
# CUDA


def _cuda_case(seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    lens = [700, 1, 2049, 3000, 515, 64, 1200, 33]
    chunks = [1, 1, 1500, 1, 7, 64, 1, 33]
    return _case(lens, chunks, 32, 8, 128, 16, dtype, gen, layers=2, device="cuda")


@pytest.mark.gpu
def test_cuda_mixed_plan_equals_functional_and_direct_launches():
    qs, caches, tables, seq_lens, cu = _cuda_case(11)
    plan = _plan(tables, seq_lens, cu, 32, 8, 128, 16, caches[0][0].shape[0], torch.bfloat16, return_lse=True)
    assert plan.mode == "mixed"
    t, s, c = _dev(tables, seq_lens, cu)
    for rep in range(3):            # the first run takes the JIT path, the next ones the direct one
        for q, (kc, vc) in zip(qs, caches):
            out, lse = plan.run(q, kc, vc)
            r_out, r_lse = ref.paged_prefill_attention(q, kc, vc, t, s, c, return_lse=True)
            assert _rel_err(out, r_out) < 1e-2 and _rel_err(lse, r_lse) < 1e-5
            if rep == 0:
                first = (out.clone(), lse.clone())
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])
    one = [0, 1, 3, 6]
    d_out = ops.paged_decode_attention(qs[1][cu[one].long().cuda()], *caches[1], t[one], s[one])
    assert torch.equal(out[cu[one].long().cuda()], d_out)
    # Tables already on the device: nothing read back, the same launches and results.
    on_dev = _plan(t, s, cu, 32, 8, 128, 16, caches[0][0].shape[0], torch.bfloat16, return_lse=True)
    assert torch.equal(on_dev.run(qs[1], *caches[1])[0], out)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_after_replan():
    qs, caches, tables, seq_lens, cu = _cuda_case(12)
    nb = caches[0][0].shape[0]
    plan = _plan(tables, seq_lens, cu, 32, 8, 128, 16, nb, torch.bfloat16)
    q, (kc, vc) = qs[0], caches[0]
    plan.run(q, kc, vc)                               # compile before capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        plan.run(q, kc, vc)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = plan.run(q, kc, vc)
    graph.replay()
    torch.cuda.synchronize()
    t, s, c = _dev(tables, seq_lens, cu)
    assert _rel_err(out, ref.paged_prefill_attention(q, kc, vc, t, s, c)) < 1e-2
    # Same shapes, other tables and lengths (and q): plan() writes in place and the graph replays them.
    gen = torch.Generator().manual_seed(13)
    t2 = torch.randperm(nb, generator=gen)[: tables.numel()].view_as(tables).int()
    s2 = seq_lens.clone()
    s2[[0, 3]] -= 5
    plan.plan(t2, s2, cu, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, num_blocks=nb,
              dtype=torch.bfloat16, device="cuda")
    q.copy_(qs[1])
    graph.replay()
    torch.cuda.synchronize()
    assert _rel_err(out, ref.paged_prefill_attention(q, kc, vc, *_dev(t2, s2, cu))) < 1e-2


@pytest.mark.gpu
def test_cuda_run_allocates_nothing():
    qs, caches, tables, seq_lens, cu = _cuda_case(14)
    plan = _plan(tables, seq_lens, cu, 32, 8, 128, 16, caches[0][0].shape[0], torch.bfloat16, return_lse=True)
    plan.run(qs[0], *caches[0])
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(5):
        plan.run(qs[1], *caches[1])
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert math.isfinite(float(plan._state.lse.float().sum()))
