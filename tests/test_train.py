"""Training engine: config and presets, optimizer groups and schedule, synchronized BN,
checkpoints, the step function, and short real runs (2-process gloo FSDP via torchrun)."""
import functools
import json
import math
import os
import re
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import setr
from jobs import kill_leftovers, python_main, run_job, torchrun, train_losses  # noqa: F401 (kill_leftovers is a fixture)
from train import checkpoint as ckpt
from train.config import ConfigError, get_preset, parse_config
from train.optim import PolyLR, param_groups
from train.step import train_step
from train.sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm

# A tiny, fast run: ViT-tiny, 64x64 crops, a small synthetic split, every step logged.
BASE = ["--device", "cpu", "--head", "pup", "--preset", "demo", "--deterministic", "--log-interval", "1", "--eval-interval", "0",
        "--num-workers", "0", "--metrics.progress_bar", "off"]
TINY = BASE + ["--data.synthetic_train_samples", "32", "--data.synthetic_val_samples", "4"]


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, head, lr, batch", [("naive", "naive", 0.01, 16), ("pup", "pup", 0.001, 16),
                                                   ("mla", "mla", 0.001, 16), ("mla_b8", "mla", 0.001, 8)])
def test_presets_are_mmseg_recipes(name, head, lr, batch):
    cfg = get_preset(name)
    assert (cfg.model.head, cfg.model.backbone, cfg.model.num_classes) == (head, "vit_large", 150)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.head_lr_mult) == (lr, 0.9, 0.0, 10)
    assert (cfg.schedule.batch_size, cfg.schedule.max_iters) == (batch, 160000)
    assert (cfg.schedule.poly_power, cfg.schedule.min_lr, cfg.optim.clip_grad) == (0.9, 1e-4, 0.0)
    assert cfg.data.crop_size == (512, 512) and cfg.data.scale == (2048, 512) and cfg.data.dataset == "ade20k"
    assert cfg.eval.stride == (341, 341) and cfg.eval.mode == "slide"
    assert cfg.parallel.precision == "bf16" and cfg.parallel.sync_bn


def test_preset_choice_overrides_and_roundtrip(tmp_path):
    cfg = parse_config(["--head", "mla"], cuda_available=True)
    assert cfg.preset == "mla" and cfg.schedule.batch_size == 16
    cfg = parse_config(["--head", "mla"], cuda_available=False)
    assert cfg.preset == "demo" and cfg.model.head == "mla" and "demo" in cfg.notes[0]
    assert cfg.model.backbone == "vit_tiny" and cfg.data.dataset == "synthetic"
    assert "folder data" in parse_config(["--dataset", "folder"], cuda_available=False).notes[0]
    cfg = parse_config(["--head", "naive", "--preset", "pup", "--lr", "0.5", "--batch-size", "4", "--crop-size",
                        "32", "--optim.momentum", "0.8", "--recompute", "full", "--compile", "false",
                        "--resume", "auto", "--data.synthetic_size", "48,64", "--precision", "fp32"],
                       cuda_available=False)
    assert cfg.preset == "pup" and cfg.model.head == "naive"
    assert (cfg.optim.lr, cfg.schedule.batch_size, cfg.data.crop_size, cfg.optim.momentum) == (0.5, 4, (32, 32), 0.8)
    assert cfg.parallel.recompute == "full" and cfg.parallel.compile is False
    assert cfg.checkpoint.resume == "auto" and cfg.data.synthetic_size == (48, 64)
    cfg.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))


def _demo(**changes):
    cfg = get_preset("demo")
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg


@pytest.mark.parametrize("changes, world, message", [
    (dict(data__crop_size=(64, 72)), 1, "multiples of the patch size 16"),
    (dict(eval__crop_size=(8, 8)), 1, "multiples of the patch size 16"),
    (dict(schedule__batch_size=8), 3, "not divisible by the world size 3"),
    (dict(schedule__micro_batch_size=3), 2, "must divide the per-rank batch 4"),
    (dict(data__dataset="ade20k", model__num_classes=150), 1, "--data-root is required"),
    (dict(data__dataset="folder", data__root="/no/such/dir"), 1, "no such directory"),
    (dict(data__root="/data/ADEChallengeData2016"), 1, "not used by --dataset synthetic"),
    (dict(model__head="fpn"), 1, "unknown model.head"),
    (dict(model__ignore_index=3), 1, "ignore_index"),
    (dict(checkpoint__resume="/no/such/ckpt"), 1, "no such checkpoint"),
    (dict(model__pretrained="/no/such.pth"), 1, "--pretrained"),
    (dict(data__synthetic_size=(0, 0)), 1, "data.synthetic_size must be two sizes >= 16"),
    (dict(data__synthetic_train_samples=0), 1, "data.synthetic_train_samples must be >= 1"),
    (dict(data__synthetic_val_samples=0), 1, "data.synthetic_val_samples must be >= 1"),
    (dict(optim__lr=float("nan")), 1, "optim.lr (--lr) must be a finite number > 0, got nan"),
    (dict(schedule__min_lr=float("inf")), 1, "schedule.min_lr must be a finite number >= 0"),
    (dict(optim__clip_grad=-1.0), 1, "optim.clip_grad"),
    (dict(optim__momentum=1.0), 1, "optim.momentum must be a finite number in [0, 1)"),
    (dict(optim__weight_decay=float("nan")), 1, "optim.weight_decay must be a finite number >= 0"),
])
def test_bad_config_is_a_clear_error(changes, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _demo(**changes).validate(world)


def test_unknown_preset_and_head_on_the_command_line(capsys):
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("pup_b4")
    for cuda in (False, True):
        with pytest.raises(SystemExit):
            parse_config(["--head", "fpn"], cuda_available=cuda)
        assert "unknown model.head (--head) 'fpn'; expected one of ('naive', 'pup', 'mla')" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the flag --recompute replaced
        parse_config(["--activation-checkpointing"], cuda_available=False)
    assert "--activation-checkpointing was replaced by --recompute full" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# optimizer groups and schedule
# ------------------------------------------------------------------------------------------------

def test_param_groups_head_x10_and_mla_neck_at_base_lr():
    model = setr.build_setr("mla", backbone="vit_tiny", num_classes=5, img_size=64)
    groups = param_groups(model, 0.001, 10.0)
    assert [g["lr"] for g in groups] == [0.001, 0.01]
    names = {id(p): n for n, p in model.named_parameters()}
    base = {names[id(p)] for p in groups[0]["params"]}
    head = {names[id(p)] for p in groups[1]["params"]}
    assert all(n.startswith(("decode_head.", "auxiliary_head.")) for n in head)
    assert any(n.startswith("neck.") for n in base) and any(n.startswith("backbone.") for n in base)
    assert len(base) + len(head) == len(names)


def test_poly_lr_matches_mmseg_formula_and_resumes():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.01}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    sched = PolyLR(opt, max_iters=100, power=0.9, min_lr=1e-4)
    assert sched.get_last_lr() == [0.01, 0.1]  # the first step runs at lr0
    for _ in range(40):
        sched.step()
    expect = [(lr0 - 1e-4) * (1 - 40 / 100) ** 0.9 + 1e-4 for lr0 in (0.01, 0.1)]
    assert sched.get_last_lr() == pytest.approx(expect, rel=1e-12)
    state = sched.state_dict()
    opt2 = torch.optim.SGD([{"params": [p], "lr": 0.01}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    sched2 = PolyLR(opt2, 100, 0.9, 1e-4)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    for _ in range(60):
        sched.step()
    assert sched.get_last_lr() == pytest.approx([1e-4, 1e-4])


# ------------------------------------------------------------------------------------------------
# synchronized BatchNorm
# ------------------------------------------------------------------------------------------------

def _bn_reference(x, target, weight, bias):
    bn = nn.BatchNorm2d(x.shape[1]).double()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    x = x.clone().requires_grad_(True)
    (bn(x) * target).sum().backward()
    return x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _sync_bn_worker(rank, world, init_file, x, target, weight, bias, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = x.shape[0] // world
        bn = SyncBatchNorm2d(x.shape[1]).double()
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        xr = x[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        y = bn(xr)
        (y * target[rank * n:(rank + 1) * n]).sum().backward()
        gw, gb = bn.weight.grad.clone(), bn.bias.grad.clone()
        dist.all_reduce(gw)
        dist.all_reduce(gb)
        torch.save({"y": y.detach(), "gx": xr.grad, "gw": gw, "gb": gb, "rm": bn.running_mean,
                    "rv": bn.running_var, "n": bn.num_batches_tracked}, f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_bn_two_ranks_equals_batchnorm_on_the_whole_batch(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(6, 5, 7, 3, dtype=torch.float64) * 3 + 1
    target = torch.randn_like(x)
    weight, bias = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    gx, gw, gb, rm, rv = _bn_reference(x, target, weight, bias)
    out = str(tmp_path / "rank")
    mp.spawn(_sync_bn_worker, args=(2, str(tmp_path / "init"), x, target, weight, bias, out), nprocs=2)
    r0, r1 = torch.load(out + "0.pt"), torch.load(out + "1.pt")
    ref_y = nn.functional.batch_norm(x, None, None, weight, bias, True)
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), ref_y)
    torch.testing.assert_close(torch.cat([r0["gx"], r1["gx"]]), gx)
    torch.testing.assert_close(r0["gw"], gw)
    torch.testing.assert_close(r0["gb"], gb)
    for r in (r0, r1):  # running stats: momentum 0.1, unbiased variance over the global batch
        torch.testing.assert_close(r["rm"], rm)
        torch.testing.assert_close(r["rv"], rv)
        assert int(r["n"]) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sync_bn_single_process_equals_batchnorm(dtype):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    ref = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    ref.load_state_dict(model.state_dict())
    convert_sync_batchnorm(model)
    assert isinstance(model[1], SyncBatchNorm2d) and list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 3, 5, 6)
    y = model.to(dtype)(x.to(dtype))
    y_ref = ref(x)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y.float(), y_ref, **tol)
    y.float().square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(model[1].weight.grad.float(), ref[1].weight.grad, **(tol or dict(atol=1e-5, rtol=1e-5)))
    torch.testing.assert_close(model[1].running_var.float(), ref[1].running_var, **tol)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x.to(dtype)).float(), ref(x), **tol)


def _torch_and_ours(num_features, device, dtype):
    """torch.nn.SyncBatchNorm and our SyncBatchNorm2d with the same random affine parameters."""
    ref = nn.SyncBatchNorm(num_features, device=device, dtype=dtype)
    ours = SyncBatchNorm2d(num_features, device=device, dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_sync_bn_equals_torch_sync_batchnorm_where_it_runs_on_cpu(single_process_group):
    """On CPU torch.nn.SyncBatchNorm refuses to train (its training math is plain batch norm on
    one rank, compared above and, on CUDA, below) but evaluates: after two training steps of
    ours, its state dict loads into torch's and both give the same output, float64, odd sizes."""
    torch.manual_seed(3)
    ref, ours = _torch_and_ours(5, "cpu", torch.float64)
    x = torch.randn(3, 5, 7, 9, dtype=torch.float64) * 2 + 0.5
    with pytest.raises(ValueError, match="GPU"):
        ref(x)
    for _ in range(2):
        ours(x * torch.rand(1, dtype=torch.float64) + torch.randn(1, dtype=torch.float64))
    ref.load_state_dict(ours.state_dict())
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-12, rtol=1e-12)
    assert int(ref.num_batches_tracked) == 2


@pytest.mark.gpu
def test_sync_bn_equals_torch_sync_batchnorm_kernels_on_cuda(tmp_path):
    """On CUDA, the synchronized path of torch.nn.SyncBatchNorm (batch_norm_stats, gather over the
    group, backward_reduce / backward_elemt), forced on a 1-rank NCCL group, against ours."""
    from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(4)
        ref, ours = _torch_and_ours(6, "cuda", torch.float32)
        x = (torch.randn(4, 6, 9, 11, device="cuda") * 3 + 1).requires_grad_(True)
        y = SyncBNFunction.apply(x, ref.weight, ref.bias, ref.running_mean, ref.running_var, ref.eps,
                                 ref.momentum, dist.group.WORLD, 1)
        xo = x.detach().clone().requires_grad_(True)
        yo = ours(xo)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (yo * g).sum().backward()
        tol = dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(yo, y, **tol)
        torch.testing.assert_close(xo.grad, x.grad, **tol)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **tol)
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol)
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_picks_torchs_on_cuda_and_ours_elsewhere():
    from train.sync_batchnorm import sync_batchnorm

    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert isinstance(sync_batchnorm(model(), "cpu")[1], SyncBatchNorm2d)
    assert type(sync_batchnorm(model(), "cuda")[1]) is nn.SyncBatchNorm


# ------------------------------------------------------------------------------------------------
# checkpoints (files) and the step function (in-process, world size 1)
# ------------------------------------------------------------------------------------------------

def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("iter_00000010", True), ("iter_00000020", True), ("iter_00000030", False),
                           ("iter_00000040.tmp", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / ckpt.META).write_text(json.dumps({"iteration": int(name[5:13]), "model": {}}))
    assert ckpt.latest_checkpoint(tmp_path) == str(root / "iter_00000020")
    assert ckpt.resolve_resume("auto", tmp_path) == [str(root / "iter_00000020"), str(root / "iter_00000010")]
    (root / ckpt.LATEST).write_text("iter_00000010")  # written last (a resume from 10): the pointer decides
    assert ckpt.latest_checkpoint(tmp_path) == str(root / "iter_00000010")
    assert ckpt.resolve_resume("auto", tmp_path) == [str(root / "iter_00000010"), str(root / "iter_00000020")]
    (root / ckpt.LATEST).write_text("iter_00000030")  # names an incomplete one: tried first, then the newest complete
    assert ckpt.latest_checkpoint(tmp_path) == str(root / "iter_00000020")
    assert ckpt.resolve_resume("auto", tmp_path)[:2] == [str(root / "iter_00000030"), str(root / "iter_00000020")]
    assert ckpt.resolve_resume("auto", tmp_path / "empty") == []
    assert ckpt.resolve_resume(str(tmp_path), "unused") == [str(root / "iter_00000020")]
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint"):
        ckpt.resolve_resume(str(root / "iter_00000030"), tmp_path)
    (root / "iter_00000020" / ckpt.META).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.read_meta(str(root / "iter_00000020"))


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _trainer(tmp_path, log_lines, **changes):
    from torch.distributed.device_mesh import init_device_mesh

    from train.build import build_data, build_model, eval_copy
    from train.parallelize import parallelize
    from train.trainer import Trainer

    class ListLog:
        def info(self, msg, every_rank=False):
            log_lines.append(msg)

        warning = info

        def event(self, *args, **kwargs):
            pass

        def progress(self, *args, **kwargs):
            pass

    cfg = parse_config(TINY + ["--work-dir", str(tmp_path)], cuda_available=False)
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        setattr(getattr(cfg, section), field, value)
    cfg.validate(1)
    log, device = ListLog(), torch.device("cpu")
    model = build_model(cfg, device, log)
    eval_model = eval_copy(model)
    model = parallelize(model, cfg, init_device_mesh("cpu", (1,)))
    return Trainer(cfg, model, eval_model, build_data(cfg), device, log)


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, 8, (n, 64, 64), generator=g)


def test_step_accumulation_normalizes_by_micro_batches(tmp_path, single_process_group):
    x, y = _batch(2)
    one = _trainer(tmp_path / "a", [], schedule__batch_size=2)
    two = _trainer(tmp_path / "b", [], schedule__batch_size=4, schedule__micro_batch_size=2)
    assert (one.accum_steps, two.accum_steps) == (1, 2)
    out1 = train_step(one.state, [(x, y)])
    out2 = train_step(two.state, [(x, y), (x, y)])  # twice the same micro-batch: the same mean gradient
    assert out1["applied"] and out2["applied"]
    assert out2["loss"] == pytest.approx(out1["loss"], rel=1e-6)
    assert out2["grad_norm"] == pytest.approx(out1["grad_norm"], rel=1e-5)
    for (name, p1), p2 in zip(one.model.named_parameters(), two.model.parameters()):
        torch.testing.assert_close(p2.full_tensor(), p1.full_tensor(), atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_non_finite_loss_skips_the_step(tmp_path, single_process_group, precision):
    lines = []
    trainer = _trainer(tmp_path, lines, schedule__batch_size=2, parallel__precision=precision)
    assert (trainer.state.scaler is not None) == (precision == "fp16")
    before = [p.full_tensor().clone() for p in trainer.model.parameters()]
    buffers = [b.clone() for b in trainer.model.buffers()]
    assert len(trainer.state.bn_buffers) > 0
    x, y = _batch(2)
    x[0, 0, 0, 0] = float("nan")
    out = train_step(trainer.state, [(x, y)])
    assert not out["applied"] and not math.isfinite(out["loss"])
    assert trainer.state.scheduler.last_iter == 1  # the iteration is consumed, the weights are not touched
    for b, p in zip(before, trainer.model.parameters()):
        assert torch.equal(b, p.full_tensor())
    for b, now in zip(buffers, trainer.model.buffers()):  # nor the BatchNorm running statistics
        assert torch.equal(b, now)
    scale = trainer.state.scaler.get_scale() if trainer.state.scaler else None
    assert train_step(trainer.state, [_batch(2, seed=1)])["applied"]  # the next step runs (and the scaler too)
    if scale is not None:
        assert trainer.state.scaler.get_scale() == scale  # backed off once by the skipped step, not again


def test_grad_clipping_scales_the_update(tmp_path, single_process_group):
    batch = _batch(2)
    free = _trainer(tmp_path / "free", [], schedule__batch_size=2)
    clipped = _trainer(tmp_path / "clip", [], schedule__batch_size=2, optim__clip_grad=0.01)
    before = torch.cat([p.full_tensor().flatten() for p in free.model.parameters()])
    norm = train_step(free.state, [batch])["grad_norm"]
    assert train_step(clipped.state, [batch])["grad_norm"] == pytest.approx(norm)  # reported before clipping
    assert norm > 0.01
    d_free = torch.cat([p.full_tensor().flatten() for p in free.model.parameters()]) - before
    d_clip = torch.cat([p.full_tensor().flatten() for p in clipped.model.parameters()]) - before
    assert (d_clip.norm() / d_free.norm()).item() == pytest.approx(0.01 / norm, rel=1e-3)
    assert torch.nn.functional.cosine_similarity(d_clip, d_free, dim=0).item() > 0.9999


def test_checkpoint_of_another_head_or_corrupt_is_refused(tmp_path, single_process_group):
    trainer = _trainer(tmp_path / "run", [], schedule__batch_size=2)
    train_step(trainer.state, [_batch(2)])
    trainer.iteration = 1
    trainer.save_checkpoint()
    path = ckpt.iteration_dir(str(tmp_path / "run"), 1)
    assert ckpt.latest_checkpoint(str(tmp_path / "run")) == path
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "meta.json", "rng_rank0.pt"]
    other = _trainer(tmp_path / "other", [], schedule__batch_size=2, model__head="naive",
                     checkpoint__resume=path)
    with pytest.raises(ckpt.CheckpointError, match="another model .*head: checkpoint 'pup' vs this run 'naive'"):
        other.resume()
    other = _trainer(tmp_path / "other_batch", [], schedule__batch_size=4, checkpoint__resume=path)
    with pytest.raises(ckpt.CheckpointError, match="global_batch: checkpoint 2 vs this run 4"):
        other.resume()
    assert other.iteration == 0 and any(  # refused before loading: the weights are still its own
        not torch.equal(p.full_tensor(), q.full_tensor()) for p, q in zip(trainer.model.parameters(),
                                                                       other.model.parameters()))
    same = _trainer(tmp_path / "same", [], schedule__batch_size=2, checkpoint__resume=path)
    same.resume()
    assert same.iteration == 1 and same.state.scheduler.last_iter == 1
    for p, q in zip(trainer.model.parameters(), same.model.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor())
    with open(os.path.join(path, "__0_0.distcp"), "r+b") as f:  # damage the shard file
        f.truncate(100)
    broken = _trainer(tmp_path / "broken", [], schedule__batch_size=2, checkpoint__resume=path)
    with pytest.raises(ckpt.CheckpointError, match="corrupt or incomplete"):
        broken.resume()


def test_main_reports_bad_input_before_work(tmp_path, capsys):
    from train.main import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(TINY + ["--work-dir", str(blocker / "run")]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert main(TINY + ["--work-dir", str(tmp_path / "x" / "run"), "--dataset", "folder", "--num-classes", "11",
                        "--ignore-index", "11", "--data-root", str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err and not (tmp_path / "x").exists()  # nothing created
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(TINY + ["--work-dir", str(tmp_path / "y"), "--dataset", "folder", "--num-classes", "11",
                        "--ignore-index", "11", "--data-root", str(empty)]) == 2
    assert "split folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# real runs: torchrun, 2 processes, gloo FSDP
# ------------------------------------------------------------------------------------------------

def _run(args, nproc=2, timeout=240):
    """The output of a run (2 torchrun ranks, or one plain process with nproc=0) that must succeed."""
    code, out, _ = run_job((torchrun(nproc) if nproc else python_main()) + args, timeout)
    assert code == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """6 iterations of the demo model on 2 gloo ranks, checkpoints at 3 and 6: (work dir, output)."""
    work = tmp_path_factory.mktemp("fsdp2") / "run"
    out = _run(TINY + ["--max-iters", "6", "--ckpt-interval", "3", "--work-dir", str(work)])
    return str(work), out


def test_two_rank_fsdp_demo_run(two_rank_run):
    work, out = two_rank_run
    assert "no GPU" not in out  # --preset given explicitly
    assert "FSDP2 over 2 cpu rank(s) (gloo)" in out
    losses = train_losses(work)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    with open(os.path.join(work, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["event"] == "eval"]
    assert len(evals) == 1 and evals[0]["iter"] == 6 and 0 <= evals[0]["mIoU"] <= 100 and "loss" in evals[0]
    assert json.load(open(os.path.join(work, "config.json")))["model"]["backbone"] == "vit_tiny"
    assert [i for i, _ in ckpt.complete_checkpoints(work)] == [3, 6]
    with open(os.path.join(work, "checkpoints", "iter_00000006", ckpt.META)) as f:
        assert json.load(f)["last"]["mIoU"] == evals[0]["mIoU"]  # evaluated before the checkpoint of iter 6
    # the consolidated export loads strictly into a plain model and predicts
    export = os.path.join(work, "model_final.pth")
    meta = setr.read_checkpoint_meta(export)
    assert (meta["head"], meta["backbone"], meta["num_classes"], meta["iteration"]) == ("pup", "vit_tiny", 8, 6)
    model = setr.build_setr("pup", backbone="vit_tiny", num_classes=8, img_size=64)
    setr.load_mmseg_checkpoint(model, export)
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 8, 64, 64)


def test_resume_reproduces_the_uninterrupted_run_bitwise(two_rank_run, tmp_path):
    work, _ = two_rank_run
    resumed = tmp_path / "resumed"
    shutil.copytree(work, resumed, ignore=shutil.ignore_patterns("iter_00000006", "latest", "*.jsonl", "*.pth"))
    out = _run(TINY + ["--max-iters", "6", "--ckpt-interval", "3", "--work-dir", str(resumed), "--resume", "auto"])
    assert "resumed from" in out and "at iteration 3" in out
    full = train_losses(work)
    part = train_losses(resumed)
    assert sorted(part) == [4, 5, 6]
    assert [part[i] for i in (4, 5, 6)] == [full[i] for i in (4, 5, 6)]  # exact equality
    a = torch.load(os.path.join(work, "model_final.pth"))["state_dict"]
    b = torch.load(os.path.join(resumed, "model_final.pth"))["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_world_size_1_and_2_give_the_same_first_step_loss(two_rank_run, tmp_path):
    work, _ = two_rank_run
    out = _run(TINY + ["--max-iters", "1", "--work-dir", str(tmp_path / "ws1"), "--eval.at_end", "false",
                       "--checkpoint.export", "false"], nproc=0)
    assert "FSDP2 over 1 cpu rank(s)" in out
    ws1 = train_losses(tmp_path / "ws1")
    ws2 = train_losses(work)
    assert ws1[1] == pytest.approx(ws2[1], rel=1e-5, abs=0)


def test_every_module_passed_to_fully_shard_runs_forward(tmp_path, single_process_group, monkeypatch, caplog):
    """FSDP2 hooks the forward of the modules given to fully_shard; one that never runs forward (a
    ModuleList) leaves its group without pre-backward and reshard (torch 2.11 warns, 2.13 not)."""
    import torch.distributed.fsdp as fsdp

    passed, ran = [], set()
    real = fsdp.fully_shard
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: passed.append(module) or real(module, **kw))
    trainer = _trainer(tmp_path, [], schedule__batch_size=2)
    modules = [m for group in passed for m in (group if isinstance(group, list) else [group])]
    for m in modules:
        m.register_forward_hook(lambda module, *_: ran.add(id(module)))
    train_step(trainer.state, [_batch(2)])
    assert [type(m).__name__ for m in modules if id(m) not in ran] == []
    assert "did not run forward" not in caplog.text


def test_full_recompute_and_compile_give_the_same_step(tmp_path, single_process_group, monkeypatch):
    """--recompute full (checkpointed blocks) and --compile: the step and the state-dict names of the
    plain model. torch.compile runs its aot_eager backend here: what it traces (Dynamo fullgraph,
    AOTAutograd's joint graph split around the checkpointed blocks) without Inductor's CPU C++
    code, which a GPU never runs and which costs gcc about 20 s on 2 cores."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    x, y = _batch(2)
    plain = _trainer(tmp_path / "plain", [], schedule__batch_size=2)
    fancy = _trainer(tmp_path / "fancy", [], schedule__batch_size=2, parallel__recompute="full",
                     parallel__compile=True)
    names = [n for n, _ in fancy.model.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in names) and any("_orig_mod" in n for n in names)
    a, b = train_step(plain.state, [(x, y)]), train_step(fancy.state, [(x, y)])
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    fancy.sync_eval_model()  # state-dict names come out clean (no wrapper prefixes)
    plain.sync_eval_model()
    for (k, v), w in zip(plain.eval_model.state_dict().items(), fancy.eval_model.state_dict().values()):
        torch.testing.assert_close(w, v, atol=1e-5, rtol=1e-4, msg=k)


def test_learns_on_a_real_folder_dataset(shared_dir, tmp_path):
    root = os.path.join(shared_dir, "data", "camvid_segnet_subset")
    if not os.path.isdir(root):
        pytest.skip(f"{root} not found")
    _run(BASE + ["--dataset", "folder", "--data-root", root, "--num-classes", "11", "--ignore-index", "11",
                 "--max-iters", "40", "--eval.at_end", "false", "--checkpoint.export", "false",
                 "--ckpt-interval", "0", "--work-dir", str(tmp_path / "camvid")], nproc=0)
    losses = train_losses(tmp_path / "camvid")
    first, last = losses[1], sum(losses[i] for i in range(36, 41)) / 5
    assert last < 0.7 * first, (first, last)
