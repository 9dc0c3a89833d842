"""End-to-end SETR training-step benchmark: eager vs SDPA vs ours, with and without torch.compile.

    python bench/train_step.py --head pup --batch 8                  # ViT-L/16, 512x512, one GPU
    python bench/train_step.py --head all --find-max-batch           # every head + largest batch
    python bench/train_step.py --head pup --variants eager triton    # a subset of the variants
    python bench/train_step.py --quick                               # tiny config (CPU smoke test)

One step = forward + loss + backward + SGD step + zero_grad, on a fixed random batch
(normalized-like images, labels in [0, num_classes) with ~5% ignored pixels), timed with a
device synchronize around each step: median of --steps after --warmup steps.

Precision: torch.autocast(bf16) over float32 master parameters and float32 SGD state, i.e.
mixed-precision training; `--dtype fp32` turns autocast off.
Optimizer: SGD momentum 0.9, weight decay 0, lr 0.01 (naive) / 0.001, x10 for parameters whose
name contains "head" (mmseg's recipe).

Variants: eager (plain PyTorch math), sdpa (PyTorch's fused built-ins), triton (our kernels),
eager+compile and triton+compile (torch.compile of the whole model; a variant that fails gets an
"error" field in its rows instead of stopping the run).

Reported per variant: step time, images/s, achieved TFLOP/s and MFU from the analytic FLOPs
(3 x model.forward_flops, against the GPU's dense peak for the dtype; each variant counts the FLOPs it
performs, so ours, which classifies before the last upsample, is credited ~7% fewer FLOPs for
naive/PUP: its MFU is conservative), the first and last step's loss, peak allocated memory, the
inference speed (eval mode, whole image, batch 1) and with --find-max-batch the largest batch
that fits (doubling, then bisection, catching out-of-memory errors). Results go to
bench/results/<gpu>/train_step_<head>.{json,md,png} with PASS/MISS lines for the goals.

Without a GPU this runs the tiny config (vit_tiny, 32x32, few steps; torch.compile with the
aot_eager backend, since inductor takes minutes there) as a smoke test: the timings, MFU and
memory of a CPU run mean nothing. On CPU impl=triton runs the kernels' plain-PyTorch references
unless TRITON_INTERPRET=1 (our Triton kernels through the interpreter: slow; the tests do this).

Running everything on one GPU (each command stays under ~10 minutes):
    python bench/kernels.py
    python bench/train_step.py --head pup --batch 16 --find-max-batch   # then naive, mla
    python bench/memory.py --head pup --snapshot                          # then naive, mla
    python bench/readme_tables.py --out bench/results/<gpu>/readme_tables.md
On a GPU with more than 80 GB add --memory-limit-gb 80 to decide the 80 GB goal.
"""
import argparse
import gc
import math
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as `python bench/train_step.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import setr
from bench import common
from setr.layers import PATCH_SIZE
from setr.model import HEADS
from train.config import get_preset
from train.trainer import param_groups, peak_flops

VARIANTS = ("eager", "sdpa", "triton", "eager+compile", "triton+compile")
OURS = ("triton", "triton+compile")
GIB = 2**30

# Goals checked on a GPU run (the project's headline targets).
GOAL_SPEEDUP_EAGER = 1.5
GOAL_SPEEDUP_EAGER_COMPILE = 1.1
GOAL_MFU = 0.50
GOAL_MEM_PER_IMAGE_GIB = 2.4  # mmseg's 19.54 GB for 2 images, / 4 (GB = 2^30 bytes, as mmcv logs)
GOAL_BATCH = 16
GOAL_GPU_GIB = 80

TINY = dict(backbone="vit_tiny", img_size=32, batch=2, steps=3, warmup=1, max_batch=4)
FULL = dict(backbone="vit_large", img_size=512, batch=8, steps=20, warmup=5, max_batch=64)


# --- shared helpers (also used by bench/memory.py) -----------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
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
    model = setr.build_setr(head, backbone, num_classes=num_classes, img_size=img_size, impl=impl,
                            device=device)
    return model.train()


def make_optimizer(model, head):
    """mmseg's SGD for this head's preset (the training engine's own parameter groups)."""
    optim = get_preset(head).optim
    return torch.optim.SGD(param_groups(model, optim.lr, optim.head_lr_mult), lr=optim.lr,
                           momentum=optim.momentum, weight_decay=optim.weight_decay)


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


# --- one variant ---------------------------------------------------------------------------

def run_variant(head, variant, cfg, device):
    """Train-step and inference rows of one variant (rows carry "error" when it failed)."""
    impl, compiled = variant.split("+")[0], variant.endswith("+compile")
    h = w = cfg["img_size"]
    base = dict(kernel=f"setr_{head}_{cfg['backbone']}", head=head, backbone=cfg["backbone"],
                provider=variant, img_size=cfg["img_size"],
                dtype="bf16 autocast, fp32 params" if cfg["dtype"] == "bf16" else "fp32",
                compile_backend=cfg["compile_backend"] if compiled else None)
    train = dict(base, mode="train", shape=f"{cfg['batch']}x3x{h}x{w}", batch=cfg["batch"])
    infer = dict(base, mode="inference", shape=f"1x3x{h}x{w}", batch=1)
    model = runner = optimizer = None
    try:
        torch.manual_seed(0)  # the same weights for every variant: their first losses must agree
        model = build_model(head, cfg["backbone"], impl, cfg["img_size"], cfg["num_classes"], device)
        runner = torch.compile(model, backend=cfg["compile_backend"]) if compiled else model
        optimizer = make_optimizer(model, head)
        flops_per_image = 3 * model.forward_flops(h, w)  # forward + backward (2x forward)
        train["flops_per_image"] = flops_per_image

        # training step
        images, labels = make_batch(cfg["batch"], cfg["img_size"], cfg["num_classes"], device)
        last = {}

        def step():
            last["loss"] = train_step(runner, optimizer, images, labels, device, cfg["dtype"])
            last.setdefault("first_loss", last["loss"])

        _measure(train, step, cfg, device)
        if "error" not in train:
            loss, first = last["loss"].item(), last["first_loss"].item()
            train["loss"], train["first_loss"] = round(loss, 4), round(first, 4)
            if not (math.isfinite(loss) and math.isfinite(first)):
                train["error"] = f"non-finite loss: first step {first}, last step {loss}"
            ips = cfg["batch"] * 1e3 / train["ms"]
            train["images_per_s"] = ips
            train["tflops"] = flops_per_image * ips / 1e12
            peak = peak_flops(cfg["gpu"], cfg["dtype"])
            train["mfu"] = flops_per_image * ips / peak if peak and device.type == "cuda" else None
            if train.get("peak_mem_gib") is not None:
                train["mem_per_image_gib"] = train["peak_mem_gib"] / cfg["batch"]
        images = labels = None
        last.clear()
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()  # inference memory = weights + activations (a later step refills it)
        free_memory()

        # inference: eval mode, whole image, batch 1
        model.eval()
        image, _ = make_batch(1, cfg["img_size"], cfg["num_classes"], device)

        def forward():
            with torch.inference_mode(), autocast(device, cfg["dtype"]):
                runner(image)

        _measure(infer, forward, cfg, device)
        if "error" not in infer:
            infer["fps"] = 1e3 / infer["ms"]
        model.train()
        image = None
        free_memory()

        # largest batch that fits
        if cfg["find_max_batch"] and "error" not in train:
            try:
                b = largest_batch(lambda bs: batch_fits(runner, optimizer, cfg, bs, device),
                                  start=cfg["batch"], cap=cfg["max_batch"])
                train["max_batch"] = b
                train["max_batch_capped"] = b == cfg["max_batch"]
            except Exception as e:  # noqa: BLE001 - reported in the row
                train["max_batch_error"] = error_text(e)
    except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
        train.setdefault("error", error_text(e))
        infer.setdefault("error", train["error"])
    finally:
        model = runner = optimizer = None  # noqa: F841 - frees them before the next variant
        if compiled:
            torch._dynamo.reset()
        free_memory()
    for row in (train, infer):
        for key in ("error", "max_batch_error"):
            if key in row:
                print(f"  {variant} {row['mode']} {key}: {row[key]}")
    return [train, infer]


def _measure(row, fn, cfg, device):
    """Time fn into row (ms, ms_p20, ms_p80, peak_mem_gib); OOM or errors land in row["error"]."""
    try:
        for _ in range(cfg["warmup"]):
            fn()
        if device.type == "cuda":  # steady-state peak: after warm-up (and autotuning) steps
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        row["ms"], row["ms_p20"], row["ms_p80"] = time_steps(fn, cfg["steps"], device)
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    except Exception as e:  # noqa: BLE001
        row["error"] = f"OOM at batch {row['batch']}" if is_oom(e) else error_text(e)
        row.pop("ms", None)


# --- goals -----------------------------------------------------------------------------------

def _verdict(ok):
    return "PASS" if ok else "MISS"


def goal_lines(head, rows, device, gpu_gib=None):
    """One PASS / MISS / n/a line per goal, from the train rows of this run."""
    train = {r["provider"]: r for r in rows if r["mode"] == "train" and "error" not in r}
    if device.type != "cuda":
        return ["- n/a: every goal (CPU run; timings, MFU and memory mean nothing)"]
    lines = []
    ours, eager, eager_c = train.get("triton"), train.get("eager"), train.get("eager+compile")

    def speed(peer, name, goal):
        if ours is None or peer is None:
            return f"- n/a: impl=triton >= {goal}x {name} in images/s (a variant is missing or failed)"
        x = ours["images_per_s"] / peer["images_per_s"]
        return f"- {_verdict(x >= goal)}: impl=triton {x:.2f}x {name} in images/s (goal >= {goal}x)"

    lines.append(speed(eager, "eager", GOAL_SPEEDUP_EAGER))
    lines.append(speed(eager_c, "eager+compile", GOAL_SPEEDUP_EAGER_COMPILE))
    if ours is None or ours.get("mfu") is None:
        lines.append(f"- n/a: MFU >= {GOAL_MFU:.0%} (impl=triton missing, or no peak FLOP/s known for this GPU)")
    else:
        lines.append(f"- {_verdict(ours['mfu'] >= GOAL_MFU)}: impl=triton MFU {ours['mfu']:.1%} "
                     f"(goal >= {GOAL_MFU:.0%})")
    if head != "pup":
        return lines + ["- n/a: the memory goals are set for PUP"]
    if ours is None or ours.get("mem_per_image_gib") is None:
        lines.append(f"- n/a: per-image peak memory <= {GOAL_MEM_PER_IMAGE_GIB} GB (impl=triton missing)")
    else:
        m = ours["mem_per_image_gib"]
        lines.append(f"- {_verdict(m <= GOAL_MEM_PER_IMAGE_GIB)}: impl=triton per-image peak memory "
                     f"{m:.2f} GB at batch {ours['batch']} (goal <= {GOAL_MEM_PER_IMAGE_GIB} GB; "
                     f"the recipe's batch is {GOAL_BATCH})")
    failed = next((r for r in rows if r["mode"] == "train" and r["provider"] == "triton" and "error" in r), None)
    lines.append(batch_goal_line(ours, gpu_gib, failed))
    return lines


def batch_goal_line(ours, gpu_gib, failed=None):
    what = f"batch {GOAL_BATCH} of PUP fits on one {GOAL_GPU_GIB} GB GPU"
    if gpu_gib is not None and gpu_gib > GOAL_GPU_GIB + 0.5:
        return (f"- n/a: {what} (this GPU has {gpu_gib:.0f} GB; rerun with --memory-limit-gb "
                f"{GOAL_GPU_GIB})")
    if ours is None:
        if failed is not None and failed["error"].startswith("OOM") and failed["batch"] <= GOAL_BATCH:
            return f"- MISS: {what} (impl=triton: {failed['error']})"
        return f"- n/a: {what} (impl=triton missing or failed)"
    if ours["batch"] >= GOAL_BATCH:
        return f"- PASS: {what} (ran batch {ours['batch']})"
    if "max_batch" in ours:
        return f"- {_verdict(ours['max_batch'] >= GOAL_BATCH)}: {what} (largest batch {ours['max_batch']})"
    return f"- n/a: {what} (ran batch {ours['batch']}; rerun with --find-max-batch or --batch {GOAL_BATCH})"


# --- output ----------------------------------------------------------------------------------

COLUMNS = ["mode", "provider", "shape", "dtype", "ms", "images_per_s", "fps", "tflops", "mfu",
           "peak_mem_gib", "mem_per_image_gib", "max_batch", "first_loss", "loss", "error", "max_batch_error"]


def plot(rows, path):
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["mode"] == "train" and r.get("ms")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["provider"] for r in train]
    axes[0].bar(names, [r["images_per_s"] for r in train], color="tab:blue")
    axes[0].set_ylabel("images / s")
    axes[1].bar(names, [r.get("peak_mem_gib") or 0 for r in train], color="tab:orange")
    axes[1].set_ylabel("peak allocated (GB)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{rows[0]['kernel']} train step, {train[0]['shape'] if train else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def append_section(md_path, title, lines):
    with open(md_path, "a") as f:
        f.write("\n## " + title + "\n\n" + "\n".join(lines) + "\n")


def add_model_args(p):
    """The flags bench/train_step.py and bench/memory.py share: what model, batch and precision."""
    p.add_argument("--head", default="pup", choices=HEADS + ("all",))
    p.add_argument("--backbone", default=None, help="vit_large (GPU default) | vit_base | vit_tiny (CPU default)")
    p.add_argument("--img-size", type=int, default=None, help="square crop; 512 on GPU, 32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="8 on GPU, 2 on CPU")
    p.add_argument("--num-classes", type=int, default=150)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="bf16 = autocast over fp32 params")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="cap this process's GPU memory (GiB), e.g. 80 to check the 80 GB goal on an H200")
    p.add_argument("--quick", action="store_true", help="tiny config (vit_tiny, 32x32), any device")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<gpu>)")


def resolve_model_args(args, device, tiny, full):
    """The script's defaults (`tiny` on CPU or with --quick, else `full`) overridden by the flags
    given, plus num_classes and dtype; checks the crop and the batch."""
    defaults = tiny if args.quick or device.type != "cuda" else full
    cfg = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in defaults.items()}
    cfg.update(num_classes=args.num_classes, dtype=args.dtype)
    if cfg["img_size"] % PATCH_SIZE:
        raise ValueError(f"--img-size {cfg['img_size']} is not a multiple of the patch size {PATCH_SIZE}")
    if cfg["batch"] < 1:
        raise ValueError(f"--batch must be >= 1, got {cfg['batch']}")
    return cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--steps", type=int, default=None, help="timed steps (median); 20 on GPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; 5 on GPU")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend; inductor on GPU, aot_eager on CPU (inductor takes minutes there)")
    p.add_argument("--find-max-batch", action="store_true", help="also find the largest batch that fits")
    p.add_argument("--max-batch", type=int, default=None, help="cap of the largest-batch search (64 on GPU)")
    return p.parse_args(argv)


def resolve_config(args, device):
    cfg = resolve_model_args(args, device, TINY, FULL)
    cfg.update(find_max_batch=args.find_max_batch,
               compile_backend=args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager"),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    for k in ("steps", "max_batch"):
        if cfg[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    return cfg


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


def main(argv=None):
    args = parse_args(argv)
    device = common.default_device()
    cfg = resolve_config(args, device)
    common.print_cpu_warning()
    set_memory_limit(args.memory_limit_gb, device)
    outdir = args.out or common.results_dir()
    heads = HEADS if args.head == "all" else (args.head,)
    print(f"train step: {cfg['backbone']} {cfg['img_size']}x{cfg['img_size']} batch {cfg['batch']} "
          f"{cfg['dtype']} on {cfg['gpu'] or 'CPU'}; steps {cfg['steps']} after {cfg['warmup']} warm-up; "
          f"compile backend {cfg['compile_backend']}; {ours_note(device)}")
    failed = []
    for head in heads:
        rows = []
        for variant in args.variants:
            print(f"[{head}] {variant} ...", flush=True)
            rows += run_variant(head, variant, cfg, device)
            free_memory()  # the variant's model and graphs are gone once run_variant returned
        common.add_ratios(rows, ours=OURS, keys=("mode",))  # each variant of ours vs every other
        name = f"train_step_{head}"
        paths = common.write_results(name, rows, COLUMNS, outdir, plot=plot)
        goals = goal_lines(head, rows, device, gpu_memory_gib(device, args.memory_limit_gb))
        append_section(paths[1], "Goals", goals)
        print(common.markdown_table(rows, COLUMNS + ["speedup_vs"]))
        print("\n".join(goals))
        print("wrote " + ", ".join(paths))
        failed += [f"{head}/{r['provider']}/{r['mode']}" for r in rows
                   if ("error" in r and not r["error"].startswith("OOM")) or "max_batch_error" in r]
    return common.finish(failed)


if __name__ == "__main__":
    sys.exit(main())
