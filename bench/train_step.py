"""SETR training-step benchmark: training's own step on the model as training builds it.

    python bench/train_step.py --head pup --batch 16                # eager, sdpa, triton; ViT-L/16 512x512, one GPU
    python bench/train_step.py --impl triton --recompute all        # what each recompute policy costs and saves
    python bench/train_step.py --impl eager triton --compile both   # and with training's torch.compile per block
    python bench/train_step.py --quick                              # tiny config (CPU smoke test)

Each variant (impl x recompute policy x compile) is built as `torchrun train/main.py` builds it, on
one rank (bench/step.py: train.build.build_model, then train.parallelize.parallelize: SyncBN, the
recompute policy, torch.compile per block, FSDP2 with bf16 parameters and fp32 reduction) and runs
`train.step.train_step` on a fixed random batch: the median of --steps synchronized steps after
--warmup. Reported: step time, images/s, TFLOP/s and MFU from the analytic FLOPs (3 x
forward_flops against the GPU's dense peak; ours classifies before the last upsample, ~7% fewer
FLOPs for naive/PUP: its MFU is conservative), first and last loss, peak allocated memory and per
image; ratios compare impls under the same recompute policy. Results: train_step_<preset>.{json,md}
with PASS/MISS lines for the goals, in --out (default a new bench/results/train_step/<date>/). The
training command itself: bench/gpu_check.py. Without a GPU: a tiny config, its timings mean nothing.
"""
import argparse
import math
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as `python bench/<script>.py`: the repo root first, not bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from setr.constants import BACKBONES, HEADS, IMPLS, PATCH_SIZE  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--head", default="pup", choices=HEADS + ("all",), help="its ADE20K preset (default pup)")
    p.add_argument("--preset", default=None, help="a training preset instead (train/config.py), e.g. pup_cityscapes")
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--recompute", default=None, help="none | selective | full | all (default: training's)")
    p.add_argument("--compile", default="off", choices=("off", "on", "both"), help="training's torch.compile per block")
    p.add_argument("--backbone", default=None, choices=BACKBONES, help="vit_large on GPU, vit_tiny on CPU")
    p.add_argument("--crop", type=int, default=None, help="square crop; the preset's on GPU, 32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="images per step; 8 on GPU, 1 on CPU")
    p.add_argument("--num-classes", type=int, default=None, help="the preset's on GPU, 8 on CPU")
    p.add_argument("--precision", default=None, choices=("bf16", "fp16", "fp32"), help="bf16 on GPU, fp32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (median); 20 on GPU, 1 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; 5 on GPU, 0 on CPU")
    p.add_argument("--memory-limit-gb", type=float, default=None, help="cap the GPU memory (GiB; 80 on an H200)")
    p.add_argument("--quick", action="store_true", help="the tiny CPU config on any device")
    p.add_argument("--out", default=None, help="output folder (default: a new bench/results/train_step/<date>/)")
    args = p.parse_args(argv)
    for name, least in (("crop", 1), ("batch", 1), ("steps", 1), ("warmup", 0), ("num_classes", 2)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if (args.crop or 0) % PATCH_SIZE:
        p.error(f"--crop {args.crop} is not a multiple of the patch size {PATCH_SIZE}")
    return args


if __name__ == "__main__":
    parse_args()  # --help and a flag's mistake answer before torch is imported (below)

import torch  # noqa: E402

import train.step  # noqa: E402
from bench import (GIB, OURS, choose, common, error_text, new_results_dir, run_config, run_script, step,  # noqa: E402
                   writable_dir)
from train.config import PRESETS, RECOMPUTE, ParallelConfig  # noqa: E402
from train.flops import model_flops_utilization, peak_flops  # noqa: E402
from train.parallelize import destroy_distributed, init_distributed  # noqa: E402

GOAL_SPEEDUP_EAGER = 1.5
GOAL_SPEEDUP_EAGER_COMPILE = 1.1
GOAL_MFU = 0.50
GOAL_MEM_PER_IMAGE_GIB = 2.4  # mmseg's 19.54 GB for 2 images, / 4 (GB = 2^30 bytes, as mmcv logs)
GOAL_BATCH = 16
GOAL_GPU_GIB = 80  # the goals, checked on a GPU
TINY = dict(backbone="vit_tiny", crop=32, batch=1, num_classes=8, steps=1, warmup=0, precision="fp32")
FULL = dict(backbone="vit_large", crop=None, batch=8, num_classes=None, steps=20, warmup=5, precision="bf16")
COLUMNS = ["provider", "recompute", "shape", "dtype", "ms", "images_per_s", "tflops", "mfu", "peak_mem_gib",
           "mem_per_image_gib", "first_loss", "loss", "error"]


def resolve_config(args, on_gpu):
    """The defaults (TINY on CPU or with --quick, else FULL) overridden by the flags given, the
    presets and the variants [(impl, recompute, compile)]."""
    cfg = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in (TINY if args.quick or not on_gpu
                                                                               else FULL).items()}
    cfg["presets"] = choose("preset", args.preset, PRESETS) if args.preset else choose("head", args.head, HEADS)
    policies = choose("recompute", args.recompute or ParallelConfig().recompute, RECOMPUTE)
    compiles = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    cfg["variants"] = [(i, r, c) for c in compiles for r in policies for i in args.impl]
    return cfg


def run_variant(preset, impl, recompute, compile_, cfg, device):
    """The row of one variant (with "error" when it failed)."""
    run = run_config(preset, impl, recompute, cfg["precision"], compile_, cfg["backbone"], cfg["crop"],
                     cfg["num_classes"])
    crop, classes = run.data.crop_size[0], run.model.num_classes
    row = dict(kernel=f"setr_{preset}_{cfg['backbone']}", preset=preset, head=run.model.head, backbone=cfg["backbone"],
               impl=impl, recompute=recompute, compile=compile_, provider=impl + ("+compile" if compile_ else ""),
               mode="train", shape=f"{cfg['batch']}x3x{crop}x{crop}", dtype=cfg["precision"], batch=cfg["batch"])
    try:
        state = train.step.build_step_state(run, step.build_parallel(run, device), device)
        batches = [step.random_batch(cfg["batch"], crop, classes, device)]
        losses = []
        if measure(row, lambda: losses.append(train.step.train_step(state, batches)["loss"]), cfg, device):
            flops, ips = 3 * state.model.forward_flops(crop, crop), cfg["batch"] * 1e3 / row["ms"]
            gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
            row.update(flops_per_image=flops, images_per_s=ips, tflops=flops * ips / 1e12,
                       mfu=model_flops_utilization(flops, ips, peak_flops(gpu, cfg["precision"])),
                       first_loss=round(losses[0], 4), loss=round(losses[-1], 4),
                       mem_per_image_gib=row["peak_mem_gib"] and row["peak_mem_gib"] / cfg["batch"])
            if not (math.isfinite(losses[0]) and math.isfinite(losses[-1])):
                row["error"] = f"non-finite loss: first step {losses[0]}, last step {losses[-1]}"
    except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
        row.setdefault("error", error_text(e))
    finally:
        state = batches = None  # noqa: F841 - frees the model before the next variant
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "error" in row:
        print(f"  {row['provider']} recompute={recompute}: {row['error']}")
    return row


def measure(row, fn, cfg, device):
    """Time fn into row (ms, ms_p20, ms_p80, peak_mem_gib after the warm-up, or "error"); whether it ran."""
    cuda = device.type == "cuda"
    try:
        for _ in range(cfg["warmup"]):
            fn()
        if cuda:  # the steady-state peak: after the warm-up (and autotuning) steps
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
        row["error"] = f"OOM at batch {row['batch']}" if step.is_oom(e) else error_text(e)
        return False


def goal_lines(preset, rows, on_gpu, gpu_gib=None):
    """One PASS / MISS / n/a line per goal, from this run's rows under the first recompute policy
    measured (ours against each peer under that same policy)."""
    if not on_gpu:
        return ["- n/a: every goal (CPU run; timings, MFU and memory mean nothing)"]
    policy = rows[0]["recompute"] if rows else None
    ok = {r["provider"]: r for r in rows if "error" not in r and r["recompute"] == policy}
    ours = ok.get(OURS)
    verdict = lambda passed: "PASS" if passed else "MISS"
    lines = []
    for peer, goal in (("eager", GOAL_SPEEDUP_EAGER), ("eager+compile", GOAL_SPEEDUP_EAGER_COMPILE)):
        if ours is None or peer not in ok:
            lines.append(f"- n/a: impl=triton >= {goal}x {peer} in images/s (a variant is missing or failed)")
        else:
            x = ours["images_per_s"] / ok[peer]["images_per_s"]
            lines.append(f"- {verdict(x >= goal)}: impl=triton {x:.2f}x {peer} in images/s, recompute={policy} "
                         f"(goal >= {goal}x)")
    if ours is None or ours.get("mfu") is None:
        lines.append(f"- n/a: MFU >= {GOAL_MFU:.0%} (impl=triton missing, or no peak FLOP/s known for this GPU)")
    else:
        lines.append(f"- {verdict(ours['mfu'] >= GOAL_MFU)}: impl=triton MFU {ours['mfu']:.1%} "
                     f"(goal >= {GOAL_MFU:.0%})")
    if preset != "pup":
        return lines + ["- n/a: the memory goals are set for PUP on ADE20K"]
    if ours is None or ours.get("mem_per_image_gib") is None:
        lines.append(f"- n/a: per-image peak memory <= {GOAL_MEM_PER_IMAGE_GIB} GB (impl=triton missing)")
    else:
        m = ours["mem_per_image_gib"]
        lines.append(f"- {verdict(m <= GOAL_MEM_PER_IMAGE_GIB)}: impl=triton per-image peak memory {m:.2f} GB at "
                     f"batch {ours['batch']}, recompute={policy} (goal <= {GOAL_MEM_PER_IMAGE_GIB} GB)")
    what = f"batch {GOAL_BATCH} of PUP fits on one {GOAL_GPU_GIB} GB GPU"
    failed = next((r for r in rows if r["provider"] == OURS and "error" in r), None)
    if gpu_gib is not None and gpu_gib > GOAL_GPU_GIB + 0.5:
        return lines + [f"- n/a: {what} (this GPU has {gpu_gib:.0f} GB; rerun with --memory-limit-gb {GOAL_GPU_GIB})"]
    if ours is not None and ours["batch"] >= GOAL_BATCH:
        return lines + [f"- PASS: {what} (ran batch {ours['batch']})"]
    if failed is not None and failed["error"].startswith("OOM") and failed["batch"] <= GOAL_BATCH:
        return lines + [f"- MISS: {what} (impl=triton: {failed['error']})"]
    return lines + [f"- n/a: {what} (impl=triton did not run batch {GOAL_BATCH}: rerun with --batch {GOAL_BATCH})"]


def main(argv=None):
    args = parse_args(argv)
    device = common.default_device()
    cfg = resolve_config(args, device.type == "cuda")
    out = writable_dir(args.out or new_results_dir("train_step"))
    common.print_cpu_warning()
    gpu_gib = None
    if device.type == "cuda":
        gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB
        if args.memory_limit_gb:
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gb / gpu_gib), device)
            gpu_gib = min(gpu_gib, args.memory_limit_gb)
    print(f"train step: {cfg['backbone']} batch {cfg['batch']} {cfg['precision']}, {cfg['steps']} steps after "
          f"{cfg['warmup']}, FSDP2 on one {device.type} rank")
    init_distributed(device.type)  # the one-rank process group training runs in
    failed = []
    try:
        for preset in cfg["presets"]:
            rows = []
            for impl, recompute, compile_ in cfg["variants"]:
                print(f"[{preset}] {impl}{'+compile' if compile_ else ''} recompute={recompute} ...", flush=True)
                rows.append(run_variant(preset, impl, recompute, compile_, cfg, device))
                common.add_ratios(rows, ours=(OURS, OURS + "+compile"), keys=("mode", "recompute"))
                paths = common.write_results(f"train_step_{preset}", rows, COLUMNS, out)
                goals = goal_lines(preset, rows, device.type == "cuda", gpu_gib)
                with open(paths[1], "a") as f:
                    f.write("\n## Goals\n\n" + "\n".join(goals) + "\n")
            failed += [f"{preset}/{r['provider']}/{r['recompute']}" for r in rows
                       if "error" in r and not r["error"].startswith("OOM")]
            print(common.markdown_table(rows, COLUMNS + ["speedup_vs"]) + "\n" + "\n".join(goals))
            print("wrote " + ", ".join(paths))
    finally:
        destroy_distributed()
    return common.finish(failed)


if __name__ == "__main__":
    sys.exit(run_script(main))
