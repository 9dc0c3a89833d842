"""Host syncs on the training path: at most one per optimizer step, none in the loss or the kernels.

A host sync is any Python-level read of a tensor's value: .item(), .tolist(), int() / float() /
bool() / index of a tensor, .cpu(), .numpy(). They are counted on torch.Tensor itself, so the calls
inside the kernels' launchers and custom ops count too (a TorchDispatchMode would not see inside
torch.library ops). The Triton interpreter's own copies (it emulates the GPU on numpy arrays) are
not syncs of the real run and are left out.
"""
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist

from train.config import parse_config
from train.step import train_step

SYNC_METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")
TRITON = os.sep + os.path.join("site-packages", "triton") + os.sep  # the interpreter lives there


class HostSyncs:
    """Context manager recording where each host sync happens (one short stack per sync)."""

    def __enter__(self):
        self.calls, self.saved = [], {}
        for name in SYNC_METHODS:
            real = getattr(torch.Tensor, name)
            self.saved[name] = real

            def counted(t, *args, real=real, name=name, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if TRITON not in caller:
                    self.calls.append(f"{name}: " + " <- ".join(
                        f"{os.path.basename(f.filename)}:{f.lineno}" for f in traceback.extract_stack(limit=6)[-2::-1]))
                return real(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)


def test_counter_sees_every_kind_of_sync():
    t = torch.ones(2)
    with HostSyncs() as syncs:
        t.sum().item(), t.tolist(), int(t[0]), float(t[0]), bool(t[0]), list(range(t[0].long())), t.cpu(), t.numpy()
    assert len(syncs.calls) == len(SYNC_METHODS), syncs.calls


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_trainer(tmp_path, precision):
    """A Trainer of the Naive head (no aux heads: the same kernels again) on ViT-tiny at 32x32,
    impl="triton"."""
    from torch.distributed.device_mesh import init_device_mesh

    from train.parallelize import parallelize
    from train.build import build_data, build_model, eval_copy
    from train.trainer import Trainer

    class Log:
        def info(self, *args, **kwargs):
            pass

        warning = event = progress = info

    cfg = parse_config(["--device", "cpu", "--head", "naive", "--preset", "demo", "--impl", "triton",
                        "--precision", precision, "--model.aux", "false", "--batch-size", "1", "--crop-size", "32",
                        "--num-workers", "0", "--work-dir", str(tmp_path), "--data.synthetic_train_samples", "4",
                        "--data.synthetic_val_samples", "2"], cuda_available=False)
    cfg.validate(1)
    model = build_model(cfg, torch.device("cpu"), Log())
    eval_model = eval_copy(model)
    model = parallelize(model, cfg, init_device_mesh("cpu", (1,)))
    return Trainer(cfg, model, eval_model, build_data(cfg), torch.device("cpu"), Log())


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the syncs of the kernels run on CPU tensors, through "
                    "the interpreter (with CUDA present, CPU tensors would take the references)")
def test_train_step_syncs_once_in_every_precision(tmp_path, single_process_group):
    """fp32, bf16 (the default: FSDP mixed precision) and fp16 (its loss scale lives on the host)."""
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randn(1, 3, 32, 32, generator=g), torch.randint(0, 8, (1, 32, 32), generator=g))]
    for precision in ("fp32", "bf16", "fp16"):
        trainer = tiny_trainer(tmp_path / precision, precision)
        assert trainer.eval_model.impl == dict.fromkeys(("attention", "layer_norm", "upsample", "loss"), "triton")
        if precision == "fp32":  # warm-up: index tables and other per-shape caches are built once per process
            train_step(trainer.state, batch)
        with HostSyncs() as syncs:
            out = train_step(trainer.state, batch)
        assert out["applied"]
        assert len(syncs.calls) == 1, "\n".join(syncs.calls)  # the packed all-reduce result, read once
