"""The memory planner (bench/memory_plan.py) against what a real CPU step keeps for backward."""
import copy
import json
import os
import re

import pytest
import torch

import setr
from bench import memory_estimate, memory_plan
from train.parallelize import apply_activation_checkpointing
from train.sync_batchnorm import convert_sync_batchnorm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(head="pup", backbone="vit_tiny", num_classes=7, crop=32)  # no aux heads: 3x faster interpreted


def saved_for_backward_bytes(model, images, labels):
    """Bytes of the distinct storages autograd saves in a real forward (parameters and inputs
    excluded: the planner counts those in their own categories); runs the backward too."""
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), images, labels]}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in excluded:
            saved[st.data_ptr()] = st  # keeps it alive: no address is reused while counting
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(images, labels)
        loss = sum(losses.values())
    loss.backward()
    return sum(st.nbytes() for st in saved.values())


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels on CPU tensors, "
                              "through the interpreter (with CUDA present, CPU tensors would take the references)")


@pytest.mark.parametrize("impl", ["eager", "sdpa", pytest.param("triton", marks=CPU_ONLY)])
def test_planned_activations_equal_the_bytes_saved_for_backward(impl):
    """Triton runs through the interpreter here, planned through the custom ops' fake versions."""
    plan = memory_plan.plan(TINY["head"], impl, batch=2, precision="fp32", crop=TINY["crop"],
                            backbone=TINY["backbone"], num_classes=TINY["num_classes"], aux=False)
    model = setr.build_setr(TINY["head"], TINY["backbone"], TINY["num_classes"], img_size=TINY["crop"], impl=impl, aux=False)
    convert_sync_batchnorm(model.train())
    images = torch.randn(2, 3, TINY["crop"], TINY["crop"])
    labels = torch.randint(0, TINY["num_classes"], (2, TINY["crop"], TINY["crop"]))
    real = saved_for_backward_bytes(model, images, labels)
    assert real > 0
    assert plan["saved_activations"] == pytest.approx(real, rel=0.05), (plan["saved_activations"], real)


def test_triton_plan_of_pup_512_never_holds_full_resolution_logits():
    """The fused upsample + cross-entropy is planned through its fake op: no (B, 150, 512, 512)
    tensor anywhere in the step (eager, the control, has them in its loss). The heads and the
    loss are those of ViT-L; the backbone width does not change them."""
    full = 2 * 150 * 512 * 512
    kw = dict(batch=2, crop=512, backbone="vit_tiny", num_classes=150)
    ours = memory_plan.plan("pup", "triton", **kw)["modules"]
    assert ours["loss"]["largest"] is not None
    assert max(m["largest"][0] for m in ours.values() if m["largest"]) < full
    assert ours["loss"]["largest"][1] == [2, 150, 256, 256]  # the logits before the fused x2 upsample
    eager = memory_plan.plan("pup", "eager", **kw)["modules"]
    assert eager["loss"]["largest"][1] == [2, 150, 512, 512]


def test_compile_and_unknown_impl_are_refused():
    with pytest.raises(memory_plan.PlanError, match="compile"):
        memory_plan.plan("pup", "triton", batch=1, compile_=True)
    with pytest.raises(memory_plan.PlanError, match="impl 'flash'"):
        memory_plan.plan("pup", "flash", batch=1)


def test_real_step_code_path_on_cpu():
    """What runs on a GPU beside the plan: two real steps; on CPU the peak is None."""
    out = memory_plan.measure(TINY["head"], "eager", batch=2, precision="fp32", crop=TINY["crop"],
                              backbone=TINY["backbone"], num_classes=TINY["num_classes"], aux=False, device="cpu")
    assert out["measured_peak"] is None
    assert out["grad_norm"] > 0 and out["grad_norm"] == out["grad_norm"]


def test_recomputation_in_the_backward_changes_no_number():
    """impl='triton' recomputes GELU, the pre-attention LayerNorm and the heads' upsamples in the
    backward instead of keeping them. Forced on an eager model (the same code, fast on CPU):
    bitwise the same losses and gradients as without, also under activation checkpointing."""
    torch.manual_seed(0)
    plain = setr.build_setr("pup", "vit_tiny", 7, img_size=32, impl="eager").train()
    assert not plain.backbone.layers[0].recompute and not plain.decode_head.recompute
    lean = copy.deepcopy(plain)
    for m in lean.modules():
        if hasattr(m, "recompute"):
            m.recompute = True
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 7, (2, 32, 32))
    results = []
    for model in (plain, lean):
        losses = model(images, labels)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert all(torch.equal(l0[k], l1[k]) for k in l0)
    assert all(torch.equal(g0[n], g1[n]) for n in g0), [n for n in g0 if not torch.equal(g0[n], g1[n])]
    ours = setr.build_setr("pup", "vit_tiny", 7, img_size=32, impl="triton")
    assert ours.backbone.layers[0].recompute and ours.decode_head.recompute
    apply_activation_checkpointing(lean)  # whole blocks recomputed: no selective recompute inside them
    assert not lean.backbone.layers[0]._checkpoint_wrapped_module.recompute
    lean.zero_grad()
    sum(lean(images, labels).values()).backward()
    assert all(torch.equal(g0[n], p.grad) for n, p in zip(g0, lean.parameters()))


def test_estimate_command_writes_results_and_ends_with_summary_lines(tmp_path, capsys):
    from bench import memory

    argv = ["--estimate", "--head", "pup", "--backbone", "vit_tiny", "--crop", "32", "--batch", "2",
            "--impl", "eager", "--num-classes", "7", "--out", str(tmp_path)]
    assert memory.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"estimate pup eager batch 2 world 1: peak \d+\.\d\d GiB, \d+\.\d\d GiB per image", last)
    name = "pup_vit_tiny_32_eager_bf16_b2_w1"
    row = json.loads((tmp_path / f"{name}.json").read_text())["row"]
    assert row["peak_gib"] == pytest.approx(row["plan"]["peak"] / 2 ** 30)
    assert "| blocks |" in (tmp_path / f"{name}.md").read_text()
    assert memory.main(argv) == 2  # the same config again: refused, nothing overwritten
    assert "--overwrite" in capsys.readouterr().err
    assert memory.main(argv + ["--compile", "on"]) == 2
    assert "cannot be planned" in capsys.readouterr().err


def test_largest_batch_uses_the_affine_prediction(monkeypatch):
    planned = []

    def affine_plan(config):  # 2 GiB + 1.5 GiB per image
        planned.append(config["batch"])
        return dict(config, peak_gib=2.0 + 1.5 * config["batch"])

    monkeypatch.setattr(memory_estimate, "plan_row", affine_plan)
    batch, row = memory_estimate.largest_batch(dict(head="pup"), gpu_memory=41)  # (2 + 1.5 b) 1.1 + 1.5 <= 41
    assert (batch, row["batch"]) == (22, 22)
    assert len(planned) <= 5
    assert memory_estimate.largest_batch(dict(head="pup"), gpu_memory=4)[0] == 0


def test_readme_table_is_rendered_from_the_committed_results():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert memory_estimate.render_table(memory_estimate.OUT) in readme
