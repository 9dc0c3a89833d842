"""The training step as every benchmark runs it: training's own config, model and step.

    cfg = run_config("pup", impl="triton", recompute="selective")   # a training preset, changed
    model = build_parallel(cfg, "cuda")        # as train/main.py builds it, in the process group there
    state = train.step.build_step_state(cfg, model, "cuda")
    train.step.train_step(state, [random_batch(16, 512, 150, "cuda")])
"""
import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from train.build import build_model
from train.config import get_preset
from train.parallelize import parallelize


def run_config(preset, impl, recompute, precision="bf16", compile_=False, backbone="vit_large", crop=None,
               num_classes=None, aux=True):
    """The training config of a preset (train/config.py: "pup" is SETR-PUP's ADE20K recipe,
    "pup_cityscapes" its Cityscapes one, ...) with these settings changed (crop and classes: the
    preset's unless given)."""
    cfg = get_preset(preset)
    cfg.model.impl, cfg.model.backbone, cfg.model.aux = impl, backbone, aux
    cfg.model.num_classes = num_classes or cfg.model.num_classes
    cfg.parallel.recompute, cfg.parallel.precision, cfg.parallel.compile = recompute, precision, compile_
    cfg.data.crop_size = (crop, crop) if crop else tuple(cfg.data.crop_size)
    return cfg


def build_parallel(cfg, device):
    """The model of cfg built and parallelized as train/main.py does it. On the meta device (the
    planner) the heads' SyncBN is planned as BatchNorm2d: GPUs run torch.nn.SyncBatchNorm, which
    keeps for backward what BatchNorm2d keeps (its collectives add only (C,)-sized tensors) but
    refuses meta tensors."""
    meta = torch.device(device).type == "meta"
    if meta:
        cfg = copy.deepcopy(cfg)
        cfg.parallel.sync_bn = False
    model = build_model(cfg, device, log=None)
    mesh_device = "cpu" if meta else torch.device(device).type
    return parallelize(model, cfg, init_device_mesh(mesh_device, (dist.get_world_size(),)))


def random_batch(batch, crop, num_classes, device, ignore_index=255, seed=0):
    """A fixed random batch as the data loader gives it: images (B, 3, crop, crop) float32 ~ N(0, 1)
    (already normalized), labels (B, crop, crop) int64 in [0, num_classes), ~5% ignore_index."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, crop, crop, generator=g)
    labels = torch.randint(0, num_classes, (batch, crop, crop), generator=g)
    labels[torch.rand(batch, crop, crop, generator=g) < 0.05] = ignore_index
    return images.to(device), labels.to(device)


def is_oom(exc, depth=8):
    """True when exc (or an exception it was raised from) is a device out-of-memory error."""
    while exc is not None and depth:
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc, depth = exc.__cause__ or exc.__context__, depth - 1
    return False


def error_text(exc):
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
