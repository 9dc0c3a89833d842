"""The memory planner (bench/memory_plan.py) against what a real CPU step keeps for backward, its
command line (bench/memory.py) and the README table it feeds (bench/readme_tables.py)."""
import contextlib
import json
import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import setr
from bench import memory, memory_plan, plan_name, readme_tables, run_script
from train.config import RECOMPUTE
from train.parallelize import apply_recompute
from train.sync_batchnorm import convert_sync_batchnorm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(head="pup", backbone="vit_tiny", num_classes=7, crop=32)  # no aux heads: 3x faster interpreted


class CreatedStorages(TorchDispatchMode):
    """The storages of every tensor the ops create while it is on, held weakly."""

    def __init__(self):
        super().__init__()
        self.storages = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.storages[t.untyped_storage()] = True
        return out


def kept_for_backward_bytes(model, images, labels):
    """Bytes of the distinct storages a real forward created that are still alive when it returns
    (what autograd, recompute frames and the losses keep; parameters and inputs excluded, the
    planner counts those apart)."""
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), images, labels]}
    with CreatedStorages() as created:
        losses = model(images, labels)  # noqa: F841 - holds the graph while the storages are counted
    kept = {st.data_ptr(): st.nbytes() for st in created.storages.keys() if st.data_ptr() not in excluded}
    return sum(kept.values())


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels on CPU tensors, "
                              "through the interpreter (with CUDA present, CPU tensors would take the references)")


@pytest.mark.parametrize("recompute", RECOMPUTE)
@pytest.mark.parametrize("impl", ["eager", "sdpa", pytest.param("triton", marks=CPU_ONLY)])
def test_planned_activations_equal_the_bytes_kept_for_backward(impl, recompute):
    """Every impl under every recompute policy; triton runs through the interpreter here and is
    planned through the custom ops' fake versions."""
    plan = memory_plan.plan(TINY["head"], impl, 2, recompute, precision="fp32", crop=TINY["crop"],
                            backbone=TINY["backbone"], num_classes=TINY["num_classes"], aux=False)
    model = setr.build_setr(TINY["head"], TINY["backbone"], TINY["num_classes"], img_size=TINY["crop"], impl=impl,
                            aux=False)
    convert_sync_batchnorm(model.train())
    apply_recompute(model, recompute)
    images = torch.randn(2, 3, TINY["crop"], TINY["crop"])
    labels = torch.randint(0, TINY["num_classes"], (2, TINY["crop"], TINY["crop"]))
    real = kept_for_backward_bytes(model, images, labels)
    assert real > 0
    assert plan["saved_activations"] == pytest.approx(real, rel=0.05), (plan["saved_activations"], real)
    # the fused upsample + cross-entropy is planned through its fake op: ours never holds the
    # full-resolution logits, eager's loss does
    full = [2, TINY["num_classes"], TINY["crop"], TINY["crop"]]
    assert (plan["modules"]["loss"]["largest"][1] == full) == (impl != "triton"), plan["modules"]["loss"]["largest"]


@pytest.mark.parametrize("preset, crop, classes, tokens", [("pup_cityscapes", 768, 19, 2305),
                                                           ("pup_pascal_context", 480, 60, 901)])
def test_plans_of_the_cityscapes_and_pascal_context_recipes(preset, crop, classes, tokens):
    """Their presets' crops (768x768, 480x480), planned at their token counts, and no full-resolution
    logits anywhere in our step. The heads and the loss are those of ViT-L; the backbone width does
    not change them."""
    ours = memory_plan.plan(preset, "triton", 1, "none", backbone="vit_tiny")["modules"]
    assert tokens in ours["blocks"]["largest"][1]  # the MLP's hidden activations, (tokens, 4 x width)
    assert ours["loss"]["largest"][1] == [1, classes, crop // 2, crop // 2]  # the logits before the x2 upsample
    assert max(m["largest"][0] for m in ours.values() if m["largest"]) < classes * crop * crop


def test_dtensor_shape_inference_is_not_planned():
    """DTensor infers an op's output shape on fake tensors of the global shapes, which a GPU never
    allocates: the planner's tracking modes must not see them (torch 2.11 infers at every op under a
    fake mode; a shape never seen before makes 2.13 infer too)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(t is DTensor for t in types):
                return NotImplemented
            out = func(*args, **(kwargs or {}))
            shapes.extend(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with memory_plan.fake_process_group(8):
        mesh = init_device_mesh("cpu", (8,))
        for unseen in (False, True):
            shapes = []
            with FakeTensorMode() as fake_mode, (memory_plan.dtensor_shape_inference_unseen(fake_mode) if unseen
                                                 else contextlib.nullcontext()):
                grads = [DTensor.from_local(torch.empty(3, 5, 7 + unseen), mesh, [Shard(0)], run_check=False)]
                with Shapes():
                    torch._foreach_norm(grads)
            assert ((24, 5, 7 + unseen) in shapes) == (not unseen), shapes  # global (24, 5, 7): 8 shards of 3


def test_compile_and_unknown_impl_are_refused():
    with pytest.raises(memory_plan.PlanError, match="compile"):
        memory_plan.plan("pup", "triton", 1, "none", compile_=True)
    with pytest.raises(memory_plan.PlanError, match="impl 'flash'"):
        memory_plan.plan("pup", "flash", 1, "none")


def test_real_step_code_path_on_cpu():
    """What runs on a GPU beside the plan: two real steps; on CPU the peak is None."""
    out = memory_plan.measure(TINY["head"], "eager", 2, "none", precision="fp32", crop=TINY["crop"],
                              backbone=TINY["backbone"], num_classes=TINY["num_classes"], aux=False, device="cpu")
    assert out["measured_peak"] is None
    assert out["grad_norm"] > 0 and out["grad_norm"] == out["grad_norm"]


def test_memory_command_writes_where_it_says_and_ends_with_summary_lines(tmp_path, capsys):
    name = "pup_vit_tiny_32_eager_bf16_recompute-full_b2_w1"
    (tmp_path / f"{name}.json").write_text("an earlier run's")  # results never stand in the way: replaced
    argv = ["--head", "pup", "--backbone", "vit_tiny", "--crop", "32", "--batch", "2", "--impl", "eager",
            "--num-classes", "7", "--recompute", "full", "--out", str(tmp_path)]
    assert memory.main(argv) == 0
    *_, where, last = capsys.readouterr().out.strip().splitlines()
    assert where.endswith(f"to {tmp_path}")
    assert re.fullmatch(r"estimate pup eager recompute=full batch 2 world 1: "
                        r"peak \d+\.\d\d GiB, \d+\.\d\d GiB per image", last), last
    row = json.loads((tmp_path / f"{name}.json").read_text())["row"]
    assert row["peak_gib"] == pytest.approx(row["plan"]["peak"] / 2 ** 30) and os.listdir(tmp_path) == [f"{name}.json"]


@pytest.mark.parametrize("flag", ["--batch", "--crop", "--world-size", "--num-classes"])
def test_memory_command_refuses_zero(flag, capsys):
    with pytest.raises(SystemExit) as e:
        memory.parse_args([flag, "0"])
    assert e.value.code == 2 and f"{flag} must be >= " in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--compile", "on"], "cannot be planned"),
                                           (["--preset", "pup_kitti"], "--preset 'pup_kitti': expected one of naive"),
                                           (["--recompute", "some"], "--recompute 'some': expected one of none")])
def test_memory_command_answers_a_mistake_in_one_line(argv, message, capsys):
    assert run_script(memory.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_max_batch_confirms_the_affine_prediction(monkeypatch):
    planned = []

    def affine_plan(config):  # 2 GiB + 1.5 GiB per image
        planned.append(config["batch"])
        return dict(config, peak_gib=2.0 + 1.5 * config["batch"])

    monkeypatch.setattr(memory, "plan_row", affine_plan)
    batch, row = memory.max_batch(dict(head="pup"), gpu_memory=41)  # (2 + 1.5 b) 1.1 + 1.5 <= 41
    assert (batch, row["batch"]) == (22, 22)
    assert len(planned) == 4  # batch 1 and 8 for the line, then 22 and 23 around its prediction
    assert memory.max_batch(dict(head="pup"), gpu_memory=4)[0] == 0


def test_readme_table_is_rendered_from_the_committed_results():
    readme = open(os.path.join(REPO, "README.md")).read()
    table = readme_tables.planned_table()
    assert table in readme
    configs = readme_tables.table_configs()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(configs) // 3  # a row per (dataset, model, layout, policy), a column per impl
    for c in configs:
        assert os.path.exists(os.path.join(readme_tables.ESTIMATE, plan_name(c) + ".json")), plan_name(c)
