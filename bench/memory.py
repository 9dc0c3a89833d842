"""Training memory of SETR configs: planned on any machine, measured on a GPU, of training's one step.

    python bench/memory.py --head pup --batch 16                    # plan ViT-L/16 512x512 bf16, impl triton, 1 GPU
    python bench/memory.py --head pup --impl all --recompute all    # every impl under every recompute policy
    python bench/memory.py --head mla --impl all --world-size 8     # 2 images per GPU (16 / 8)
    python bench/memory.py --preset pup_cityscapes --world-size 8   # any training preset: 768x768, 19 classes
    python bench/memory.py --head pup --impl all --max-batch --gpu-memory 80  # largest batch per GPU
    python bench/memory.py --head pup --measure --snapshot          # GPU: the same step for real too
    python bench/memory.py --readme-table                           # re-plan the README's table

Planning (bench/memory_plan.py, seconds per ViT-L config on two CPU cores) runs training's step on
a training preset's model (--head's ADE20K one by default) under FakeTensorMode over a fake process
group of --world-size ranks: the second step's peak per GPU and per image, by category and module.
--measure runs the same two steps for real on a GPU (one process, or torchrun with --world-size
ranks; without a GPU it prints n/a), --snapshot writes its memory_viz snapshot. --batch is per GPU
(default: the preset's over the GPUs). Results: <config>.json per config in --out (default a new
bench/results/memory/<date>/); --readme-table replaces the committed plans in
bench/results/estimate/. GiB = 2^30 bytes. The last lines printed:
    estimate <preset> <impl> recompute=<policy> batch <B> world <W>: peak <X.XX> GiB, <Y.YY> GiB per image
"""
import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as `python bench/<script>.py`: the repo root first, not bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from setr.constants import BACKBONES, HEADS, IMPLS, PATCH_SIZE  # noqa: E402

# What the plan (tensors only) does not see, for --max-batch: the CUDA context, cuBLAS / cuDNN /
# Triton workspaces and NCCL buffers, and the allocator's fragmentation as a share of the peak.
ALLOWANCE_GIB = 1.5
FRAGMENTATION = 0.10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--head", default="pup", choices=HEADS + ("all",), help="its ADE20K preset (default pup)")
    p.add_argument("--preset", default=None, help="a training preset instead (train/config.py), e.g. pup_cityscapes")
    p.add_argument("--impl", default="triton", choices=IMPLS + ("all",))
    p.add_argument("--recompute", default=None, help="none | selective | full | all (default: training's)")
    p.add_argument("--batch", type=int, default=None, help="images per GPU (default: the preset's batch / world size)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs (FSDP ranks)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--crop", type=int, default=None, help="square training crop (default: the preset's)")
    p.add_argument("--num-classes", type=int, default=None, help="(default: the preset's)")
    p.add_argument("--backbone", default="vit_large", choices=BACKBONES)
    p.add_argument("--compile", default="off", choices=("off", "on"), help="on is refused: it cannot be planned")
    p.add_argument("--max-batch", action="store_true", help="find the largest batch per GPU that fits --gpu-memory")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU for --max-batch (default 80)")
    p.add_argument("--measure", action="store_true", help="also run the step for real (GPU: max_memory_allocated)")
    p.add_argument("--snapshot", action="store_true", help="with --measure: a memory_viz snapshot of the measured step")
    p.add_argument("--readme-table", action="store_true", help="re-plan the README table into bench/results/estimate/")
    p.add_argument("--out", default=None, help="results folder (default: a new bench/results/memory/<date>/)")
    args = p.parse_args(argv)
    for name, least in (("world_size", 1), ("batch", 1), ("crop", PATCH_SIZE), ("num_classes", 2)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if (args.crop or 0) % PATCH_SIZE or args.gpu_memory <= 0:
        p.error(f"--crop must be a multiple of {PATCH_SIZE} and --gpu-memory > 0, got {args.crop}, {args.gpu_memory}")
    return args


if __name__ == "__main__":
    parse_args()  # --help and a flag's mistake answer before torch is imported (below)

import torch  # noqa: E402

from bench import (GIB, choose, common, new_results_dir, plan_config, plan_name, readme_tables,  # noqa: E402
                   run_script, writable_dir)
from bench.memory_plan import PlanError, check_config, measure, plan  # noqa: E402
from setr.files import write_atomic  # noqa: E402
from train.config import PRESETS, RECOMPUTE, ParallelConfig  # noqa: E402


def configs_from_args(args):
    presets = choose("preset", args.preset, PRESETS) if args.preset else choose("head", args.head, HEADS)
    policies = choose("recompute", args.recompute or ParallelConfig().recompute, RECOMPUTE)
    return [plan_config(p, i, r, args.world_size, args.batch, args.precision, args.crop, args.num_classes,
                        args.backbone) for p in presets for r in policies for i in choose("impl", args.impl, IMPLS)]


def summary_line(row):
    return (f"estimate {row['preset']} {row['impl']} recompute={row['recompute']} batch {row['batch']} world "
            f"{row['world_size']}: peak {row['peak_gib']:.2f} GiB, {row['per_image_gib']:.2f} GiB per image")


def plan_row(config):
    """One planned config as a results row: the config, the plan in bytes and the GiB summary."""
    result = plan(**{k: v for k, v in config.items() if k not in ("head", "dataset")})
    return dict(config, peak_gib=result["peak"] / GIB, per_image_gib=result["peak"] / GIB / config["batch"],
                saved_activations_gib=result["saved_activations"] / GIB, plan=result)


def max_batch(config, gpu_memory):
    """Largest batch per GPU whose plan fits (0 if batch 1 does not) and its row. Memory is nearly
    affine in the batch: the line through the plans of batch 1 and 8 predicts the answer, and the
    plans around the prediction confirm it."""
    rows = {}
    fits = lambda row: row["peak_gib"] * (1 + FRAGMENTATION) + ALLOWANCE_GIB <= gpu_memory

    def row(b):
        if b not in rows:
            rows[b] = plan_row(dict(config, batch=b))
        return rows[b]

    per_image = (row(8)["peak_gib"] - row(1)["peak_gib"]) / 7
    budget = (gpu_memory - ALLOWANCE_GIB) / (1 + FRAGMENTATION)  # the planned peak that fits
    b = max(1, int(1 + (budget - row(1)["peak_gib"]) / max(per_image, 1e-9)))
    while b > 0 and not fits(row(b)):
        b -= 1
    while fits(row(b + 1)):
        b += 1
    return b, row(max(b, 1))


def breakdown_line(row):
    """Where the planned peak is, and its bytes by category."""
    p = row["plan"]
    parts = ", ".join(f"{c} {v / GIB:.2f}" for c, v in p["peak_by_category"].items() if v)
    return f"  {plan_name(row)}: peak in the {p['peak_at']}: {parts} GiB"


def measure_line(row, snapshot_dir=None):
    """The real step's max_memory_allocated beside the plan (added to the row)."""
    config = {k: row[k] for k in ("preset", "impl", "recompute", "batch", "world_size", "precision", "crop",
                                  "backbone", "num_classes")}
    what = (f"measured {row['preset']} {row['impl']} recompute={row['recompute']} batch {row['batch']} world "
            f"{row['world_size']}")
    snapshot = os.path.join(snapshot_dir, plan_name(row) + "_snapshot.pickle") if snapshot_dir else None
    if not torch.cuda.is_available():  # a real ViT-L step on the CPU would take long and measure nothing
        return f"{what}: n/a (no GPU; the plan stands)"
    try:
        peak = measure(**config, snapshot=snapshot)["measured_peak"]
    except PlanError as e:  # e.g. 8 ranks asked of one process: the plan still stands
        return f"{what}: n/a ({e})"
    except torch.OutOfMemoryError:
        row["measured_error"] = "out of memory"
        torch.cuda.empty_cache()
        return f"{what}: out of memory"
    row["measured_peak_gib"] = peak / GIB
    shot = f"; snapshot {snapshot}: open at https://pytorch.org/memory_viz" if snapshot else ""
    return (f"{what}: max_memory_allocated {peak / GIB:.2f} GiB, planned {row['peak_gib']:.2f} GiB "
            f"(planned / measured {row['peak_gib'] * GIB / peak:.3f}){shot}")


def main(argv=None):
    args = parse_args(argv)
    if args.readme_table:
        configs, out = readme_tables.table_configs(), args.out or readme_tables.ESTIMATE
    else:
        configs, out = configs_from_args(args), args.out or new_results_dir("memory")
    for c in configs:  # every config refused before any is planned
        check_config(c["impl"], c["batch"], c["world_size"], c["crop"], args.compile == "on")
    writable_dir(out)
    rows, notes = [], []
    for config in configs:
        print(f"planning {plan_name(config)}{' (largest batch)' if args.max_batch else ''} ...", flush=True)
        if args.max_batch:
            b, row = max_batch(config, args.gpu_memory)
            notes.append(f"max batch {config['preset']} {config['impl']} recompute={config['recompute']} world "
                         f"{config['world_size']}: {f'{b} per GPU fits' if b else 'not even batch 1 fits'} "
                         f"{args.gpu_memory:g} GiB (planned peak x {1 + FRAGMENTATION:g} fragmentation + "
                         f"{ALLOWANCE_GIB} GiB CUDA context and workspaces)")
        else:
            row = plan_row(config)
        rows.append(row)
    if args.measure or args.snapshot:
        notes += [measure_line(row, out if args.snapshot else None) for row in rows]
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun (measuring on W GPUs): rank 0 reports
        return 0
    env = common.environment()
    env.pop("note", None)  # the CPU-timing caveat: a plan times nothing
    for row in rows:
        path = os.path.join(out, plan_name(row) + ".json")
        write_atomic(path, json.dumps({"environment": env, "row": row}, indent=1))
        print(breakdown_line(row))
    print(f"wrote {len(rows)} plan(s) (<config>.json: the peak by category and by module) to {out}")
    if args.readme_table:
        print(readme_tables.planned_table(out, configs))
    print("\n".join(notes + [summary_line(row) for row in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
