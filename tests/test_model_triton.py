"""The model with impl='triton' (our kernels: compiled on CUDA, interpreted on CPU) matches impl='eager'."""
import os
import subprocess
import sys

import pytest
import torch

import kernels
import setr
from test_model import AUTOCAST_TOL, losses_and_grads, relative_error, tiny_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 matrix products (attention, convolutions) run in TF32 on the GPU
LOSS_TOL = dict(rtol=5e-3, atol=5e-3) if DEVICE == "cuda" else dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = dict(rtol=5e-2, atol=5e-3) if DEVICE == "cuda" else dict(rtol=1e-3, atol=1e-5)
OUT_TOL = dict(rtol=5e-3, atol=5e-3) if DEVICE == "cuda" else dict(rtol=1e-4, atol=1e-4)


def tiny_pair(head):
    """vit_tiny SETR with impl='eager' and the same weights with impl='triton', selective recompute on
    (as trained). MLA keeps one of its four aux heads: each is the same classifier + x16 fused loss,
    which costs the interpreter about 2 s."""
    eager = setr.build_setr(head, "vit_tiny", 7, img_size=32, impl="eager", recompute="selective").to(DEVICE)
    ours = setr.build_setr(head, "vit_tiny", 7, img_size=32, impl="triton", recompute="selective").to(DEVICE)
    if head == "mla":
        eager.auxiliary_head, ours.auxiliary_head = eager.auxiliary_head[:1], ours.auxiliary_head[:1]
    ours.load_state_dict(eager.state_dict())
    return eager, ours


@pytest.mark.parametrize("head", ["naive", "pup", "mla"])
def test_triton_model_matches_eager(head):
    """In float32: the same eval logits, loss terms and gradients as impl='eager'. Under torch.autocast
    (bf16, fp16), as a model-API user runs it: gradients in float32, losses and gradients within
    the autocast tolerance of eager's own test (tests/test_model.py) of float32's."""
    torch.manual_seed(3)
    eager, ours = tiny_pair(head)
    images, labels = (t.to(DEVICE) for t in tiny_batch())
    with torch.no_grad():  # before any training forward moves the BatchNorm statistics
        torch.testing.assert_close(ours.eval()(images), eager.eval()(images), **OUT_TOL)

    ref_losses, ref_grads = losses_and_grads(eager, images, labels)
    losses, grads = losses_and_grads(ours, images, labels)
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k], **LOSS_TOL, msg=k)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **GRAD_TOL, msg=name)

    for dtype, tol in AUTOCAST_TOL.items():
        losses, grads = losses_and_grads(ours, images, labels, autocast=dtype)
        assert {g.dtype for g in grads.values()} == {torch.float32}
        assert relative_error(losses, ref_losses) < tol and relative_error(grads, ref_grads) < tol, dtype


def test_triton_selective_recompute_changes_no_number():
    """impl='triton' with selective recompute: bitwise the losses and gradients of recompute none
    (the recomputed LayerNorm runs our kernel again; Naive's aux heads recompute an upsample)."""
    torch.manual_seed(5)
    images, labels = (t.to(DEVICE) for t in tiny_batch())
    model = setr.build_setr("naive", "vit_tiny", 7, img_size=32, impl="triton").to(DEVICE)
    ref_losses, ref_grads = losses_and_grads(model, images, labels)
    model.set_recompute("selective")
    losses, grads = losses_and_grads(model, images, labels)
    assert all(torch.equal(losses[k], ref_losses[k]) for k in ref_losses)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)


def test_per_op_override():
    model = setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=32,
                            impl={"attention": "triton", "layer_norm": "eager"})
    assert model.impl == {"attention": "triton", "layer_norm": "eager", "upsample": "eager", "loss": "eager"}
    assert model.backbone.layers[0].attn.attn.impl == "triton"
    assert model.backbone.layers[0].ln1.impl == "eager"
    assert not model.decode_head.classify_first


def test_kernel_tests_fail_when_a_reference_would_run(monkeypatch):
    # CPU tensors without the interpreter (e.g. CPU tensors on a CUDA machine) would run the
    # PyTorch references: in the kernel tests that fails instead of passing silently
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 2, 4, 32)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    calls = [lambda: kernels.attention(x, x, x), lambda: kernels.layer_norm(x, x[0, 0, 0], x[0, 0, 0]),
             lambda: kernels.upsample_bilinear(x, (8, 8)), lambda: kernels.upsample_cross_entropy(x, labels),
             lambda: setr.build_setr("pup", backbone="vit_tiny", num_classes=3, img_size=32, impl="triton")(
                 torch.randn(1, 3, 32, 32))]
    for call in calls:
        with pytest.raises(AssertionError, match="would run the PyTorch reference instead of the Triton kernel"):
            call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors on a CPU-only machine")
def test_interpreter_is_chosen_at_call_time():
    """TRITON_INTERPRET set after `import kernels` sends CPU tensors through the interpreted kernel, and
    unset sends them to the reference again: no caller has to set it before importing anything."""
    code = """if True:
        import os, torch, torch.nn.functional as F, kernels
        x, w, b = torch.randn(3, 40, requires_grad=True), torch.randn(40), torch.randn(40)
        names = []
        for value in ("1", "0"):
            os.environ["TRITON_INTERPRET"] = value
            y = kernels.layer_norm(x, w, b)
            torch.testing.assert_close(y, F.layer_norm(x, (40,), w, b, 1e-6))
            names.append(type(y.grad_fn).__name__)
        print(names[0] == "LayerNormFunctionBackward" != names[1])
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=REPO), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "True", out.stdout


def test_an_interpreted_launch_leaves_triton_language_as_it_was():
    """The interpreter patches triton.language while a kernel runs in it; a compiled launch later in
    the same process must find it unpatched (kernels.utils undoes what the interpreter leaves)."""
    import triton.language as tl

    def attributes():
        return {(obj.__name__, k): v for obj in (tl, tl.core, tl.math, tl.tensor, tl.dtype)
                for k, v in vars(obj).items()}

    before = attributes()
    labels = torch.randint(0, 5, (1, 16, 16), device=DEVICE)
    kernels.upsample_cross_entropy(torch.randn(1, 5, 4, 4, device=DEVICE, requires_grad=True), labels).backward()
    after = attributes()
    assert [k for k in before.keys() | after.keys() if before.get(k) is not after.get(k)] == []
