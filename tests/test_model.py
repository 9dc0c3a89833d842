import copy

import pytest
import torch
import torch.nn.functional as F
from reference import ref_json

import setr
from setr import layers
from setr.constants import HEADS
from setr.vit import resize_pos_embed
from train.config import get_preset
from train.parallelize import apply_recompute

# torch.autocast against float32: largest relative error of the whole gradient (all parameters as one
# vector) and of the losses and eval logits; measured on vit_tiny up to 0.13 (bf16) and 0.03 (fp16,
# impl=triton on torch 2.11, whose CPU fp16 ops around our kernels differ from 2.13's: 0.009 there)
AUTOCAST_TOL = {torch.bfloat16: 0.25, torch.float16: 0.05}
# ... of each parameter's gradient, relative to its own norm: measured (test_autocast_matches_float32,
# torch 2.13 and 2.11) up to 0.41 (bf16) and 0.17 (fp16), in the heads' normalization layers, whose
# gradients sum a few nearly cancelling terms (the first BatchNorm sees 2 x 3 positions)
PARAM_GRAD_TOL = {torch.bfloat16: 0.7, torch.float16: 0.3}
# ... and of a gradient that is zero but for rounding in float32 (a LayerNorm bias that a 1x1 conv +
# BatchNorm cancel, MLA's unused cls token), relative to the whole gradient's norm: up to 3.3e-5 (bf16)
ZERO_GRAD_TOL = {torch.bfloat16: 3e-4, torch.float16: 1e-4}


def tiny(head, impl="eager", **kw):
    return setr.build_setr(head, backbone="vit_tiny", num_classes=7, img_size=64, impl=impl, **kw)


def tiny_batch(batch=1, size=(32, 48)):
    """Images and labels (some ignored) of an odd size (2 x 3 tokens)."""
    images, labels = torch.randn(batch, 3, *size), torch.randint(0, 7, (batch, *size))
    labels[0, :3] = 255
    return images, labels


def losses_and_grads(model, images, labels, autocast=None):
    """One training forward + backward, as a model-API user runs it, under torch.autocast(autocast)
    when given: the detached loss terms and {name: gradient}."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None):
        losses = model(images, labels)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad for n, p in model.named_parameters()}


def relative_error(values, ref):
    """||values - ref|| / ||ref|| over every entry of two {name: tensor} dicts taken as one vector."""
    flat = lambda d: torch.cat([d[k].double().flatten() for k in ref])
    return ((flat(values) - flat(ref)).norm() / flat(ref).norm()).item()


def grad_errors(grads, ref):
    """Parameter by parameter: {name: ||g - ref|| / ||ref||} where the reference gradient is not zero,
    and {name: ||g - ref|| / ||whole ref gradient||} where it is zero but for rounding (< 1e-6 of the
    whole gradient's norm; measured: < 2e-9, the smallest other 5e-5)."""
    whole = torch.cat([r.double().flatten() for r in ref.values()]).norm()
    own, zero = {}, {}
    for n, r in ref.items():
        error, norm = (grads[n].double() - r.double()).norm(), r.double().norm()
        if norm >= 1e-6 * whole:
            own[n] = (error / norm).item()
        else:
            zero[n] = (error / whole).item()
    return own, zero


@pytest.mark.parametrize("head", HEADS)
def test_parameter_counts_and_keys_equal_mmseg(head):
    model = setr.build_setr(head, device="meta")
    counts = ref_json("mmseg_setr_params.json")[head]
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    assert sum(p.numel() for p in model.backbone.parameters()) == counts["backbone"]
    assert sum(p.numel() for p in model.decode_head.parameters()) == counts["decode_head"]
    assert [sum(p.numel() for p in a.parameters()) for a in model.auxiliary_head] == counts["auxiliary_heads"]
    keys = ref_json(f"mmseg_setr_{head}_keys.json")
    state = model.state_dict()
    assert list(state) == list(keys)
    assert {k: list(v.shape) for k, v in state.items()} == keys


@pytest.mark.parametrize("head", HEADS)
def test_cityscapes_models_equal_mmseg(head):
    """Each {head}_cityscapes preset's model has the keys, in order, and shapes of mmseg's
    setr_vit-l_{head}_8xb1-80k_cityscapes-768x768.py model (2305 tokens, 19 classes, Naive's
    one-conv aux heads), so the released checkpoints load strictly."""
    cfg = get_preset(f"{head}_cityscapes").model
    model = setr.build_setr(cfg.head, cfg.backbone, cfg.num_classes, img_size=(768, 768), aux=cfg.aux,
                            aux_num_convs=cfg.aux_num_convs, device="meta")
    keys = ref_json("mmseg_setr_cityscapes_keys.json")[head]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys
    assert list(model.state_dict()) == list(keys)


def test_patch_bias_false_is_1024_fewer():
    model = setr.build_setr("pup", patch_bias=False, device="meta")
    counts = ref_json("mmseg_setr_params.json")["pup"]
    assert sum(p.numel() for p in model.parameters()) == counts["total"] - 1024


@pytest.mark.parametrize("head", HEADS)
def test_lr_groups_match_mmseg(head):
    """'head' substring selects the 10x-lr parameters; the MLA neck stays at base lr."""
    model = setr.build_setr(head, device="meta")
    per_lr = ref_json("mmseg_setr_params.json")[head]["optimizer"]["params_per_lr"]
    head_params = sum(p.numel() for n, p in model.named_parameters() if "head" in n)
    base_params = sum(p.numel() for n, p in model.named_parameters() if "head" not in n)
    assert sorted([head_params, base_params]) == sorted(per_lr.values())
    assert base_params == max(per_lr.values())


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (40, 56)])
def test_eval_logits_at_input_resolution(head, size):
    model = tiny(head).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7, *size)
    assert torch.isfinite(out).all()


def test_backbone_features_nchw():
    model = tiny("pup")
    feats = model.backbone(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 128, 4, 6)] * 4
    mla = tiny("mla")
    assert mla.backbone(torch.randn(1, 3, 32, 32))[0].shape == (1, 128, 2, 2)


def test_vit_large_token_count_and_out_indices():
    model = setr.build_setr("pup", device="meta")
    assert model.backbone.pos_embed.shape == (1, 1025, 1024)
    assert model.backbone.out_indices == (9, 14, 19, 23)
    mla = setr.build_setr("mla", device="meta")
    assert mla.backbone.out_indices == (5, 11, 17, 23) and not mla.backbone.with_cls_token


@pytest.mark.parametrize("head", HEADS)
def test_head_output_shapes_at_512(head):
    """Decode/aux output sizes at 512 input, from the 32x32 token grid: Naive x4 and MLA x4 at
    1/4 of the input, PUP four x2 steps to the full size; aux heads at the full size (MLA: 1/16)."""
    model = setr.build_setr(head, device="meta")
    feats = [torch.empty(1, 1024, 32, 32, device="meta")] * 4
    if head == "mla":
        feats = model.neck(feats)
        assert [tuple(f.shape) for f in feats] == [(1, 256, 32, 32)] * 4
    logits, out_size = model.decode_head(feats)
    expected = {"naive": (128, 128), "pup": (512, 512), "mla": (128, 128)}[head]
    assert tuple(logits.shape) == (1, 150, *expected) and out_size == expected
    aux_expected = (32, 32) if head == "mla" else (512, 512)
    for aux in model.auxiliary_head:
        logits, out_size = aux(feats)
        assert tuple(logits.shape) == (1, 150, *aux_expected)


def test_mla_neck_output_order():
    """Neck output 0 depends on the deepest input only; output 3 on all four."""
    model = tiny("mla").eval()
    feats = [torch.randn(1, 128, 4, 4, requires_grad=True) for _ in range(4)]
    outs = model.neck(feats)
    for j, out in enumerate(outs):
        grads = torch.autograd.grad(out.sum(), feats, allow_unused=True, retain_graph=True)
        depends = [g is not None and g.abs().sum() > 0 for g in grads]
        assert depends == [i >= 3 - j for i in range(4)], (j, depends)


@pytest.mark.parametrize("head", HEADS)
def test_train_loss_terms(head):
    model = tiny(head).train()
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 7, (2, 64, 64))
    labels[:, :8] = 255
    losses = model(x, labels)
    n_aux = 4 if head == "mla" else 3
    assert sorted(losses) == sorted(["decode"] + [f"aux{i}" for i in range(n_aux)])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.patch_embed.projection.weight.grad is not None


def loss_reference(logits, labels, ignore_index=255):
    """mmseg's loss from log-softmax by hand, in float64: logits resized to the label size,
    ignored pixels 0, summed over the pixels and divided by all of them."""
    up = F.interpolate(logits.double(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    logp = up - up.logsumexp(dim=1, keepdim=True)
    valid = labels != ignore_index
    picked = logp.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return -(picked * valid).sum() / labels.numel(), -picked[valid].mean()


def test_loss_is_mmseg_reduction_and_float64_stays_float64():
    """CE of logits resized to the label size, ignored pixels 0, divided by ALL pixels; float64
    logits give a float64 loss, half-precision logits a float32 one."""
    logits = torch.randn(2, 5, 8, 9, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 31, 35))
    labels[0, :10] = 255
    expected, mean_over_valid = loss_reference(logits, labels)
    got = layers.seg_loss(logits, labels, 255, "eager")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.isclose(got, mean_over_valid)
    half = logits.to(torch.bfloat16)
    got = layers.seg_loss(half, labels, 255, "eager")
    assert got.dtype == torch.float32
    # the resize runs in bf16 (as under mmseg's autocast), the cross-entropy in float32
    up = F.interpolate(half, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(got.double(), loss_reference(up, labels)[0], rtol=1e-6, atol=1e-6)


def test_float64_model_resizes_pos_embed_in_float64():
    """A float64 model run at another grid (pos-embed resized on the fly) equals one built for
    that grid holding the pos-embed resized independently in float64, to float64 precision."""
    torch.manual_seed(4)
    model = tiny("naive").double().eval()  # 4x4 grid
    state = model.state_dict()
    grid = state["backbone.pos_embed"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 2), mode="bilinear", align_corners=False)
    state["backbone.pos_embed"] = torch.cat([state["backbone.pos_embed"][:, :1],
                                             resized.flatten(2).transpose(1, 2)], dim=1)
    exact = setr.build_setr("naive", backbone="vit_tiny", num_classes=7, img_size=(96, 32),
                            dtype=torch.float64).eval()
    exact.load_state_dict(state)
    x = torch.randn(1, 3, 96, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), exact(x), rtol=1e-12, atol=1e-12)
    half = resize_pos_embed(model.backbone.pos_embed.detach().to(torch.bfloat16), (4, 4), (6, 2))
    assert half.dtype == torch.bfloat16


def test_impl_names_per_op():
    """A name means one thing per op; a per-op name that does not exist for the op is refused."""
    eager = {op: "eager" for op in layers.OP_IMPLS}
    assert layers.resolve_impl("eager") == eager
    assert layers.resolve_impl("sdpa") == {**eager, "attention": "sdpa"}
    assert layers.resolve_impl("triton") == {op: "triton" for op in layers.OP_IMPLS}
    assert layers.resolve_impl({"loss": "triton"}) == {**eager, "loss": "triton"}
    for op in ("layer_norm", "upsample", "loss"):
        with pytest.raises(ValueError, match=f"impl\\['{op}'\\] = 'sdpa' is not an implementation of {op}"):
            layers.resolve_impl({op: "sdpa"})
    with pytest.raises(ValueError, match="unknown op.*'norm'"):
        layers.resolve_impl({"norm": "triton"})
    with pytest.raises(ValueError, match="impl 'cuda'; expected one of"):
        layers.resolve_impl("cuda")


def test_sdpa_model_calls_scaled_dot_product_attention(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        tiny("pup", impl="eager").eval()(torch.randn(1, 3, 32, 32))
        assert not calls
        tiny("pup", impl="sdpa").eval()(torch.randn(1, 3, 32, 32))
    assert len(calls) == 4  # one per block of vit_tiny


@pytest.mark.parametrize("head", HEADS)
def test_eager_matches_sdpa(head):
    torch.manual_seed(1)
    eager = tiny(head).eval()
    sdpa = tiny(head, impl="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head", HEADS)
def test_classify_first_equals_mmseg_order(head):
    """The 1x1 classifier commutes with the head's last bilinear upsample: same eval logits,
    same loss terms and same gradients as mmseg's order (eager ops on both sides)."""
    torch.manual_seed(2)
    model = tiny(head).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 64, 64))
    labels[1, 20:30] = 255
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def run(classify_first):
        model.load_state_dict(initial)  # same BN running statistics in both runs
        for m in [model.decode_head, *model.auxiliary_head]:
            if hasattr(m, "classify_first"):
                m.classify_first = classify_first
        model.zero_grad()
        losses = model(x, labels)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.eval()
        with torch.no_grad():
            logits = model(x)
        model.train()
        return losses, grads, logits

    ref_losses, ref_grads, ref_logits = run(False)
    losses, grads, logits = run(True)
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-6, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-6, atol=1e-7, msg=n)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("head", HEADS)
def test_autocast_matches_float32(head):
    """The AMP pattern of the model API (torch.autocast around the forward, backward after it) in bf16
    and fp16, eager and sdpa, selective recompute on: losses, gradients and eval logits close to
    float32's, gradients in the parameters' dtype; recompute changes no bit under autocast either."""
    torch.manual_seed(4)
    images, labels = tiny_batch()
    for impl in ("eager", "sdpa"):
        model = setr.build_setr(head, "vit_tiny", 7, img_size=32, impl=impl, recompute="selective").eval()
        ref_logits = model(images).detach()  # before any training forward moves the BatchNorm statistics
        for dtype, tol in AUTOCAST_TOL.items():
            with torch.autocast("cpu", dtype=dtype):
                assert relative_error({"x": model(images)}, {"x": ref_logits}) < tol, (impl, dtype)
        ref_losses, ref_grads = losses_and_grads(model, images, labels)
        for dtype, tol in AUTOCAST_TOL.items():
            losses, grads = losses_and_grads(model, images, labels, autocast=dtype)
            assert {g.dtype for g in grads.values()} == {torch.float32}, (impl, dtype)
            assert relative_error(losses, ref_losses) < tol and relative_error(grads, ref_grads) < tol, (impl, dtype)
            own, zero = grad_errors(grads, ref_grads)
            bad = {n: e for n, e in own.items() if not e < PARAM_GRAD_TOL[dtype]}
            bad.update((n, e) for n, e in zero.items() if not e < ZERO_GRAD_TOL[dtype])
            assert not bad, (impl, dtype, bad)
            model.set_recompute("none")
            plain_losses, plain_grads = losses_and_grads(model, images, labels, autocast=dtype)
            model.set_recompute("selective")
            assert all(torch.equal(plain_grads[n], grads[n]) for n in grads), (impl, dtype)
            assert all(torch.equal(plain_losses[k], losses[k]) for k in losses), (impl, dtype)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_recompute_keeps_less_and_changes_no_number(impl):
    """Recompute policies (the model's selective one; full = whole blocks checkpointed, a training
    setting) keep fewer bytes for the backward and give bitwise the losses and gradients of none.
    Naive: its aux heads' second conv reads a recomputed upsample."""
    torch.manual_seed(5)
    images, labels = tiny_batch()
    plain = setr.build_setr("naive", "vit_tiny", 7, img_size=32, impl=impl)
    results = {}
    for policy in ("none", "selective", "full"):
        model = copy.deepcopy(plain)
        apply_recompute(model, policy)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            results[policy] = losses_and_grads(model, images, labels)
        results[policy] += (sum(saved),)
    assert results["none"][2] > results["selective"][2] > results["full"][2]
    for policy in ("selective", "full"):  # full renames the blocks' parameters (checkpoint wrapper): by order
        (losses, grads, _), (ref_losses, ref_grads, _) = results[policy], results["none"]
        assert all(torch.equal(losses[k], ref_losses[k]) for k in ref_losses), policy
        assert all(torch.equal(g, ref) for g, ref in zip(grads.values(), ref_grads.values(), strict=True)), policy


def test_pos_embed_resized_for_other_sizes():
    model = tiny("naive").eval()
    x = torch.randn(1, 3, 96, 32)  # 6x2 grid from the stored 4x4 grid
    tokens, hw = model.backbone.tokens(x)
    assert hw == (6, 2) and tokens.shape == (1, 13, 128)


def test_patch_embed_pads_corner():
    model = tiny("pup").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70)).shape == (1, 7, 50, 70)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown head"):
        setr.build_setr("fcn", device="meta")
    with pytest.raises(ValueError, match="unknown backbone"):
        setr.build_setr("pup", backbone="vit_huge", device="meta")
    with pytest.raises(ValueError, match="impl"):
        setr.build_setr("pup", impl="cuda", device="meta")
    with pytest.raises(ValueError, match="labels"):
        tiny("pup").train()(torch.randn(2, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long))


def test_forward_flops_vit_large():
    model = setr.build_setr("pup", device="meta")
    n, c = 1025, 1024
    block = 2 * n * c * 3 * c + 4 * n * n * c + 2 * n * c * c + 16 * n * c * c
    assert model.backbone.forward_flops(512, 512) == 2 * 1024 * c * 768 + 24 * block
    assert model.forward_flops(512, 512) > model.backbone.forward_flops(512, 512)


def test_meta_build_then_init():
    """Build on the meta device, materialize with to_empty, then init_weights: a usable model."""
    model = setr.build_setr("naive", backbone="vit_tiny", num_classes=5, img_size=64, device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(t.float()).all(), name
    assert model.decode_head.up_convs[0][0].bn.running_var.eq(1).all()
    meta = setr.build_setr("naive", backbone="vit_tiny", num_classes=5, img_size=64, recompute="selective",
                           device="meta")  # shape-only training step (FLOP counting), recomputing as trained
    sum(meta(torch.empty(1, 3, 64, 64, device="meta"), torch.zeros(1, 64, 64, dtype=torch.long, device="meta"))
        .values()).backward()


@pytest.mark.slow
def test_vit_large_pup_forward_512_on_cpu():
    model = setr.build_setr("pup").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 512))
    assert out.shape == (1, 150, 512, 512)
    assert torch.isfinite(out).all()
