"""kernels/attention.py against a float64 reference.

Accuracy rule (outputs and dq, dk, dv): max error of ours <= 2 x max error of PyTorch's eager math
attention in the same dtype + a small atol, both measured against float64. On CPU the kernels run
under the Triton interpreter (tests/conftest.py), where float32 matrix products are exact; on the
GPU float32 runs TF32 products, which every float32 tolerance allows for on CUDA.
"""
import importlib
import math

import pytest
import torch

from kernels.attention import (SUPPORTED_HEAD_DIMS, attention, attention_qkv_packed, attention_reference,
                               merge_heads, split_heads, tune_bucket)
from setr.data.transforms import rescale_size

attn = importlib.import_module("kernels.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# the Triton interpreter's own numpy deprecation warning, once per loop
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# atol relative to the largest magnitude of the float64 reference. float32 runs TF32 products on
# the GPU (operands rounded to a 10-bit mantissa) and exact float32 products under the interpreter.
ATOL = {torch.float32: 5e-3 if DEVICE == "cuda" else 1e-5, torch.bfloat16: 1e-3, torch.float16: 2e-4}
FLOAT32_TOL = dict(rtol=5e-3, atol=5e-3) if DEVICE == "cuda" else dict(rtol=1e-5, atol=1e-5)


def math_attention(q, k, v, scale):
    """Eager attention all in the inputs' dtype, as the eager baseline of setr/layers.py runs it."""
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v


def run_with_grads(fn, inputs, dout):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dout)
    return [out.detach(), *grads]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_rule(ours, math_same_dtype, gold, atol, names):
    for name, x, m, g in zip(names, ours, math_same_dtype, gold):
        assert x.shape == g.shape, f"{name}: shape {tuple(x.shape)} != {tuple(g.shape)}"
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
        tol = atol * max(1.0, g.abs().max().item())
        err, err_math = max_err(x, g), max_err(m, g)
        assert err <= 2 * err_math + tol, f"{name}: error {err:.3g} > 2 x math error {err_math:.3g} + {tol:.3g}"


def check_against_reference(B, H, Nq, Nk, D, dtype, scale=None, atol=None):
    q = torch.randn(B, H, Nq, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, H, Nk, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, H, Nk, D, device=DEVICE, dtype=dtype)
    dout = torch.randn(B, H, Nq, D, device=DEVICE, dtype=dtype)
    s = 1.0 / math.sqrt(D) if scale is None else scale
    ours = run_with_grads(lambda q, k, v: attention(q, k, v, scale), (q, k, v), dout)
    same = run_with_grads(lambda q, k, v: math_attention(q, k, v, s), (q, k, v), dout)
    gold = run_with_grads(lambda q, k, v: attention_reference(q, k, v, s),
                          (q.double(), k.double(), v.double()), dout.double())
    assert ours[0].dtype == dtype
    assert_rule(ours, same, gold, ATOL[dtype] if atol is None else atol, ("out", "dq", "dk", "dv"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (17, 17), (97, 97), (128, 128), (17, 97), (97, 17), (128, 33)])
def test_matches_reference(Nq, Nk, D, dtype):
    check_against_reference(2, 2, Nq, Nk, D, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_reference_setr_tokens(dtype):
    # 1025 = cls + 32x32 tokens; one batch and head keeps the interpreter run short
    check_against_reference(1, 1, 1025, 1025, 64, dtype)


def test_float16_and_custom_scale():
    check_against_reference(1, 2, 40, 70, 64, torch.float16, scale=0.3)


def packed_inputs(B, N, H, D, dtype):
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, dtype=dtype)
    dout = torch.randn(B, N, H * D, device=DEVICE, dtype=dtype)
    return qkv, dout


def packed_baselines(qkv, dout, H):
    """(same, gold) [out, dqkv] of packed attention: PyTorch's math in qkv's dtype, and float64."""
    D = qkv.shape[-1] // (3 * H)
    same = run_with_grads(lambda x: merge_heads(math_attention(*split_heads(x, H), D ** -0.5)), (qkv,), dout)
    gold = run_with_grads(lambda x: merge_heads(attention_reference(*split_heads(x, H))), (qkv.double(),),
                          dout.double())
    return same, gold


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qkv_packed_matches_reference(dtype):
    B, N, H, D = 2, 97, 2, 32
    qkv, dout = packed_inputs(B, N, H, D, dtype)
    ours = run_with_grads(lambda x: attention_qkv_packed(x, H), (qkv,), dout)
    same, gold = packed_baselines(qkv, dout, H)
    out, dqkv = ours
    assert out.shape == (B, N, H * D) and out.is_contiguous()
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
    assert_rule(ours, same, gold, ATOL[dtype], ("out", "dqkv"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_views_of_packed_qkv(dtype):
    # q, k, v are non-contiguous views straight from the projection output; the kernels read
    # them in place and the output is a view of a (B, N, H, D) buffer
    B, N, H, D = 2, 65, 2, 64
    qkv, dout = packed_inputs(B, N, H, D, dtype)
    q, k, v = split_heads(qkv, H)
    assert not q.is_contiguous()
    out = attention(q, k, v)
    assert out.shape == (B, H, N, D) and out.transpose(1, 2).is_contiguous()
    ours = run_with_grads(lambda x: merge_heads(attention(*split_heads(x, H))), (qkv,), dout)
    packed = run_with_grads(lambda x: attention_qkv_packed(x, H), (qkv,), dout)
    same, gold = packed_baselines(qkv, dout, H)
    assert_rule(ours, same, gold, ATOL[dtype], ("out", "dqkv"))
    # the packed entry point runs the same kernels: identical results
    assert torch.equal(ours[0], packed[0]) and torch.equal(ours[1], packed[1])


def test_non_unit_stride_head_dim_is_copied():
    q, k, v = (torch.randn(1, 2, 32, 19, device=DEVICE).transpose(2, 3) for _ in range(3))  # (1, 2, 19, 32)
    assert q.stride(-1) != 1
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), **FLOAT32_TOL)


def packed_twice(B, N, H, D):
    """Packed bf16 inputs and the (out, dqkv) of two identical runs: the two must be bitwise equal."""
    qkv, dout = packed_inputs(B, N, H, D, torch.bfloat16)
    first = run_with_grads(lambda x: attention_qkv_packed(x, H), (qkv,), dout)
    second = run_with_grads(lambda x: attention_qkv_packed(x, H), (qkv,), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    return qkv, dout, first


def test_backward_is_deterministic():
    packed_twice(1, 150, 2, 32)
    q, k, v = (torch.randn(1, 2, 70, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    first = run_with_grads(attention, (q, k, v), do)
    second = run_with_grads(attention, (q, k, v), do)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_log_sum_exp_is_saved():
    q, k, v = (torch.randn(2, 2, n, 32, device=DEVICE) for n in (50, 77, 77))
    out, lse = torch.ops.setr_kernels.attention_fwd(q, k, v, 0.25)
    assert lse.shape == (2, 2, 50) and lse.dtype == torch.float32
    expected = torch.logsumexp((q.double() @ k.double().transpose(-2, -1)) * 0.25, dim=-1)
    torch.testing.assert_close(lse.double(), expected, **FLOAT32_TOL)
    torch.testing.assert_close(out, attention_reference(q, k, v, 0.25), **FLOAT32_TOL)


@pytest.mark.parametrize("shapes,error,match", [
    (((2, 2, 8, 32), (3, 2, 8, 32), (3, 2, 8, 32)), ValueError, "batch sizes differ"),
    (((2, 2, 8, 32), (2, 4, 8, 32), (2, 4, 8, 32)), ValueError, "head counts differ"),
    (((2, 2, 8, 32), (2, 2, 8, 64), (2, 2, 8, 64)), ValueError, "head dims differ"),
    (((2, 2, 8, 32), (2, 2, 8, 32), (2, 2, 9, 32)), ValueError, "k has 8 tokens and v has 9"),
    (((2, 2, 8, 48), (2, 2, 8, 48), (2, 2, 8, 48)), ValueError, "head dim 48 is not supported"),
    (((2, 8, 32), (2, 8, 32), (2, 8, 32)), ValueError, "expected 4 dims"),
    (((2, 2, 0, 32), (2, 2, 8, 32), (2, 2, 8, 32)), ValueError, "Nq=0, Nk=8; expected at least 1"),
    (((0, 2, 8, 32), (0, 2, 8, 32), (0, 2, 8, 32)), ValueError, "B=0, H=2"),
])
def test_bad_shapes_raise(shapes, error, match):
    q, k, v = (torch.randn(s, device=DEVICE) for s in shapes)
    with pytest.raises(error, match=match):
        attention(q, k, v)


def test_bad_dtypes_and_devices_raise():
    q = torch.randn(1, 1, 4, 32, device=DEVICE)
    with pytest.raises(TypeError, match="torch.int64 is not supported"):
        attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError, match="float64 is not supported"):
        attention(q.double(), q.double(), q.double())
    with pytest.raises(TypeError, match="dtypes differ"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="devices differ"):
        attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="not divisible by 3 \\* num_heads"):
        attention_qkv_packed(torch.randn(1, 4, 100, device=DEVICE), 2)
    with pytest.raises(TypeError, match="qkv must be a tensor"):
        attention_qkv_packed([[1.0]], 1)
    with pytest.raises(ValueError, match="expected \\(B, N, 3\\*H\\*D\\)"):
        attention_qkv_packed(torch.randn(4, 96, device=DEVICE), 1)
    with pytest.raises(ValueError, match="head dim 16 is not supported"):
        attention_qkv_packed(torch.randn(1, 4, 96, device=DEVICE), 2)


@pytest.mark.reference_fallback
def test_cpu_without_interpreter_runs_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 2, 9, 32, requires_grad=True) for _ in range(3))
    out = attention(q, k, v)
    assert out.grad_fn is not None and "AttentionFunction" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, attention_reference(q, k, v), rtol=0, atol=0)
    qkv = torch.randn(1, 9, 3 * 64)
    torch.testing.assert_close(attention_qkv_packed(qkv, 2), merge_heads(attention_reference(*split_heads(qkv, 2))),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"):
        torch.ops.setr_kernels.attention_qkv_packed_fwd(qkv, 2, 0.125)  # the raw op: no fallback, a clear error


def test_torch_compile_traces_without_graph_break():
    H = 2
    qkv = torch.randn(1, 33, 3 * H * 32, device=DEVICE, requires_grad=True)
    dout = torch.randn(1, 33, H * 32, device=DEVICE)

    def block(x):  # projection output -> attention -> (B, N, C), like the ViT's attention module
        return attention_qkv_packed(x, H) * 2.0 + merge_heads(attention(*split_heads(x, H)))

    compiled = run_with_grads(torch.compile(block, backend="aot_eager", fullgraph=True), (qkv,), dout)
    eager = run_with_grads(block, (qkv,), dout)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck_custom_ops():
    q, k, v = (torch.randn(1, 2, n, 32, device=DEVICE) for n in (20, 37, 37))
    torch.library.opcheck(torch.ops.setr_kernels.attention_fwd.default, (q, k, v, 0.3))
    out, lse = torch.ops.setr_kernels.attention_fwd(q, k, v, 0.3)
    torch.library.opcheck(torch.ops.setr_kernels.attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, 0.3))
    qkv = torch.randn(2, 33, 3 * 64, device=DEVICE)
    torch.library.opcheck(torch.ops.setr_kernels.attention_qkv_packed_fwd.default, (qkv, 2, 0.2))
    out, lse = torch.ops.setr_kernels.attention_qkv_packed_fwd(qkv, 2, 0.2)
    torch.library.opcheck(torch.ops.setr_kernels.attention_qkv_packed_bwd.default,
                          (torch.randn_like(out), qkv, out, lse, 2, 0.2))


def ade20k_eval_token_counts():
    """Every token count of an ADE20K validation pass with mmseg's multi-scale + flip test pipeline:
    each image (any size with sides 128-2048 and aspect ratio up to 4, a superset of ADE20K's) is
    resized to fit (2048, 512) * ratio keeping its ratio, for ratios 0.5-1.75, then cut into 512
    slide windows (stride 341), smaller than the crop when the image is; tokens = 16x16 patches,
    with the class token (Naive, PUP) and without (MLA). Flipping keeps the size."""
    counts = set()
    for h in range(128, 2049, 16):
        for w in range(max(128, h // 4), min(2048, 4 * h) + 1, 16):
            for ratio in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75):
                rh, rw = rescale_size(h, w, (int(2048 * ratio), int(512 * ratio)))
                n = math.ceil(min(rh, 512) / 16) * math.ceil(min(rw, 512) / 16)
                counts |= {n, n + 1}
    return counts


def test_autotune_keys_bucket_evaluation_token_counts():
    for kernel in (attn._attn_fwd_kernel, attn._attn_bwd_dkdv_kernel, attn._attn_bwd_dq_kernel):
        assert kernel.keys == ["Q_BUCKET", "K_BUCKET", "HEAD_DIM"]
    counts = ade20k_eval_token_counts()
    keys = {tune_bucket(n) for n in counts}
    assert len(counts) > 40 and len(keys) <= 6, (len(counts), sorted(keys))
    # the bucket holds n (rounded up to a power of two) and whether n is a multiple of 16
    assert [tune_bucket(n) for n in (1024, 1025, 2048, 513, 512)] == [2049, 4096, 4097, 2048, 1025]


# --- GPU: SETR's real shapes ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [1024, 1025, 2305])
def test_gpu_setr_shapes(N, dtype):
    check_against_reference(2, 16, N, N, 64, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("D", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (97, 1023), (1023, 97), (4097, 4097)])
def test_gpu_head_dims_and_lengths(Nq, Nk, D):
    check_against_reference(2, 4, Nq, Nk, D, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_packed_setr_block_deterministic():
    H = 16
    qkv, dout, ours = packed_twice(4, 1025, H, 64)
    same, gold = packed_baselines(qkv, dout, H)
    assert_rule(ours, same, gold, ATOL[torch.bfloat16], ("out", "dqkv"))
