"""kernels/upsample.py: bilinear upsample, outputs and gradients against F.interpolate in float64.

On CPU the Triton kernels run under the interpreter (tests/conftest.py switches it on).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels.upsample import upsample_bilinear, upsample_bilinear_reference

up = importlib.import_module("kernels.upsample")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}
# the loss is a sum over many pixels: relative tolerances on the loss and on its gradient


def assert_close(actual, expected, tol, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")


# --- upsample_bilinear ----------------------------------------------------------------------

def check_upsample(shape, size, align_corners, dtype=torch.float32, channels_last=False):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = upsample_bilinear(x, size, align_corners=align_corners)
    assert y.dtype == dtype and y.shape == (*shape[:2], *size)
    assert up.is_channels_last(y) == up.is_channels_last(x)
    dy = torch.randn(y.shape, device=DEVICE).to(dtype)
    dx, = torch.autograd.grad(y, x, dy)
    assert dx.dtype == dtype

    x64 = x.detach().double().requires_grad_()
    y64 = F.interpolate(x64, size=size, mode="bilinear", align_corners=align_corners)
    dx64, = torch.autograd.grad(y64, x64, dy.double())
    assert_close(y, y64, TOL[dtype], "y")
    # dx sums up to (2 * scale)^2 terms of dy: scale the absolute tolerance by the largest footprint
    footprint = max(1.0, size[0] / shape[2]) * max(1.0, size[1] / shape[3])
    tol = dict(TOL[dtype], atol=TOL[dtype]["atol"] * footprint)
    assert_close(dx, dx64, tol, "dx")


UPSAMPLE_CASES = [
    ((2, 3, 8, 8), (16, 16)),       # x2, PUP
    ((1, 5, 4, 6), (16, 24)),       # x4, Naive / aux
    ((2, 2, 5, 7), (8, 11)),        # non-integer scales
    ((1, 3, 7, 5), (3, 9)),         # down in y, up in x
    ((2, 2, 1, 6), (3, 13)),        # a 1 x N image
    ((1, 2, 5, 1), (9, 1)),         # an N x 1 image, N x 1 output
    ((1, 4, 6, 6), (6, 6)),         # same size
    ((1, 1, 3, 4), (25, 30)),       # large scales (x8)
]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape, size", UPSAMPLE_CASES)
def test_upsample_matches_interpolate(shape, size, align_corners):
    check_upsample(shape, size, align_corners)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upsample_half_dtypes(dtype):
    check_upsample((2, 3, 8, 8), (16, 16), False, dtype)
    check_upsample((1, 2, 5, 7), (11, 9), True, dtype)


@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_channels_last(align_corners):
    check_upsample((2, 16, 6, 5), (12, 10), align_corners, channels_last=True)
    check_upsample((1, 8, 4, 4), (7, 9), align_corners, torch.bfloat16, channels_last=True)


def test_upsample_one_row_tiles(monkeypatch):
    # the GPU's tile shape: one output row per program (BLOCK_H == 1), several channel blocks
    monkeypatch.setattr(up, "FWD_TILE", dict.fromkeys(up.FWD_TILE, 32))  # on every device type
    monkeypatch.setattr(up, "BWD_TILE", dict.fromkeys(up.BWD_TILE, 16))
    assert up._tile(3, 20, 32, False, 32)[1] == 1
    check_upsample((1, 2, 6, 16), (12, 32), False)
    check_upsample((1, 40, 3, 2), (5, 3), True, channels_last=True)


def test_upsample_strided_input_and_expanded_grad():
    base = torch.randn(2, 6, 9, 12, device=DEVICE)
    x = base[:, ::2, 1:, ::3].requires_grad_()  # no unit stride anywhere
    y = upsample_bilinear(x, (13, 7))
    y.sum().backward()  # dy is an expanded scalar: all strides 0
    x64 = x.detach().double().requires_grad_()
    y64 = F.interpolate(x64, size=(13, 7), mode="bilinear", align_corners=False)
    y64.sum().backward()
    assert_close(y, y64, TOL[torch.float32], "y")
    assert_close(x.grad, x64.grad, dict(atol=1e-4, rtol=1e-5), "dx")


def test_upsample_int_size_and_empty_batch():
    x = torch.randn(1, 2, 3, 3, device=DEVICE)
    assert_close(upsample_bilinear(x, 5), F.interpolate(x.double(), size=(5, 5), mode="bilinear"),
                 TOL[torch.float32], "int size")
    empty = torch.randn(0, 2, 3, 3, device=DEVICE, requires_grad=True)
    y = upsample_bilinear(empty, (6, 6))
    assert y.shape == (0, 2, 6, 6)
    y.sum().backward()
    assert empty.grad.shape == empty.shape


def test_upsample_backward_is_deterministic():
    x = torch.randn(2, 5, 12, 10, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 5, 29, 23, device=DEVICE, dtype=torch.bfloat16)
    first, = torch.autograd.grad(upsample_bilinear(x, (29, 23)), x, dy)
    second, = torch.autograd.grad(upsample_bilinear(x, (29, 23)), x, dy)
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))


@pytest.mark.parametrize("align_corners", [False, True])
def test_axis_tables_match_pytorch_and_cover_footprints(align_corners):
    # the 1-D weights the tables encode against F.interpolate's own (linear mode, float64), and
    # start/window against the brute-force footprints, for many sizes
    for n_in, n_out in [(1, 1), (1, 5), (5, 1), (2, 3), (3, 2), (7, 16), (32, 512), (128, 512), (100, 37),
                        (33, 65), (256, 512), (19, 19), (64, 128)]:
        i0, lam, start, window = up.axis_tables(n_in, n_out, align_corners, torch.device("cpu"))
        i0, i1 = i0.long(), torch.clamp(i0.long() + 1, max=n_in - 1)
        ours = torch.zeros(n_in, n_out, dtype=torch.float64)
        cols = torch.arange(n_out)
        ours.index_put_((i0, cols), 1 - lam.double(), accumulate=True)
        ours.index_put_((i1, cols), lam.double(), accumulate=True)
        eye = torch.eye(n_in, dtype=torch.float64)[None]  # n_in channels, one unit impulse each
        ref = F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)[0]
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0, msg=lambda m: f"{n_in} -> {n_out}: {m}")
        for i in range(n_in):
            holds = ours[i].nonzero().flatten()  # the outputs that give input i a non-zero weight
            if len(holds):
                assert int(start[i]) <= int(holds[0]) and int(holds[-1]) < int(start[i]) + window, (n_in, n_out, i)
        if not align_corners and n_out % n_in == 0 and n_out > n_in > 1:
            assert window == 2 * (n_out // n_in)  # integer scales: exactly 2 * s, nothing wasted


# --- reference, dispatch, bad input, torch.library -----------------------------------------

def interpolation_matrix(n_in, n_out, align_corners):
    """(n_out, n_in) float64 weights of 1-D linear interpolation, from PyTorch's documented source
    index (align_corners=False: (j + 0.5) * n_in / n_out - 0.5, clamped at 0), entry by entry."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        if align_corners:
            src = j * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        else:
            src = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        lam = src - i0
        m[j, i0] += 1 - lam
        m[j, min(i0 + 1, n_in - 1)] += lam
    return m


def bilinear64(x, size, align_corners=False):
    """Bilinear resize of (B, C, H, W) in float64 as two matrix products: independent of F.interpolate."""
    my = interpolation_matrix(x.shape[2], size[0], align_corners).to(x.device)
    mx = interpolation_matrix(x.shape[3], size[1], align_corners).to(x.device)
    return torch.einsum("yh,bchw,xw->bcyx", my, x.double(), mx)


@pytest.mark.parametrize("align_corners", [False, True])
def test_reference_matches_a_float64_formula(align_corners):
    """The CPU fallback (F.interpolate in float32, float64 kept) against bilinear64, rounded once."""
    x = torch.randn(2, 3, 5, 7, device=DEVICE, dtype=torch.float64)
    for dtype, tol in ((torch.float64, dict(atol=1e-12, rtol=1e-12)), (torch.float32, TOL[torch.float32]),
                       (torch.bfloat16, TOL[torch.bfloat16])):
        y = upsample_bilinear_reference(x.to(dtype), (9, 4), align_corners=align_corners)
        assert y.dtype == dtype
        assert_close(y, bilinear64(x.to(dtype), (9, 4), align_corners), tol, str(dtype))


@pytest.mark.reference_fallback
def test_reference_dispatch(monkeypatch):
    # without CUDA or the interpreter, upsample_bilinear runs the reference: the kernel's values
    x = torch.randn(1, 2, 4, 5, device=DEVICE, requires_grad=True)
    dy = torch.randn(1, 2, 8, 9, device=DEVICE)
    kernel = upsample_bilinear(x, (8, 9))
    monkeypatch.setattr(up, "use_triton", lambda *tensors: False)
    fallback = upsample_bilinear(x, (8, 9))
    assert type(kernel.grad_fn).__name__ == "UpsampleBilinearFunctionBackward"
    assert type(fallback.grad_fn).__name__ != "UpsampleBilinearFunctionBackward"
    assert_close(fallback, kernel, TOL[torch.float32], "y")
    assert_close(torch.autograd.grad(fallback, x, dy)[0], torch.autograd.grad(kernel, x, dy)[0], TOL[torch.float32],
                 "dx")


def test_bad_inputs():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be 4-D \(B, C, H, W\), got shape \(3, 4, 4\)"):
        upsample_bilinear(x[0], (8, 8))
    with pytest.raises(ValueError, match=r"size must be two positive ints"):
        upsample_bilinear(x, (8, 0))
    with pytest.raises(ValueError, match=r"size must be two positive ints"):
        upsample_bilinear(x, (8, 8, 8))
    with pytest.raises(TypeError, match="size must be an int or a pair"):
        upsample_bilinear(x, None)
    with pytest.raises(TypeError, match="torch.int64 is not supported"):
        upsample_bilinear(x.long(), (8, 8))


def test_custom_ops_opcheck():
    x = torch.randn(2, 3, 5, 4, device=DEVICE)
    torch.library.opcheck(torch.ops.setr_kernels.upsample_bilinear_fwd, (x, 9, 7, False))
    torch.library.opcheck(torch.ops.setr_kernels.upsample_bilinear_fwd, (x.to(memory_format=torch.channels_last),
                                                                         8, 8, True))
    dy = torch.randn(2, 3, 9, 7, device=DEVICE)
    torch.library.opcheck(torch.ops.setr_kernels.upsample_bilinear_bwd, (dy, 5, 4, False, False))


# --- real sizes on the GPU ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, size", [((8, 256, 32, 32), (64, 64)), ((8, 256, 128, 128), (256, 256)),
                                         ((8, 256, 32, 32), (128, 128)), ((2, 150, 128, 128), (512, 512)),
                                         ((3, 19, 97, 65), (129, 300))])
def test_upsample_real_sizes_gpu(shape, size, dtype):
    check_upsample(shape, size, False, dtype)
    check_upsample(shape, size, False, dtype, channels_last=True)
