"""The training step as every benchmark runs it: the model of bench.run_config's config built as
train/main.py builds it (build_parallel), train.step's state and step, a fixed random batch."""
import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from train.build import build_model
from train.parallelize import parallelize


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

