"""One SETR training step as the benchmarks run it (bench/train_step.py, bench/memory.py): the model,
mmseg's optimizer, a fixed random batch or a DataLoader as training has it, timing and
out-of-memory handling.
"""
import gc
import os
import statistics
import time

import torch

from setr.data import TrainSamples, build_dataset
from train.config import DataConfig, get_preset
from train.optim import sgd

GIB = 2**30


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory():
    """Give the device memory of dropped models back (cycles first); nothing to do on CPU."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def is_oom(exc):
    """True when exc (or an exception it was raised from) is a device out-of-memory error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def error_text(exc):
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def make_batch(batch, img_size, num_classes, device, ignore_index=255, seed=0):
    """Fixed random batch: images (B, 3, H, W) float32 ~ N(0, 1) (already normalized), labels
    (B, H, W) int64 in [0, num_classes) with ~5% set to ignore_index."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, h, w, generator=g)
    labels = torch.randint(0, num_classes, (batch, h, w), generator=g)
    labels[torch.rand(batch, h, w, generator=g) < 0.05] = ignore_index
    return images.to(device), labels.to(device)


def build_model(head, backbone, impl, img_size, num_classes, device):
    import setr

    model = setr.build_setr(head, backbone, num_classes=num_classes, img_size=img_size, impl=impl,
                            device=device)
    return model.train()


def make_optimizer(model, head):
    """mmseg's SGD for this head's preset (the training engine's own parameter groups)."""
    return sgd(model, get_preset(head).optim)


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def train_step(runner, optimizer, images, labels, device, dtype):
    """forward + loss + backward + optimizer step + zero_grad; returns the loss (detached)."""
    with autocast(device, dtype):
        losses = runner(images, labels)
        loss = sum(losses.values())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def time_steps(fn, steps, device):
    """Median, 20th and 80th percentile wall time of fn() in ms, each call synchronized."""
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return statistics.median(times), q(0.2), q(0.8)


def largest_batch(fits, start=1, cap=64):
    """Largest batch b in [1, cap] with fits(b) True (fits must be monotone): doubling from
    start, then bisection. Returns 0 when even batch 1 does not fit."""
    start = max(1, min(start, cap))
    if fits(start):
        lo, hi = start, None
        while hi is None and lo < cap:
            b = min(2 * lo, cap)
            if fits(b):
                lo = b
            else:
                hi = b
        if hi is None:
            return lo
    else:
        lo, hi = 0, start
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _try_steps(runner, optimizer, cfg, batch, device, n):
    """n training steps at this batch: True, or False on out-of-memory (other errors raise)."""
    try:
        images, labels = make_batch(batch, cfg["img_size"], cfg["num_classes"], device)
        for _ in range(n):
            train_step(runner, optimizer, images, labels, device, cfg["dtype"])
        sync(device)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is swallowed
        if is_oom(e):
            return False
        raise
    return True


def batch_fits(runner, optimizer, cfg, batch, device):
    ok = _try_steps(runner, optimizer, cfg, batch, device, n=2)  # frames and tensors gone here
    optimizer.zero_grad(set_to_none=True)
    free_memory()
    return ok


def gpu_memory_gib(device, limit_gib=None):
    """Usable device memory in GiB: the total, or the per-process cap when one is set."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    return min(total, limit_gib) if limit_gib else total


def set_memory_limit(limit_gib, device):
    if limit_gib is None:
        return
    if device.type != "cuda":
        print("--memory-limit-gb ignored: no GPU")
        return
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gib / total), device)
    print(f"GPU memory capped at {limit_gib:.1f} of {total:.1f} GB")


def ours_note(device):
    """What impl=triton runs on this device (kernels.utils.use_triton's rule)."""
    if device.type == "cuda":
        return "impl=triton runs our compiled Triton kernels"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "impl=triton runs our Triton kernels through the interpreter (slow)"
    return ("impl=triton runs the kernels' plain-PyTorch references on CPU "
            "(TRITON_INTERPRET=1 runs our Triton kernels through the interpreter instead, slowly)")


def make_loader(head, batch, img_size, num_classes, workers, device):
    """A DataLoader as training builds it (workers, pinned memory, prefetch 4) over the synthetic
    dataset through mmseg's ADE20K training pipeline (the preset's resize range, scaled to the
    crop, random crop, flip, photometric distortion). Items: images (B, 3, S, S), labels (B, S, S)."""
    data, defaults = get_preset(head).data, DataConfig()
    scale = tuple(s * img_size // data.crop_size[0] for s in data.scale)
    raw = build_dataset("synthetic", split="training", num_classes=num_classes,
                        synthetic_size=tuple(defaults.synthetic_size),
                        synthetic_samples=defaults.synthetic_train_samples)
    samples = TrainSamples(raw, img_size, seed=0, scale=scale, ratio_range=tuple(data.ratio_range),
                           cat_max_ratio=data.cat_max_ratio)
    loader = torch.utils.data.DataLoader(samples, batch_size=batch, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers > 0 else None)
    loader.description = (f"synthetic {raw.size[0]}x{raw.size[1]} images, training pipeline, "
                          f"{workers} workers")
    return loader


def time_loader_steps(step, loader, steps, device):
    """`steps` training steps, each on the loader's next batch, after as many untimed ones as the
    loader has workers, so that the batch each worker had ready at the start hides nothing.
    Returns (median step ms, median wait ms, data wait share): wait = time blocked on the loader,
    step = wait + copy to the device + step(images, labels), synchronized; the share is total wait
    over total step time. A loader only a little slower than the step still has some batches in
    hand after the untimed steps: over a short run its wait is under-reported, never over-reported."""
    batches = iter(loader)
    waits, totals = [], []
    for i in range(loader.num_workers + steps):
        t0 = time.perf_counter()
        images, labels = next(batches)
        t1 = time.perf_counter()
        step(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        sync(device)
        if i >= loader.num_workers:
            waits.append(t1 - t0)
            totals.append(time.perf_counter() - t0)
    del batches  # shuts the workers down
    return 1e3 * statistics.median(totals), 1e3 * statistics.median(waits), sum(waits) / sum(totals)
