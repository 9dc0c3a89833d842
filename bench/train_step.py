"""SETR training-step benchmark: training's own step on the model as training builds it.

    python bench/train_step.py --head pup --batch 16                # eager, sdpa, triton; ViT-L/16 512x512, one GPU
    python bench/train_step.py --impl triton --recompute all        # what each recompute policy costs and saves
    python bench/train_step.py --impl eager triton --compile on     # training's per-block torch.compile
    python bench/train_step.py --head all --find-max-batch          # every head + the largest batch that fits
    python bench/train_step.py --quick                              # tiny config (CPU smoke test)

Each variant (impl x recompute policy x compile) is built exactly as `torchrun train/main.py` builds
it, on one rank: `train.build.build_model`, then `train.parallelize.parallelize` (SyncBN, the
recompute policy, torch.compile per block, FSDP2 with MixedPrecisionPolicy(bf16 params, fp32
reduce)) in a one-process group, and steps with `train.step.train_step` (forward, backward,
grad norm, the packed all-reduce, SGD with mmseg's recipe, the one host read) on a fixed random
batch: the median of --steps steps after --warmup, each synchronized.

Reported per variant: step time, images/s, achieved TFLOP/s and MFU from the analytic FLOPs
(3 x forward_flops against the GPU's dense peak; ours classifies before the last upsample and is
credited ~7% fewer FLOPs for naive/PUP: its MFU is conservative), the first and last loss, peak
allocated memory and per image, the inference speed (eval mode, whole image, batch 1, autocast;
--no-inference skips it) and with --find-max-batch the largest batch that fits (out-of-memory
errors caught). Ratios compare impls under the same recompute policy. Results go to
<out>/train_step_<head>.{json,md} (default bench/results/<gpu>/), rewritten after each variant (a
run stopped part-way keeps what it measured), with PASS/MISS lines for the goals. The training
command itself, data loading included: bench/gpu_check.py.

Without a GPU this runs the tiny config (vit_tiny, 32x32, 8 classes, fp32, one step) as a smoke
test of seconds per variant: the timings, MFU and memory of a CPU run mean nothing.
"""
import argparse
import math
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as `python bench/<script>.py`: the repo root first, not bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import GIB, OURS, UsageError, run_script

IMPLS = ("eager", "sdpa", "triton")
# Goals checked on a GPU run.
GOAL_SPEEDUP_EAGER = 1.5
GOAL_SPEEDUP_EAGER_COMPILE = 1.1
GOAL_MFU = 0.50
GOAL_MEM_PER_IMAGE_GIB = 2.4  # mmseg's 19.54 GB for 2 images, / 4 (GB = 2^30 bytes, as mmcv logs)
GOAL_BATCH = 16
GOAL_GPU_GIB = 80
TINY = dict(backbone="vit_tiny", crop=32, batch=1, num_classes=8, steps=1, warmup=0, max_batch=4, precision="fp32")
FULL = dict(backbone="vit_large", crop=512, batch=8, num_classes=150, steps=20, warmup=5, max_batch=64,
            precision="bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--head", default="pup", choices=("naive", "pup", "mla", "all"))
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--recompute", nargs="+", default=None,
                   help="none | selective | full | all (default: training's, train/config.py)")
    p.add_argument("--compile", default="off", choices=("off", "on", "both"),
                   help="training's torch.compile of each block (parallel.compile)")
    p.add_argument("--backbone", default=None, help="vit_large (GPU default) | vit_base | vit_tiny (CPU default)")
    p.add_argument("--crop", type=int, default=None, help="square crop; 512 on GPU, 32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="images per step; 8 on GPU, 1 on CPU")
    p.add_argument("--num-classes", type=int, default=None, help="150 (ADE20K) on GPU, 8 on CPU")
    p.add_argument("--precision", default=None, choices=("bf16", "fp16", "fp32"), help="bf16 on GPU, fp32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (median); 20 on GPU, 1 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; 5 on GPU, 0 on CPU")
    p.add_argument("--find-max-batch", action="store_true", help="also find the largest batch that fits")
    p.add_argument("--max-batch", type=int, default=None, help="cap of the largest-batch search (64 on GPU)")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="cap this process's GPU memory (GiB), e.g. 80 to decide the 80 GB goal on an H200")
    p.add_argument("--no-inference", action="store_true", help="skip the inference timing")
    p.add_argument("--quick", action="store_true", help="the tiny CPU config on any device")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<gpu>)")
    args = p.parse_args(argv)
    for name in ("crop", "batch", "steps", "max_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def resolve_config(args, on_gpu):
    """The defaults (TINY on CPU or with --quick, else FULL) overridden by the flags given, the
    variants [(impl, recompute, compile)] and the heads."""
    from setr.layers import PATCH_SIZE
    from setr.model import HEADS
    from train.config import RECOMPUTE, ParallelConfig

    defaults = TINY if args.quick or not on_gpu else FULL
    cfg = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in defaults.items()}
    if cfg["crop"] % PATCH_SIZE:
        raise UsageError(f"--crop {cfg['crop']} is not a multiple of the patch size {PATCH_SIZE}")
    policies = args.recompute or [ParallelConfig().recompute]
    policies = list(RECOMPUTE) if policies == ["all"] else policies
    bad = [r for r in policies if r not in RECOMPUTE]
    if bad:
        raise UsageError(f"--recompute {bad[0]!r}: expected one of {', '.join(RECOMPUTE)} or all")
    compiles = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    cfg["variants"] = [(i, r, c) for c in compiles for r in policies for i in args.impl]
    cfg["heads"] = HEADS if args.head == "all" else (args.head,)
    return cfg


def variant_name(impl, compile_):
    return impl + ("+compile" if compile_ else "")


# --- one variant ---------------------------------------------------------------------------

def run_variant(head, impl, recompute, compile_, cfg, device, find_max_batch, inference):
    """Train-step and inference rows of one variant (rows carry "error" when it failed)."""
    import torch

    from bench import common, step
    from train.build import build_model
    from train.step import build_step_state

    base = dict(kernel=f"setr_{head}_{cfg['backbone']}", head=head, backbone=cfg["backbone"], impl=impl,
                recompute=recompute, compile=compile_, provider=variant_name(impl, compile_), dtype=cfg["precision"])
    train = dict(base, mode="train", shape=f"{cfg['batch']}x3x{cfg['crop']}x{cfg['crop']}", batch=cfg["batch"])
    # inference runs the plain eval model (as training's evaluation and setr.predict do): once per impl
    infer = (dict(base, mode="inference", shape=f"1x3x{cfg['crop']}x{cfg['crop']}", batch=1)
             if inference and not compile_ else None)
    run = step.run_config(head, impl, recompute, cfg["precision"], compile_, cfg["backbone"], cfg["crop"],
                          cfg["num_classes"])
    state = None
    try:
        torch.manual_seed(0)  # the same weights for every variant: their first losses must agree
        state = build_step_state(run, step.build_parallel(run, device), device)
        measure_training(train, state, 3 * state.model.forward_flops(cfg["crop"], cfg["crop"]), cfg, device)
        if find_max_batch and "error" not in train:
            fits = lambda b: batch_fits(state, cfg, b, device)
            train["max_batch"] = common.largest_batch(fits, start=cfg["batch"], cap=cfg["max_batch"])
            train["max_batch_capped"] = train["max_batch"] == cfg["max_batch"]
        state = None
        free_memory()
        if infer is not None:
            measure_inference(infer, build_model(run, device, log=None).eval(), cfg, device)
    except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
        train.setdefault("error", step.error_text(e))
        if infer is not None:
            infer.setdefault("error", train["error"])
    finally:
        state = None  # noqa: F841 - frees the model before the next variant
        torch._dynamo.reset()
        free_memory()
    rows = [r for r in (train, infer) if r is not None]
    for row in rows:
        if "error" in row:
            print(f"  {row['provider']} recompute={recompute} {row['mode']}: {row['error']}")
    return rows


def free_memory():
    import gc

    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def measure_training(row, state, flops_per_image, cfg, device):
    """Timed steps on a fixed batch: ms, images/s, TFLOP/s, MFU, losses, peak memory."""
    from bench.step import random_batch
    from train.flops import model_flops_utilization, peak_flops
    from train.step import train_step

    batches = [random_batch(cfg["batch"], cfg["crop"], cfg["num_classes"], device)]
    losses = []
    row["flops_per_image"] = flops_per_image
    if not _measure(row, lambda: losses.append(train_step(state, batches)["loss"]), cfg, device):
        return
    row["first_loss"], row["loss"] = round(losses[0], 4), round(losses[-1], 4)
    if not (math.isfinite(losses[0]) and math.isfinite(losses[-1])):
        row["error"] = f"non-finite loss: first step {losses[0]}, last step {losses[-1]}"
    ips = cfg["batch"] * 1e3 / row["ms"]
    gpu = device_name(device)
    row.update(images_per_s=ips, tflops=flops_per_image * ips / 1e12,
               mfu=model_flops_utilization(flops_per_image, ips, peak_flops(gpu, cfg["precision"])))
    if row.get("peak_mem_gib") is not None:
        row["mem_per_image_gib"] = row["peak_mem_gib"] / cfg["batch"]


def batch_fits(state, cfg, batch, device):
    """Two steps at this batch: True, or False on out-of-memory (other errors raise)."""
    from bench.step import is_oom, random_batch
    from train.step import train_step

    try:
        batches = [random_batch(batch, cfg["crop"], cfg["num_classes"], device)]
        for _ in range(2):
            train_step(state, batches)
        return True
    except Exception as e:  # noqa: BLE001 - only out-of-memory is swallowed
        if is_oom(e):
            return False
        raise
    finally:
        state.optimizer.zero_grad(set_to_none=True)
        free_memory()


def measure_inference(row, model, cfg, device):
    """Eval mode, whole image, batch 1, autocast in the training precision: ms and fps."""
    import torch

    from bench.step import random_batch
    from train.parallelize import DTYPES

    image, _ = random_batch(1, cfg["crop"], cfg["num_classes"], device)
    low = DTYPES[cfg["precision"]] if cfg["precision"] != "fp32" else None

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=low, enabled=low is not None):
            model(image)

    if _measure(row, forward, cfg, device):
        row["fps"] = 1e3 / row["ms"]


def _measure(row, fn, cfg, device):
    """Time fn into row (ms, ms_p20, ms_p80, peak_mem_gib); out-of-memory or errors land in
    row["error"]. Returns whether it ran."""
    import torch

    from bench.step import error_text, is_oom

    cuda = device.type == "cuda"
    try:
        for _ in range(cfg["warmup"]):
            fn()
        if cuda:  # steady-state peak: after warm-up (and autotuning) steps
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(cfg["steps"]):
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        row.update(ms=statistics.median(times), ms_p20=times[int(0.2 * (len(times) - 1))],
                   ms_p80=times[int(0.8 * (len(times) - 1))],
                   peak_mem_gib=torch.cuda.max_memory_allocated(device) / GIB if cuda else None)
        return True
    except Exception as e:  # noqa: BLE001
        row["error"] = f"OOM at batch {row['batch']}" if is_oom(e) else error_text(e)
        return False


def device_name(device):
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


# --- goals -----------------------------------------------------------------------------------

def _verdict(ok):
    return "PASS" if ok else "MISS"


def goal_lines(head, rows, on_gpu, gpu_gib=None):
    """One PASS / MISS / n/a line per goal, from the train rows of this run (ours against each
    peer under the same recompute policy; the goals take the first policy measured)."""
    if not on_gpu:
        return ["- n/a: every goal (CPU run; timings, MFU and memory mean nothing)"]
    train = [r for r in rows if r["mode"] == "train"]
    policy = train[0]["recompute"] if train else None
    ok = {r["provider"]: r for r in train if "error" not in r and r["recompute"] == policy}
    ours, eager, eager_c = ok.get(OURS), ok.get("eager"), ok.get("eager+compile")

    def speed(peer, name, goal):
        if ours is None or peer is None:
            return f"- n/a: impl=triton >= {goal}x {name} in images/s (a variant is missing or failed)"
        x = ours["images_per_s"] / peer["images_per_s"]
        return f"- {_verdict(x >= goal)}: impl=triton {x:.2f}x {name} in images/s, recompute={policy} (goal >= {goal}x)"

    lines = [speed(eager, "eager", GOAL_SPEEDUP_EAGER), speed(eager_c, "eager+compile", GOAL_SPEEDUP_EAGER_COMPILE)]
    if ours is None or ours.get("mfu") is None:
        lines.append(f"- n/a: MFU >= {GOAL_MFU:.0%} (impl=triton missing, or no peak FLOP/s known for this GPU)")
    else:
        lines.append(f"- {_verdict(ours['mfu'] >= GOAL_MFU)}: impl=triton MFU {ours['mfu']:.1%} (goal >= {GOAL_MFU:.0%})")
    if head != "pup":
        return lines + ["- n/a: the memory goals are set for PUP"]
    if ours is None or ours.get("mem_per_image_gib") is None:
        lines.append(f"- n/a: per-image peak memory <= {GOAL_MEM_PER_IMAGE_GIB} GB (impl=triton missing)")
    else:
        m = ours["mem_per_image_gib"]
        lines.append(f"- {_verdict(m <= GOAL_MEM_PER_IMAGE_GIB)}: impl=triton per-image peak memory {m:.2f} GB at "
                     f"batch {ours['batch']}, recompute={policy} (goal <= {GOAL_MEM_PER_IMAGE_GIB} GB)")
    failed = next((r for r in train if r["provider"] == OURS and "error" in r), None)
    return lines + [batch_goal_line(ours, gpu_gib, failed)]


def batch_goal_line(ours, gpu_gib, failed=None):
    what = f"batch {GOAL_BATCH} of PUP fits on one {GOAL_GPU_GIB} GB GPU"
    if gpu_gib is not None and gpu_gib > GOAL_GPU_GIB + 0.5:
        return f"- n/a: {what} (this GPU has {gpu_gib:.0f} GB; rerun with --memory-limit-gb {GOAL_GPU_GIB})"
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

COLUMNS = ["mode", "provider", "recompute", "shape", "dtype", "ms", "images_per_s", "fps", "tflops", "mfu",
           "peak_mem_gib", "mem_per_image_gib", "max_batch", "first_loss", "loss", "error"]


def write_head(head, rows, on_gpu, outdir, gpu_gib):
    """train_step_<head>.{json,md} with the ratios and the goals. Returns (paths, goals)."""
    from bench import common

    ours = (OURS, variant_name(OURS, True))  # each variant of ours vs every other, under the same policy
    common.add_ratios(rows, ours=ours, keys=("mode", "recompute"))
    paths = common.write_results(f"train_step_{head}", rows, COLUMNS, outdir)
    goals = goal_lines(head, rows, on_gpu, gpu_gib)
    with open(paths[1], "a") as f:
        f.write("\n## Goals\n\n" + "\n".join(goals) + "\n")
    return paths, goals


def main(argv=None):
    args = parse_args(argv)
    import torch  # after the arguments, so that --help answers at once

    from bench import common
    from train.parallelize import destroy_distributed, init_distributed

    device = common.default_device()
    cfg = resolve_config(args, device.type == "cuda")
    common.print_cpu_warning()
    gpu_gib = None
    if device.type == "cuda":
        gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB
        if args.memory_limit_gb:
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gb / gpu_gib), device)
            gpu_gib = min(gpu_gib, args.memory_limit_gb)
    outdir = args.out or common.results_dir()
    print(f"train step: {cfg['backbone']} {cfg['crop']}x{cfg['crop']} batch {cfg['batch']} {cfg['precision']} on "
          f"{device_name(device) or 'CPU'}; steps {cfg['steps']} after {cfg['warmup']} warm-up; FSDP2 on one rank")
    init_distributed(device.type)  # the one-rank process group training runs in
    failed = []
    try:
        for head in cfg["heads"]:
            rows = []
            for impl, recompute, compile_ in cfg["variants"]:
                print(f"[{head}] {variant_name(impl, compile_)} recompute={recompute} ...", flush=True)
                new = run_variant(head, impl, recompute, compile_, cfg, device, args.find_max_batch,
                                  not args.no_inference)
                rows += new
                paths, goals = write_head(head, rows, device.type == "cuda", outdir, gpu_gib)
                failed += [f"{head}/{r['provider']}/{r['recompute']}/{r['mode']}" for r in new
                           if "error" in r and not r["error"].startswith("OOM")]
            print(common.markdown_table(rows, COLUMNS + ["speedup_vs"]))
            print("\n".join(goals))
            print("wrote " + ", ".join(paths))
    finally:
        destroy_distributed()
    return common.finish(failed)


if __name__ == "__main__":
    sys.exit(run_script(main))
