"""kernels/upsample_cross_entropy.py: the fused upsample + cross-entropy, loss and gradient against
F.interpolate + F.cross_entropy in float64.

On CPU the Triton kernels run under the interpreter (tests/conftest.py switches it on).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels.upsample import is_channels_last, upsample_bilinear
from kernels.upsample_cross_entropy import upsample_cross_entropy, upsample_cross_entropy_reference
from test_upsample import DEVICE, assert_close, bilinear64

ce = importlib.import_module("kernels.upsample_cross_entropy")

LOSS_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5),
            torch.bfloat16: dict(atol=1e-5, rtol=1e-3),
            torch.float16: dict(atol=1e-5, rtol=1e-3)}


def make_labels(B, C, HW, ignore_index=255, ignore_frac=0.2, label_dtype=torch.int64):
    labels = torch.randint(0, C, (B, *HW), device=DEVICE)
    labels[torch.rand(B, *HW, device=DEVICE) < ignore_frac] = ignore_index
    return labels.to(label_dtype)


def check_ce(B, C, hw, HW, align_corners=False, reduction="mean", dtype=torch.float32, labels=None,
             ignore_index=255, grad_scale=1.7):
    logits = (3 * torch.randn(B, C, *hw, device=DEVICE)).to(dtype).requires_grad_()
    if labels is None:
        labels = make_labels(B, C, HW, ignore_index)
    loss = upsample_cross_entropy(logits, labels, ignore_index=ignore_index, align_corners=align_corners,
                                  reduction=reduction)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    grad, = torch.autograd.grad(loss * grad_scale, logits)
    assert grad.dtype == dtype and grad.shape == logits.shape

    logits64 = logits.detach().double().requires_grad_()
    labels64 = labels.long()
    z = F.interpolate(logits64, size=HW, mode="bilinear", align_corners=align_corners)
    per_pixel = F.cross_entropy(z, labels64, ignore_index=ignore_index, reduction="none")
    n_valid = (labels64 != ignore_index).sum()
    denom = {"mean": labels.numel(), "sum": 1, "mean_valid": max(int(n_valid), 1)}[reduction]
    ref = per_pixel.sum() / denom
    grad64, = torch.autograd.grad(ref * grad_scale, logits64)
    assert_close(loss, ref, LOSS_TOL[dtype], "loss")
    # gradient: compare relative to its largest entry (most entries are tiny differences)
    rtol = 10 * LOSS_TOL[dtype]["rtol"]
    g_tol = dict(atol=rtol * float(grad64.abs().max()) + 1e-12, rtol=rtol)
    assert_close(grad, grad64, g_tol, "dlogits")
    return loss, grad


CE_CASES = [
    (2, 5, (4, 4), (16, 16)),       # x4 (Naive / aux heads)
    (2, 7, (6, 5), (12, 10)),       # x2 (PUP decode head)
    (1, 4, (5, 7), (13, 9)),        # non-integer scales, down in x
    (2, 3, (1, 6), (3, 24)),        # a 1 x N logit map
    (1, 6, (8, 8), (8, 8)),         # same size
]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("B, C, hw, HW", CE_CASES)
def test_upsample_cross_entropy_matches_reference(B, C, hw, HW, align_corners):
    check_ce(B, C, hw, HW, align_corners)


@pytest.mark.parametrize("reduction", ["mean", "mean_valid", "sum"])
def test_upsample_cross_entropy_reductions(reduction):
    check_ce(2, 19, (8, 8), (32, 32), reduction=reduction)


def test_upsample_cross_entropy_all_ignored():
    # one image fully ignored, then every pixel ignored: zero loss and gradient, never NaN
    labels = make_labels(2, 4, (12, 12))
    labels[1] = 255
    check_ce(2, 4, (6, 6), (12, 12), labels=labels)
    check_ce(2, 4, (6, 6), (12, 12), labels=labels, reduction="mean_valid")
    all_ignored = torch.full((2, 12, 12), 255, device=DEVICE)
    for reduction in ("mean", "mean_valid", "sum"):
        loss, grad = check_ce(2, 4, (6, 6), (12, 12), labels=all_ignored, reduction=reduction)
        assert float(loss.detach()) == 0.0 and torch.count_nonzero(grad) == 0


def test_upsample_cross_entropy_150_classes():
    # ADE20K's 150 classes, several class chunks in the online log-sum-exp on the GPU
    check_ce(1, 150, (5, 6), (20, 24))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upsample_cross_entropy_half_logits(dtype):
    check_ce(2, 6, (6, 6), (12, 12), dtype=dtype)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32])
def test_upsample_cross_entropy_label_dtypes(label_dtype):
    check_ce(2, 5, (4, 5), (8, 10), labels=make_labels(2, 5, (8, 10), label_dtype=label_dtype))


def test_upsample_cross_entropy_negative_ignore_index_and_channels_last():
    check_ce(1, 5, (4, 4), (8, 8), ignore_index=-100, labels=make_labels(1, 5, (8, 8), ignore_index=-100))
    logits = torch.randn(2, 6, 5, 5, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    labels = make_labels(2, 6, (10, 10))
    loss = upsample_cross_entropy(logits, labels)
    grad, = torch.autograd.grad(loss, logits)
    assert is_channels_last(grad)
    logits64 = logits.detach().double().requires_grad_()
    ref = upsample_cross_entropy_reference(logits64, labels)
    grad64, = torch.autograd.grad(ref, logits64)
    assert_close(loss, ref, LOSS_TOL[torch.float32], "loss")
    assert_close(grad, grad64, dict(atol=1e-7, rtol=1e-4), "dlogits")


def test_upsample_cross_entropy_small_blocks(monkeypatch):
    # the GPU's tile shapes: class chunks (online log-sum-exp), several class blocks and pixel tiles
    monkeypatch.setattr(ce, "CE_FWD_BLOCK", dict.fromkeys(ce.CE_FWD_BLOCK, (4, 16)))  # on every device type
    monkeypatch.setattr(ce, "CE_BWD_BLOCK", dict.fromkeys(ce.CE_BWD_BLOCK, (4, 8)))
    check_ce(1, 9, (3, 9), (6, 18))  # one-row tiles (BLOCK_H == 1), as on the GPU
    check_ce(1, 6, (3, 4), (7, 9), align_corners=True, reduction="mean_valid")  # 2 x 4 tiles


def test_upsample_cross_entropy_backward_is_deterministic():
    logits = torch.randn(2, 7, 6, 6, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    labels = make_labels(2, 7, (24, 24))
    first, = torch.autograd.grad(upsample_cross_entropy(logits, labels), logits)
    second, = torch.autograd.grad(upsample_cross_entropy(logits, labels), logits)
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))
    assert torch.equal(upsample_cross_entropy(logits, labels), upsample_cross_entropy(logits, labels))


def test_fused_loss_equals_classifier_after_upsample():
    # the algebra the heads rely on: a 1x1 classifier commutes with the bilinear upsample
    feats = torch.randn(2, 8, 6, 6, device=DEVICE, dtype=torch.float64)
    weight = torch.randn(5, 8, 1, 1, device=DEVICE, dtype=torch.float64)
    bias = torch.randn(5, device=DEVICE, dtype=torch.float64)
    labels = make_labels(2, 5, (24, 24))
    mmseg = F.cross_entropy(F.conv2d(F.interpolate(feats, size=(24, 24), mode="bilinear"), weight, bias),
                            labels, ignore_index=255, reduction="none").sum() / labels.numel()
    fused = upsample_cross_entropy(F.conv2d(feats, weight, bias).float(), labels)
    assert_close(fused, mmseg, LOSS_TOL[torch.float32], "loss")


# --- reference, dispatch, bad input, torch.library -----------------------------------------

@pytest.mark.parametrize("align_corners", [False, True])
def test_reference_matches_a_float64_formula(align_corners):
    """The CPU fallback against the loss written out in float64: bilinear64, then -log softmax at the
    label, ignored pixels 0, summed, over all pixels ("mean") or the valid ones ("mean_valid")."""
    logits = 3 * torch.randn(2, 4, 3, 5, device=DEVICE, dtype=torch.float64)
    labels = make_labels(2, 4, (7, 9))
    z = bilinear64(logits, (7, 9), align_corners)
    valid = labels != 255
    picked = z.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0] - z.exp().sum(1).log()
    total = -(picked * valid).sum()
    for dtype in (torch.float64, torch.float32):
        tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else LOSS_TOL[dtype]
        for reduction, denominator in (("mean", labels.numel()), ("mean_valid", valid.sum()), ("sum", 1)):
            loss = upsample_cross_entropy_reference(logits.to(dtype), labels, align_corners=align_corners,
                                                    reduction=reduction)
            assert_close(loss, total / denominator, tol, f"{dtype} {reduction}")


@pytest.mark.reference_fallback
def test_reference_dispatch(monkeypatch):
    # without CUDA or the interpreter, upsample_cross_entropy runs the reference: the kernel's values
    x = torch.randn(1, 2, 4, 4, device=DEVICE, requires_grad=True)
    labels = make_labels(1, 2, (8, 8))
    kernel = upsample_cross_entropy(x, labels, reduction="mean_valid")
    monkeypatch.setattr(ce, "use_triton", lambda *tensors: False)
    fallback = upsample_cross_entropy(x, labels, reduction="mean_valid")
    assert type(kernel.grad_fn).__name__ == "UpsampleCrossEntropyFunctionBackward"
    assert type(fallback.grad_fn).__name__ != "UpsampleCrossEntropyFunctionBackward"
    assert_close(fallback, kernel, LOSS_TOL[torch.float32], "loss")
    assert_close(torch.autograd.grad(fallback, x)[0], torch.autograd.grad(kernel, x)[0],
                 dict(atol=1e-6, rtol=1e-4), "dlogits")
    if DEVICE == "cpu":  # on CUDA a bad label is a device-side assert (test_bad_labels)
        with pytest.raises(ValueError, match="the first is 7"):
            upsample_cross_entropy(x, torch.full((1, 8, 8), 7, device=DEVICE))


def test_bad_inputs():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    labels = make_labels(2, 3, (8, 8))
    with pytest.raises(ValueError, match="labels have batch size 1, expected logits' batch size 2"):
        upsample_cross_entropy(x, labels[:1])
    with pytest.raises(ValueError, match=r"labels must be 3-D \(B, H, W\), got \(8, 8\)"):
        upsample_cross_entropy(x, labels[0])
    with pytest.raises(ValueError, match=r"logits must be 4-D \(B, C, h, w\), got \(3, 4, 4\)"):
        upsample_cross_entropy(x[0], labels)
    with pytest.raises(TypeError, match="labels dtype torch.float32 is not supported"):
        upsample_cross_entropy(x, labels.float())
    with pytest.raises(TypeError, match="logits dtype torch.int64"):
        upsample_cross_entropy(x.long(), labels)
    with pytest.raises(ValueError, match="reduction 'none' is not supported"):
        upsample_cross_entropy(x, labels, reduction="none")


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA a bad label is a device-side assert, which ends the process")
def test_bad_labels():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    labels = make_labels(2, 3, (8, 8))
    bad = labels.clone()
    bad[0, 1, 2] = 3  # == C
    bad[1, 5, 5] = 7
    bad[1, 6, 6] = -1
    with pytest.raises(ValueError, match=r"3 value\(s\) outside \[0, 3\) that are not ignore_index=255; "
                                         r"the first is 3"):
        upsample_cross_entropy(x, bad)
    with pytest.raises(ValueError, match=r"1 value\(s\) outside \[0, 3\) .* the first is 255"):
        upsample_cross_entropy(x, labels.clamp(max=2).index_put_((torch.tensor([0]),) * 3, torch.tensor(255)),
                               ignore_index=-100)


def test_custom_ops_opcheck():
    x = torch.randn(2, 3, 5, 4, device=DEVICE)
    labels = make_labels(2, 3, (10, 8))
    torch.library.opcheck(torch.ops.setr_kernels.upsample_cross_entropy_fwd, (x, labels, 255, False))
    _, _, lse = torch.ops.setr_kernels.upsample_cross_entropy_fwd(x, labels, 255, False)
    scale = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(torch.ops.setr_kernels.upsample_cross_entropy_bwd, (x, labels, lse, scale, 255, False))


def test_torch_compile_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.randn(2, 3, 4, 5, device=DEVICE, requires_grad=True)
    logits = torch.randn(2, 4, 4, 4, device=DEVICE, requires_grad=True)
    labels = make_labels(2, 4, (8, 8))

    def step(x, logits):
        y = upsample_bilinear(x, (8, 10))
        return y.square().mean() + upsample_cross_entropy(logits, labels, reduction="mean_valid")

    out = torch.compile(step, backend="aot_eager", fullgraph=True)(x, logits)
    grads = torch.autograd.grad(out, (x, logits))
    expected = step(x, logits)
    expected_grads = torch.autograd.grad(expected, (x, logits))
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    # the reference's label check runs on the device too: no graph break, no host sync
    reference = torch.compile(upsample_cross_entropy_reference, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(reference(logits, labels), upsample_cross_entropy_reference(logits, labels))


# --- real sizes on the GPU ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(128, 128), (256, 256), (32, 32)])
def test_upsample_cross_entropy_real_sizes_gpu(hw, dtype):
    check_ce(2, 150, hw, (512, 512), dtype=dtype)


@pytest.mark.gpu
def test_fused_loss_memory_and_determinism_gpu():
    logits = torch.randn(4, 150, 128, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = make_labels(4, 150, (512, 512))

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grad, = torch.autograd.grad(fn(), logits)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, grad

    fused, g1 = peak(lambda: upsample_cross_entropy(logits, labels))
    unfused, _ = peak(lambda: upsample_cross_entropy_reference(logits, labels))
    _, g2 = peak(lambda: upsample_cross_entropy(logits, labels))
    assert fused * 10 < unfused, (fused, unfused)
    assert torch.equal(g1.view(torch.int16), g2.view(torch.int16))
