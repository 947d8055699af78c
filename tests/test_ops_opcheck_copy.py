"""torch.library registration of the copy-family ops: ``torch.library.opcheck`` (schema and mutation
annotations, fake implementations, AOT dispatch) on the Triton path, and a ``torch.compile`` round trip."""

from __future__ import annotations

import pytest
import torch

import kvtriton.ops as ops
from kvtriton.ops._backend import HAS_TRITON, INTERPRET

pytestmark = pytest.mark.skipif(not (HAS_TRITON and INTERPRET),
                                reason="needs triton with TRITON_INTERPRET=1 (set in conftest.py)")


def _inputs():
    nb, bs, H, D = 6, 4, 2, 16
    arena = torch.randn(nb, 2, 2, bs, H, D)
    kc, vc = arena[:, 1, 0], arena[:, 1, 1]  # strided views, as the arena hands them out
    T = 5
    key, value = torch.randn(T, H, D), torch.randn(T, H, D)
    slots = torch.randperm(nb * bs)[:T]
    slots[2] = -1
    bt = torch.randperm(nb).view(2, 3).to(torch.int32)
    sl = torch.tensor([5, 9], dtype=torch.int32)
    keep = torch.rand(2, 12) < 0.5
    kv = torch.ops.kvtriton
    return {
        "append_kv": (kv.append_kv, (key, value, kc, vc, slots)),
        "gather_kv": (kv.gather_kv, (kc, vc, bt, sl, 14)),
        "gather_blocks": (kv.gather_blocks, (arena, torch.tensor([4, 0], dtype=torch.int32),
                                             torch.empty(2, *arena.shape[1:]))),
        "scatter_blocks": (kv.scatter_blocks, (kc, torch.tensor([4, 0]), torch.randn(2, bs, H, D))),
        "move_blocks": (kv.move_blocks, (arena, torch.tensor([1, 2, 5]), torch.tensor([3, 4, 5]))),
        "compact_tokens": (kv.compact_tokens, (kc, vc, bt, sl, keep)),
    }


@pytest.mark.parametrize("name", list(_inputs()))
def test_opcheck(name):
    op, args = _inputs()[name]
    with ops.backend("triton"):
        torch.library.opcheck(op, args)


def test_public_functions_dispatch_registered_ops():
    # The public entry validates, then calls the torch.library op, so torch.compile sees one opaque op.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.name())
            return func(*args, **(kwargs or {}))

    inp = _inputs()
    key, value, kc, vc, slots = inp["append_kv"][1]
    _, (_, _, bt, sl, _) = inp["gather_kv"]
    arena = inp["gather_blocks"][1][0]
    with ops.backend("triton"), Record() as rec:
        ops.append_kv(key, value, kc, vc, slots)
        ops.gather_kv(kc, vc, bt, sl, num_tokens=14)
        ops.gather_blocks(arena, torch.tensor([1]))
        ops.scatter_blocks(arena, torch.tensor([1]), torch.randn(1, *arena.shape[1:]))
        ops.move_blocks(arena, torch.tensor([0]), torch.tensor([2]), validate=False)
        ops.copy_blocks(arena, torch.tensor([0]), torch.tensor([3]), validate=False)
        ops.compact_tokens(kc, vc, bt, sl, inp["compact_tokens"][1][4])
    want = {f"kvtriton::{n}" for n in ("append_kv", "gather_kv", "gather_blocks", "scatter_blocks",
                                       "move_blocks", "compact_tokens")}
    assert want <= rec.names


def test_torch_compile_fullgraph():
    nb, bs, H, D = 5, 4, 2, 16
    arena = torch.randn(nb, 2, 2, bs, H, D)
    expect = arena.clone()

    def step(arena, key, value, slots, src, dst, bt, sl):
        kc, vc = arena[:, 1, 0], arena[:, 1, 1]
        ops.append_kv(key, value, kc, vc, slots)
        ops.move_blocks(arena, src, dst)
        k, v, cu = ops.gather_kv(kc, vc, bt, sl, num_tokens=6)
        staged = ops.gather_blocks(arena, src)
        return k, v, cu, staged

    key, value = torch.randn(3, H, D), torch.randn(3, H, D)
    slots = torch.tensor([1, 6, 13])
    src, dst = torch.tensor([0, 1]), torch.tensor([2, 3])
    bt = torch.tensor([[2, 3]], dtype=torch.int32)
    sl = torch.tensor([6], dtype=torch.int32)
    with ops.backend("reference"):
        want = step(expect, key, value, slots, src, dst, bt, sl)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with ops.backend("triton"):
        got = compiled(arena, key, value, slots, src, dst, bt, sl)
    assert torch.equal(arena, expect)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------------
# The CUDA build of every copy kernel, without a GPU: Triton compiles for sm_90 on the host (its bundled
# ptxas), which catches code that only the interpreter accepts, and the PTX shows the accesses are
# 128-bit vectors. Run in a subprocess because the tests' triton is in interpreter mode.

_COMPILE_SCRIPT = r'''
import json, os, re
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvtriton.ops import append, compact, gather

def build(fn, types, consts, div16, warps):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = k.asm["ptx"]
    return {"ld_v4": "ld.global.v4.b32" in ptx, "st_v4": "st.global.v4.b32" in ptx,
            "bar": "bar.sync" in ptx, "cubin": "cubin" in k.asm}

out = {}
bc = gather._block_copy_kernel
ptrs = {"src_ptr": "*bf16", "dst_ptr": "*bf16", "src_ids_ptr": "*i32", "dst_ids_ptr": "*i64"}
strides = ["src_ptr", "dst_ptr", "src_stride_b", "dst_stride_b", "src_stride_r", "dst_stride_r", "cols"]
out["move"] = build(bc, ptrs, {"SRC_INDEXED": True, "DST_INDEXED": True, "SKIP_SAME": True, "EVEN": True,
                               "BLOCK": 8192}, strides, 8)
out["gather_blocks_masked"] = build(bc, ptrs, {"SRC_INDEXED": True, "DST_INDEXED": False, "SKIP_SAME": False,
                                               "EVEN": False, "BLOCK": 4096}, strides, 8)
kv = ["kc_sb", "kc_st", "kc_sh", "vc_sb", "vc_st", "vc_sh", "D"]
gk = gather._gather_kv_kernel
out["gather_kv"] = build(gk, {**{n: "*fp16" for n in ["kc_ptr", "vc_ptr", "k_out_ptr", "v_out_ptr"]},
                              "block_tables_ptr": "*i32", "seq_lens_ptr": "*i64", "cu_ptr": "*i32"},
                         {"BLOCK_T": 8, "BLOCK_H": 8, "BLOCK_D": 128, "I64_HEADS": False},
                         ["kc_ptr", "vc_ptr", "k_out_ptr", "v_out_ptr"] + kv, 8)
ak = append._append_kv_kernel
out["append_kv"] = build(ak, {**{n: "*bf16" for n in ["key_ptr", "value_ptr", "kc_ptr", "vc_ptr"]},
                              "slot_ptr": "*i64"}, {"BLOCK_T": 4, "BLOCK_H": 8, "BLOCK_D": 128, "I64_HEADS": False},
                         ["key_ptr", "value_ptr", "kc_ptr", "vc_ptr", "k_st", "k_sh", "v_st", "v_sh"] + kv, 4)
ck = compact._compact_kernel
out["compact_tokens"] = build(ck, {"kc_ptr": "*fp32", "vc_ptr": "*fp32", "block_tables_ptr": "*i32",
                                   "dst_pos_ptr": "*i32", "start_ptr": "*i32", "end_ptr": "*i32"},
                              {"BLOCK_T": 4, "BLOCK_H": 2, "BLOCK_D": 256, "I64_HEADS": False},
                              ["kc_ptr", "vc_ptr"] + kv, 4)
# int64 head offsets (a head stride that passes 2^31 / num_heads) compile too, still vectorised
out["append_kv_i64_heads"] = build(ak, {**{n: "*bf16" for n in ["key_ptr", "value_ptr", "kc_ptr", "vc_ptr"]},
                                        "slot_ptr": "*i64"},
                                   {"BLOCK_T": 4, "BLOCK_H": 8, "BLOCK_D": 128, "I64_HEADS": True},
                                   ["key_ptr", "value_ptr", "kc_ptr", "vc_ptr", "k_st", "k_sh", "v_st", "v_sh"] + kv, 4)
print("RESULT " + json.dumps(out))
'''


def test_kernels_compile_for_cuda_with_vector_accesses():
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() or "No module named 'triton.backends.nvidia'"
                              in r.stderr):
        pytest.skip(f"no CUDA toolchain in this triton build: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    for name, info in res.items():
        assert info["ld_v4"] and info["st_v4"], (name, info)  # 16-byte loads and stores
    assert res["compact_tokens"]["bar"]  # the load/store barrier survived compilation


def _strided(x):
    """``x`` (1-D or 2-D index tensor) as a view with a non-unit last stride and the same values."""
    return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]


@pytest.mark.parametrize("name", list(_inputs()))
def test_opcheck_strided_indices(name):
    # The registered ops normalise their index arguments themselves (torch.compile and direct
    # torch.ops.kvtriton calls skip the public functions): opcheck over strided views.
    op, args = _inputs()[name]
    args = tuple(_strided(a) if isinstance(a, torch.Tensor) and a.dtype in (torch.int32, torch.int64)
                 else a for a in args)
    assert any(isinstance(a, torch.Tensor) and a.dim() and a.stride(-1) == 2 for a in args)
    with ops.backend("triton"):
        torch.library.opcheck(op, args)
