"""End-to-end SETR training-step benchmark: eager vs SDPA vs ours, with and without torch.compile.

    python bench/train_step.py --head pup --batch 8                  # ViT-L/16, 512x512, one GPU
    python bench/train_step.py --head all --find-max-batch           # every head + largest batch
    python bench/train_step.py --head pup --variants eager triton    # a subset of the variants
    python bench/train_step.py --variants triton+compile --append    # add a variant to the last run's file
    python bench/train_step.py --quick                               # tiny config (CPU smoke test)

One step = forward + loss + backward + SGD step + zero_grad, on a fixed random batch
(normalized-like images, labels in [0, num_classes) with ~5% ignored pixels), timed with a
device synchronize around each step: median of --steps after --warmup steps.
Then as many steps again fed by a DataLoader as training builds it (--loader-workers workers,
pinned memory, prefetch 4) over the synthetic dataset through mmseg's training pipeline: the time
blocked on the loader, as a share of those steps, is the data wait (data_wait_share; loader_ms is
their median step, copy to the device included). The synthetic scenes stand in for decoded
ADE20K images (no JPEG decode; bench/bench_data.py measures the real pipeline).

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
data wait, the inference speed (eval mode, whole image, batch 1; --no-inference skips it) and with
--find-max-batch the largest batch that fits (doubling, then bisection, catching out-of-memory
errors). Results go to bench/results/<gpu>/train_step_<head>.{json,md,png}, the JSON and markdown
rewritten after each variant (a run stopped part-way keeps the variants it measured), with
PASS/MISS lines for the goals. --append keeps the rows of the variants this run does not measure from the file already
there (same GPU only).

Without a GPU this runs the tiny config (vit_tiny, 32x32, 8 classes, one step, main-process
loading; torch.compile with Dynamo's graph capture alone, backend "eager", since inductor takes
minutes there) as a smoke test of seconds per variant: the timings, MFU and memory of a CPU run
mean nothing. On CPU impl=triton runs the kernels' plain-PyTorch references unless
TRITON_INTERPRET=1 (our Triton kernels through the interpreter: slow; the tests do this).

Everything on one GPU in under 8 minutes: python bench/gpu_check.py. By hand:
    python bench/kernels.py
    python bench/train_step.py --head pup --batch 16 --find-max-batch   # then naive, mla
    python bench/memory.py --head pup --snapshot                          # then naive, mla
    python bench/readme_tables.py --out bench/results/<gpu>/readme_tables.md
On a GPU with more than 80 GB add --memory-limit-gb 80 to decide the 80 GB goal.
"""
import argparse
import json
import math
import os
import sys

if __package__ in (None, ""):  # run as `python bench/train_step.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench import common
from bench.common import OURS
from bench.step import (
    GIB, autocast, batch_fits, build_model, error_text, free_memory, gpu_memory_gib, is_oom,
    largest_batch, make_batch, make_loader, make_optimizer, ours_note, set_memory_limit, sync,
    time_loader_steps, time_steps, train_step,
)
from setr.constants import HEADS, PATCH_SIZE
from train.config import DataConfig
from train.flops import model_flops_utilization, peak_flops

VARIANTS = ("eager", "sdpa", "triton", "eager+compile", "triton+compile")
OURS_VARIANTS = (OURS, OURS + "+compile")

# Goals checked on a GPU run.
GOAL_SPEEDUP_EAGER = 1.5
GOAL_SPEEDUP_EAGER_COMPILE = 1.1
GOAL_MFU = 0.50
GOAL_MEM_PER_IMAGE_GIB = 2.4  # mmseg's 19.54 GB for 2 images, / 4 (GB = 2^30 bytes, as mmcv logs)
GOAL_BATCH = 16
GOAL_GPU_GIB = 80

TINY = dict(backbone="vit_tiny", img_size=32, batch=1, num_classes=8, steps=1, warmup=0, max_batch=4,
            loader_workers=0)
FULL = dict(backbone="vit_large", img_size=512, batch=8, num_classes=150, steps=20, warmup=5, max_batch=64,
            loader_workers=DataConfig().num_workers)


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
    infer = dict(base, mode="inference", shape=f"1x3x{h}x{w}", batch=1) if cfg["inference"] else None
    model = runner = optimizer = None
    try:
        torch.manual_seed(0)  # the same weights for every variant: their first losses must agree
        model = build_model(head, cfg["backbone"], impl, cfg["img_size"], cfg["num_classes"], device)
        runner = torch.compile(model, backend=cfg["compile_backend"]) if compiled else model
        optimizer = make_optimizer(model, head)
        measure_training(train, runner, optimizer, 3 * model.forward_flops(h, w), cfg, device)
        if cfg["data_wait"] and "error" not in train:
            measure_data_wait(train, runner, optimizer, head, cfg, device)
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()  # inference memory = weights + activations (a later step refills it)
        free_memory()
        if infer is not None:
            measure_inference(infer, model, runner, cfg, device)
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
        if infer is not None:
            infer.setdefault("error", train["error"])
    finally:
        model = runner = optimizer = None  # noqa: F841 - frees them before the next variant
        if compiled:
            torch._dynamo.reset()
        free_memory()
    rows = [r for r in (train, infer) if r is not None]
    for row in rows:
        for key in ("error", "max_batch_error", "data_wait_error"):
            if key in row:
                print(f"  {variant} {row['mode']} {key}: {row[key]}")
    return rows


def measure_training(row, runner, optimizer, flops_per_image, cfg, device):
    """Timed training steps on a fixed batch: ms, images/s, TFLOP/s, MFU, losses, peak memory."""
    images, labels = make_batch(cfg["batch"], cfg["img_size"], cfg["num_classes"], device)
    last = {}

    def step():
        last["loss"] = train_step(runner, optimizer, images, labels, device, cfg["dtype"])
        last.setdefault("first_loss", last["loss"])

    row["flops_per_image"] = flops_per_image
    _measure(row, step, cfg, device)
    if "error" in row:
        return
    loss, first = last["loss"].item(), last["first_loss"].item()
    row["loss"], row["first_loss"] = round(loss, 4), round(first, 4)
    if not (math.isfinite(loss) and math.isfinite(first)):
        row["error"] = f"non-finite loss: first step {first}, last step {loss}"
    ips = cfg["batch"] * 1e3 / row["ms"]
    row["images_per_s"] = ips
    row["tflops"] = flops_per_image * ips / 1e12
    row["mfu"] = model_flops_utilization(flops_per_image, ips, peak_flops(cfg["gpu"], cfg["dtype"]))
    if row.get("peak_mem_gib") is not None:
        row["mem_per_image_gib"] = row["peak_mem_gib"] / cfg["batch"]


def measure_data_wait(row, runner, optimizer, head, cfg, device):
    """Loader-fed steps: loader_ms, data_wait_ms, data_wait_share (data_wait_error if it fails)."""
    try:
        loader = make_loader(head, cfg["batch"], cfg["img_size"], cfg["num_classes"], cfg["loader_workers"],
                             device)
        row["loader"] = loader.description

        def step(images, labels):
            train_step(runner, optimizer, images, labels, device, cfg["dtype"])

        row["loader_ms"], row["data_wait_ms"], row["data_wait_share"] = time_loader_steps(
            step, loader, cfg["steps"], device)
    except Exception as e:  # noqa: BLE001 - reported in the row; the step's own numbers stand
        row["data_wait_error"] = error_text(e)


def measure_inference(row, model, runner, cfg, device):
    """Eval mode, whole image, batch 1: ms and fps."""
    model.eval()
    image, _ = make_batch(1, cfg["img_size"], cfg["num_classes"], device)

    def forward():
        with torch.inference_mode(), autocast(device, cfg["dtype"]):
            runner(image)

    _measure(row, forward, cfg, device)
    if "error" not in row:
        row["fps"] = 1e3 / row["ms"]
    model.train()


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
    ours, eager, eager_c = train.get(OURS), train.get("eager"), train.get("eager+compile")

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
    failed = next((r for r in rows if r["mode"] == "train" and r["provider"] == OURS and "error" in r), None)
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
           "peak_mem_gib", "mem_per_image_gib", "data_wait_share", "max_batch", "first_loss", "loss", "error",
           "max_batch_error", "data_wait_error"]


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
    common.save_figure(fig, path)


def earlier_rows(path, variants, gpu):
    """--append: the rows in an earlier results file except those of `variants` (measured again now)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    if data["environment"].get("gpu") != gpu:
        raise SystemExit(f"--append: {path} comes from {data['environment'].get('gpu') or 'a CPU run'}, this run "
                         f"from {gpu or 'the CPU'}: results of two devices are not merged")
    return [r for r in data["rows"] if r.get("provider") not in variants]


def write_head(head, rows, device, outdir, gpu_gib, with_plot=True):
    """train_step_<head>.{json,md(,png)} from these rows, with the ratios and the goals. Returns (paths, goals)."""
    common.add_ratios(rows, ours=OURS_VARIANTS, keys=("mode",))  # each variant of ours vs every other
    paths = common.write_results(f"train_step_{head}", rows, COLUMNS, outdir, plot=plot if with_plot else None)
    goals = goal_lines(head, rows, device, gpu_gib)
    append_section(paths[1], "Goals", goals)
    return paths, goals


def append_section(md_path, title, lines):
    with open(md_path, "a") as f:
        f.write("\n## " + title + "\n\n" + "\n".join(lines) + "\n")


def add_model_args(p):
    """The flags bench/train_step.py and bench/memory.py share: what model, batch and precision."""
    p.add_argument("--head", default="pup", choices=HEADS + ("all",))
    p.add_argument("--backbone", default=None, help="vit_large (GPU default) | vit_base | vit_tiny (CPU default)")
    p.add_argument("--img-size", type=int, default=None, help="square crop; 512 on GPU, 32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="8 on GPU; the tiny config's (1 or 2) on CPU")
    p.add_argument("--num-classes", type=int, default=None, help="150 (ADE20K); 8 in train_step's tiny config")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="bf16 = autocast over fp32 params")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="cap this process's GPU memory (GiB), e.g. 80 to check the 80 GB goal on an H200")
    p.add_argument("--quick", action="store_true", help="tiny config (vit_tiny, 32x32), any device")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<gpu>)")


def resolve_model_args(args, device, tiny, full):
    """The script's defaults (`tiny` on CPU or with --quick, else `full`) overridden by the flags
    given, plus the number of classes (150, ADE20K's, unless the defaults say) and dtype; checks the
    crop and the batch."""
    defaults = tiny if args.quick or device.type != "cuda" else full
    cfg = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in defaults.items()}
    cfg.update(num_classes=args.num_classes or defaults.get("num_classes", 150), dtype=args.dtype)
    if cfg["img_size"] % PATCH_SIZE:
        raise ValueError(f"--img-size {cfg['img_size']} is not a multiple of the patch size {PATCH_SIZE}")
    if cfg["batch"] < 1:
        raise ValueError(f"--batch must be >= 1, got {cfg['batch']}")
    return cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--steps", type=int, default=None, help="timed steps (median); 20 on GPU, 1 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; 5 on GPU, 0 on CPU")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend; inductor on GPU, eager (Dynamo alone) on CPU, where inductor "
                        "takes minutes")
    p.add_argument("--find-max-batch", action="store_true", help="also find the largest batch that fits")
    p.add_argument("--max-batch", type=int, default=None, help="cap of the largest-batch search (64 on GPU)")
    p.add_argument("--loader-workers", type=int, default=None,
                   help=f"DataLoader workers of the data-wait steps; {FULL['loader_workers']} on GPU "
                        "(training's default), 0 on CPU")
    p.add_argument("--no-data-wait", action="store_true", help="skip the loader-fed steps")
    p.add_argument("--no-inference", action="store_true", help="skip the inference timing")
    p.add_argument("--append", action="store_true",
                   help="keep the other variants' rows of the results file already in --out")
    return p.parse_args(argv)


def resolve_config(args, device):
    cfg = resolve_model_args(args, device, TINY, FULL)
    cfg.update(find_max_batch=args.find_max_batch, data_wait=not args.no_data_wait, inference=not args.no_inference,
               compile_backend=args.compile_backend or common.compile_backend(),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    for k in ("steps", "max_batch"):
        if cfg[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    if cfg["loader_workers"] < 0:
        raise ValueError(f"--loader-workers must be >= 0, got {cfg['loader_workers']}")
    return cfg


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
    gpu_gib = gpu_memory_gib(device, args.memory_limit_gb)
    failed = []
    for head in heads:
        path = os.path.join(outdir, f"train_step_{head}.json")
        rows = earlier_rows(path, args.variants, cfg["gpu"]) if args.append else []
        for variant in args.variants:
            print(f"[{head}] {variant} ...", flush=True)
            new = run_variant(head, variant, cfg, device)
            free_memory()  # the variant's model and graphs are gone once run_variant returned
            rows += new
            paths, goals = write_head(head, rows, device, outdir, gpu_gib, with_plot=variant == args.variants[-1])
            failed += [f"{head}/{r['provider']}/{r['mode']}" for r in new
                       if ("error" in r and not r["error"].startswith("OOM")) or "max_batch_error" in r]
        print(common.markdown_table(rows, COLUMNS + ["speedup_vs"]))
        print("\n".join(goals))
        print("wrote " + ", ".join(paths))
    return common.finish(failed)


if __name__ == "__main__":
    sys.exit(main())
