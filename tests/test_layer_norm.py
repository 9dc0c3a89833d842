"""kernels/layer_norm.py: outputs and all gradients against a float64 reference.

On CPU the Triton kernels run under the interpreter (tests/conftest.py switches it on).
"""
import importlib

import pytest
import torch

from kernels.layer_norm import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference

ln = importlib.import_module("kernels.layer_norm")  # the module (kernels.layer_norm is also a function name)

SHAPES = [(1, 1024), (1025, 1024), (7, 1000), (3, 5, 1500)]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(shape, dtype, param_dtype=None, device=DEVICE):
    c = shape[-1]
    param_dtype = param_dtype or dtype
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(c, device=device)).to(param_dtype).requires_grad_()
    b = (0.5 * torch.randn(c, device=device)).to(param_dtype).requires_grad_()
    return x, w, b


def leaf64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def assert_close(actual, expected, dtype, name):
    assert actual.shape == expected.shape, name
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def check_layer_norm(shape, dtype, param_dtype=None, eps=1e-6):
    x, w, b = make(shape, dtype, param_dtype)
    y = layer_norm(x, w, b, eps)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    assert dx.dtype == dtype and dw.dtype == w.dtype and db.dtype == b.dtype

    x64, w64, b64 = leaf64(x, w, b)
    y64 = layer_norm_reference(x64, w64, b64, eps)
    g64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    assert_close(y, y64, dtype, "y")
    for name, g, r in zip(("dx", "dweight", "dbias"), (dx, dw, db), g64):
        assert_close(g, r, dtype if name == "dx" else w.dtype, name)


def check_add_layer_norm(shape, dtype, param_dtype=None, residual_dtype=None, eps=1e-6):
    x, w, b = make(shape, dtype, param_dtype)
    r = torch.randn(shape, device=x.device).to(residual_dtype or dtype).requires_grad_()
    h, y = add_layer_norm(x, r, w, b, eps)
    assert h.dtype == dtype and y.dtype == dtype
    # h is x + residual rounded to x.dtype: exactly on the GPU; the interpreter truncates fp32 -> bf16
    # (triton/runtime/interpreter.py cast_impl) where the GPU rounds to nearest even, so allow 1 ulp there
    if h.is_cuda:
        assert torch.equal(h, (x + r).to(dtype))
    else:
        torch.testing.assert_close(h, (x + r).to(dtype), atol=0, rtol=torch.finfo(dtype).eps)
    dh, dy = torch.randn_like(h), torch.randn_like(y)
    dx, dr, dw, db = torch.autograd.grad((h, y), (x, r, w, b), (dh, dy))
    assert dr.dtype == r.dtype

    # float64 reference that rounds h like the kernel does (straight-through for the gradient)
    x64, r64, w64, b64 = leaf64(x, r, w, b)
    h64 = x64 + r64
    h64 = h64 + (h.detach().double() - h64).detach()
    y64 = layer_norm_reference(h64, w64, b64, eps)
    g64 = torch.autograd.grad((h64, y64), (x64, r64, w64, b64), (dh.double(), dy.double()))
    assert_close(y, y64, dtype, "y")
    for name, g, ref in zip(("dx", "dresidual", "dweight", "dbias"), (dx, dr, dw, db), g64):
        # x and residual both get the gradient of h, which lives in x.dtype
        assert_close(g, ref, dtype if name in ("dx", "dresidual") else w.dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(shape, dtype):
    check_layer_norm(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_layer_norm(shape, dtype):
    check_add_layer_norm(shape, dtype)


@pytest.mark.parametrize("shape", [(7, 1000), (2, 3, 96)])
def test_float16(shape):
    check_layer_norm(shape, torch.float16)
    check_add_layer_norm(shape, torch.float16)


def test_mixed_dtypes():
    # fp32 parameters with bf16 activations (autocast / FSDP style), grads in the param dtype
    check_layer_norm((97, 1024), torch.bfloat16, param_dtype=torch.float32)
    check_add_layer_norm((97, 1024), torch.bfloat16, param_dtype=torch.float32, residual_dtype=torch.float32)
    check_layer_norm((5, 257), torch.float32, param_dtype=torch.bfloat16)


def test_weight_and_bias_grads_are_rounded_once_to_their_own_dtype():
    x, w, _ = make((33, 200), torch.float32, param_dtype=torch.bfloat16)
    b = torch.randn(200, device=x.device, requires_grad=True)  # float32 bias beside a bfloat16 weight
    dy = torch.randn(33, 200, device=x.device)
    dw, db = torch.autograd.grad(layer_norm(x, w, b), (w, b), dy)
    assert dw.dtype == torch.bfloat16 and db.dtype == torch.float32
    assert_close(db, dy.double().sum(0), torch.float32, "dbias")  # float32-exact, not bf16-rounded


def test_narrow_and_eps():
    # several rows per program (narrow rows) and a large eps that matters
    check_layer_norm((67, 40), torch.float32, eps=1e-1)
    check_add_layer_norm((67, 40), torch.float32, eps=1e-1)


def test_non_contiguous_input():
    # the heads normalize an NCHW map seen as (n, hw, c): a transposed view
    x0 = torch.randn(2, 96, 33, device=DEVICE, requires_grad=True)
    x = x0.transpose(1, 2)
    _, w, b = make((96,), torch.float32)
    y = layer_norm(x, w, b)
    y.transpose(1, 2).sum().backward()  # dy arrives non-contiguous too
    x64, w64, b64 = leaf64(x0, w, b)
    y64 = layer_norm_reference(x64.transpose(1, 2), w64, b64)
    y64.transpose(1, 2).sum().backward()
    assert_close(y, y64, torch.float32, "y")
    assert_close(x0.grad, x64.grad, torch.float32, "dx")
    assert_close(w.grad, w64.grad, torch.float32, "dweight")
    # a row-strided slice with unit column stride (read in place, no copy)
    xs = torch.randn(9, 200, device=DEVICE)[:, :100]
    _, w, b = make((100,), torch.float32)
    assert_close(layer_norm(xs, w, b), layer_norm_reference(*leaf64(xs, w, b)), torch.float32, "y strided")


def test_unused_outputs_of_add_layer_norm():
    x, w, b = make((9, 64), torch.float32)
    r = torch.randn(9, 64, device=DEVICE, requires_grad=True)
    h, y = add_layer_norm(x, r, w, b)
    dx_h_only, = torch.autograd.grad(h.sum(), x, retain_graph=True)
    assert torch.equal(dx_h_only, torch.ones_like(x))
    dx_y_only, dr_y_only = torch.autograd.grad((y * y).sum(), (x, r))
    x64, w64, b64 = leaf64(x, w, b)
    y64 = layer_norm_reference(x64 + r.detach().double(), w64, b64)
    ref, = torch.autograd.grad((y64 * y64).sum(), x64)
    assert_close(dx_y_only, ref, torch.float32, "dx")
    assert torch.equal(dx_y_only, dr_y_only)


def test_empty_rows():
    x, w, b = make((0, 64), torch.float32)
    y = layer_norm(x, w, b)
    assert y.shape == (0, 64)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("fused", [False, True])
def test_backward_is_deterministic(fused):
    x, w, b = make((257, 1024), torch.bfloat16)  # 65 row tiles over several programs
    r = torch.randn_like(x)
    dy = torch.randn_like(x)

    def grads():
        if fused:
            h, y = add_layer_norm(x, r, w, b)
            return torch.autograd.grad((h, y), (x, w, b), (dy, dy))
        return torch.autograd.grad(layer_norm(x, w, b), (x, w, b), dy)

    first, second = grads(), grads()
    for a, c in zip(first, second):
        assert torch.equal(a.view(torch.int16), c.view(torch.int16))


def test_backward_partials_cover_every_row(monkeypatch):
    # many programs, each with several loop steps and a ragged last chunk
    monkeypatch.setattr(ln, "BWD_TILE", 2 * 128)
    check_layer_norm((301, 100), torch.float32)


def test_bad_inputs():
    x, w, b = make((4, 64), torch.float32)
    wide = torch.randn(2, ln.MAX_WIDTH + 1, device=DEVICE)
    wide_w = torch.ones(ln.MAX_WIDTH + 1, device=DEVICE)
    with pytest.raises(ValueError, match=f"width {ln.MAX_WIDTH + 1} "):
        layer_norm(wide, wide_w, wide_w)
    with pytest.raises(ValueError, match=r"weight has shape \(63,\), expected \(64,\)"):
        layer_norm(x, w[:63], b)
    with pytest.raises(ValueError, match=r"bias has shape \(2, 32\)"):
        layer_norm(x, w, b.detach().view(2, 32))
    with pytest.raises(TypeError, match="torch.int64 is not supported"):
        layer_norm(torch.ones(4, 64, dtype=torch.long, device=DEVICE), w, b)
    with pytest.raises(TypeError, match="weight: dtype torch.int32"):
        layer_norm(x, torch.ones(64, dtype=torch.int32, device=DEVICE), b)
    with pytest.raises(TypeError, match="dtype torch.float64 is not supported"):
        layer_norm(x.double(), w, b)
    with pytest.raises(TypeError, match="weight must be a tensor"):
        layer_norm(x, None, b)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 32\)"):
        add_layer_norm(x, torch.randn(4, 32, device=DEVICE), w, b)
    with pytest.raises(TypeError, match="residual: dtype torch.int64"):
        add_layer_norm(x, torch.ones(4, 64, dtype=torch.long, device=DEVICE), w, b)


def test_reference_matches_torch():
    x, w, b = make((5, 3, 100), torch.bfloat16, torch.float32)
    expected = torch.nn.functional.layer_norm(x.float(), (100,), w, b, 1e-6).to(torch.bfloat16)
    torch.testing.assert_close(layer_norm_reference(x, w, b), expected, **TOL[torch.bfloat16])
    h, y = add_layer_norm_reference(x, x, w, b)
    torch.testing.assert_close(h, 2 * x)


def test_custom_ops_opcheck():
    x, w, b = (t.detach() for t in make((6, 40), torch.float32))
    r = torch.randn_like(x)
    y, mean, rstd = torch.ops.setr_kernels.layer_norm_fwd(x, w, b, 1e-6)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.setr_kernels.layer_norm_fwd, (x, w, b, 1e-6))
    torch.library.opcheck(torch.ops.setr_kernels.add_layer_norm_fwd, (x, r, w, b, 1e-6))
    torch.library.opcheck(torch.ops.setr_kernels.layer_norm_bwd, (dy, x, w, mean, rstd, None))
    torch.library.opcheck(torch.ops.setr_kernels.layer_norm_bwd, (dy, x, w, mean, rstd, r))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_without_graph_breaks(backend):
    import torch._dynamo

    torch._dynamo.reset()
    x, w, b = make((2, 7, 64), torch.float32)
    r = torch.randn(2, 7, 64, device=DEVICE, requires_grad=True)

    def block(x, r):
        h, y = add_layer_norm(x, r, w, b)
        return h + layer_norm(y, w, b)

    out = torch.compile(block, backend=backend, fullgraph=True)(x, r)
    grads = torch.autograd.grad(out.square().sum(), (x, r, w, b))
    expected = block(x, r)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, r, w, b))
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 1025, 1024), (8, 2305, 1024), (8200, 1500), (4096, 8192)])
def test_real_sizes_gpu(shape, dtype):
    check_layer_norm(shape, dtype)
    check_add_layer_norm(shape, dtype, param_dtype=torch.float32)
