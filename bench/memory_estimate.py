"""`python bench/memory.py --estimate`: the peak training memory of SETR configs, planned on any machine.

    python bench/memory.py --estimate --head pup --batch 16                  # ViT-L/16 512x512 bf16 triton, 1 GPU
    python bench/memory.py --estimate --head mla --impl all --world-size 8   # 2 images per GPU (16 / 8)
    python bench/memory.py --estimate --head pup --impl all --max-batch --gpu-memory 80
    python bench/memory.py --estimate --readme-table                         # the README's planned table

Each config is planned by bench/memory_plan.py (FakeTensorMode + FSDPMemTracker over the training
code's own parallelization, two training steps; about 20-40 s for ViT-L on two CPU cores) and written
to <out>/<config>.json and .md: peak per GPU and per image, by category and by module. On a machine
with a GPU the real step runs too and torch.cuda.max_memory_allocated is printed beside the plan
(--no-measure skips it). The last lines printed are one summary per config:
    estimate <head> <impl> batch <B> world <W>: peak <X.XX> GiB, <Y.YY> GiB per image
GiB = 2^30 bytes. --batch is per GPU; its default is the recipe's global batch (16) over the GPUs.
"""
import argparse
import json
import os

from bench.memory_plan import CATEGORY_ORDER, GIB, MODULES, PlanError, check_plannable, measure, plan
from bench.readme_tables import HEAD_NAMES
from setr.constants import HEADS, IMPLS
from setr.files import write_atomic

RECIPE_BATCH = 16
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "estimate")
# What the plan (tensors only) does not see, for --max-batch: a fixed part for the CUDA context,
# cuBLAS / cuDNN / Triton workspaces and NCCL buffers, and the caching allocator's fragmentation
# (reserved but not allocated) as a share of the planned peak.
ALLOWANCE_GIB = 1.5
FRAGMENTATION = 0.10


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/memory.py --estimate", description=__doc__.split("\n")[0])
    p.add_argument("--estimate", action="store_true", required=True)
    p.add_argument("--head", default="pup", choices=HEADS + ("all",))
    p.add_argument("--impl", default="triton", choices=IMPLS + ("all",))
    p.add_argument("--batch", type=int, default=None, help="images per GPU (default: 16 / world size)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs (FSDP ranks)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--crop", type=int, default=512, help="square training crop")
    p.add_argument("--ac", action="store_true", help="activation checkpointing per transformer block")
    p.add_argument("--compile", default="off", choices=("off", "on"), help="on is refused: it cannot be planned")
    p.add_argument("--backbone", default="vit_large", choices=("vit_large", "vit_base", "vit_tiny"))
    p.add_argument("--num-classes", type=int, default=150)
    p.add_argument("--max-batch", action="store_true", help="find the largest batch per GPU that fits --gpu-memory")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU for --max-batch")
    p.add_argument("--no-measure", action="store_true", help="on a GPU: plan only, skip the real step")
    p.add_argument("--readme-table", action="store_true", help="plan the README table's configs, write its markdown")
    p.add_argument("--out", default=OUT, help="results folder (default bench/results/estimate)")
    p.add_argument("--overwrite", action="store_true", help="replace result files of the same config")
    args = p.parse_args(argv)
    if args.world_size < 1 or args.crop < 16 or args.crop % 16 or args.num_classes < 2:
        p.error(f"--world-size must be >= 1, --crop a multiple of 16, --num-classes >= 2; got "
                f"{args.world_size}, {args.crop}, {args.num_classes}")
    if args.batch is None:
        args.batch = max(1, RECIPE_BATCH // args.world_size)
    if args.batch < 1 or args.gpu_memory <= 0:
        p.error(f"--batch must be >= 1 and --gpu-memory > 0, got {args.batch}, {args.gpu_memory}")
    return args


def config_name(c):
    return (f"{c['head']}_{c['backbone']}_{c['crop']}_{c['impl']}_{c['precision']}_b{c['batch']}"
            f"_w{c['world_size']}{'_ac' if c['ac'] else ''}")


def summary_line(row):
    return (f"estimate {row['head']} {row['impl']} batch {row['batch']} world {row['world_size']}: "
            f"peak {row['peak_gib']:.2f} GiB, {row['per_image_gib']:.2f} GiB per image")


def plan_row(config):
    """One planned config as a results row: the config, the plan in bytes and the GiB summary."""
    result = plan(**config)
    return dict(config, peak_gib=result["peak"] / GIB, per_image_gib=result["peak"] / GIB / config["batch"],
                saved_activations_gib=result["saved_activations"] / GIB, plan=result)


def fits(row, gpu_memory):
    return row["peak_gib"] * (1 + FRAGMENTATION) + ALLOWANCE_GIB <= gpu_memory


def largest_batch(config, gpu_memory):
    """Largest batch per GPU whose plan fits (0 if batch 1 does not) and that batch's row. Memory
    is nearly affine in the batch: a line through the last two plans predicts the batch that
    fills the GPU (secant steps), and the neighbours of the prediction confirm it."""
    rows = {}

    def row(b):
        if b not in rows:
            rows[b] = safe_plan_row(dict(config, batch=b))
        return rows[b]

    if not fits(row(1), gpu_memory):
        return 0, row(1)
    budget = (gpu_memory - ALLOWANCE_GIB) / (1 + FRAGMENTATION)  # the planned peak that fits
    a, b = 1, 8
    for _ in range(4):
        per_image = (row(b)["peak_gib"] - row(a)["peak_gib"]) / (b - a)
        guess = max(1, int(b + (budget - row(b)["peak_gib"]) / max(per_image, 1e-9)))
        if guess == b:
            break
        a, b = b, guess
    while b > 1 and not fits(row(b), gpu_memory):
        b -= 1
    while fits(row(b + 1), gpu_memory):
        b += 1
    return b, row(b)


def render_markdown(row, environment):
    """The markdown report of one planned config."""
    p, b = row["plan"], row["batch"]
    gib = lambda v: f"{v / GIB:.3f}"
    lines = [f"# Planned training memory: {HEAD_NAMES[row['head']]} {row['backbone']} {row['crop']}x{row['crop']}, "
             f"impl={row['impl']}, {row['precision']}, batch {b} per GPU, {row['world_size']} GPU(s)"
             f"{', activation checkpointing' if row['ac'] else ''}", "",
             f"Planned (FakeTensorMode + FSDPMemTracker, bench/memory_plan.py; torch {environment.get('torch')}, "
             f"commit {(environment.get('git_commit') or 'unknown')[:10]}). GiB = 2^30 bytes.", "",
             f"Peak of the second training step: **{row['peak_gib']:.2f} GiB per GPU, "
             f"{row['per_image_gib']:.3f} GiB per image**, in the {p['peak_at']}. Not included: the CUDA "
             f"context, workspaces and allocator fragmentation (--max-batch allows {ALLOWANCE_GIB} GiB + "
             f"{FRAGMENTATION:.0%} for them).", ""]
    if row.get("measured_peak_gib") is not None:
        lines += [f"Measured on {environment.get('gpu')}: torch.cuda.max_memory_allocated "
                  f"{row['measured_peak_gib']:.2f} GiB.", ""]
    lines += ["| category | at the peak (GiB) | per image | end of forward (GiB) |", "|---|---|---|---|"]
    for c in CATEGORY_ORDER:
        lines.append(f"| {c} | {gib(p['peak_by_category'][c])} | {gib(p['peak_by_category'][c] / b)} | "
                     f"{gib(p['forward_end'][c])} |")
    lines += ["", "Per module: the activations its forward keeps for the backward (by the module whose op "
              "allocated them), the step's memory at its highest while the module runs, its largest tensor.", "",
              "| module | activations kept (GiB) | per image | peak in forward (GiB) | peak in backward (GiB) | "
              "largest tensor |", "|---|---|---|---|---|---|"]
    for name in MODULES:
        m = p["modules"][name]
        largest = "-" if m["largest"] is None else f"{tuple(m['largest'][1])} {m['largest'][2]}"
        lines.append(f"| {name} | {gib(m['saved'])} | {gib(m['saved'] / b)} | {gib(m['peak_forward'])} | "
                     f"{gib(m['peak_backward'])} | {largest} |")
    return "\n".join(lines) + "\n"


def write_row(row, outdir, environment):
    base = os.path.join(outdir, config_name(row))
    write_atomic(base + ".json", json.dumps({"environment": environment, "row": row}, indent=1) + "\n")
    write_atomic(base + ".md", render_markdown(row, environment))
    return [base + ".json", base + ".md"]


def check_free(configs, outdir, overwrite):
    """Refuse before any work when a result file of one of these configs exists (unless --overwrite)."""
    taken = [os.path.join(outdir, config_name(c) + ".json") for c in configs]
    taken = [t for t in taken if os.path.exists(t)]
    if taken and not overwrite:
        raise PlanError(f"{taken[0]} exists ({len(taken)} result file(s) of these configs do): pass --overwrite "
                        f"to replace them, or --out another folder")


def environment():
    from bench import common

    env = common.environment()
    env.pop("note", None)  # the CPU-timing caveat: a plan times nothing
    return env


def configs_from_args(args):
    heads = HEADS if args.head == "all" else (args.head,)
    impls = IMPLS if args.impl == "all" else (args.impl,)
    return [dict(head=h, impl=i, batch=args.batch, world_size=args.world_size, precision=args.precision,
                 crop=args.crop, ac=args.ac, compile_=False, backbone=args.backbone, num_classes=args.num_classes)
            for h in heads for i in impls]


def safe_plan_row(config):
    try:
        return plan_row(config)
    except PlanError:
        raise
    except Exception as e:  # a config the planner cannot trace is refused, never approximated
        raise PlanError(f"cannot plan {config_name(config)}: {type(e).__name__}: {e}") from e


def add_measurement(row):
    """On a GPU: the real step's max_memory_allocated beside the plan (one process: world size 1,
    or torchrun with --world-size ranks)."""
    import torch

    config = {k: row[k] for k in ("head", "impl", "batch", "world_size", "precision", "crop", "ac", "backbone",
                                  "num_classes")}
    try:
        peak = measure(**config)["measured_peak"]
    except PlanError as e:  # e.g. 8 ranks asked of one process: the plan still stands
        return f"measured {row['head']} {row['impl']} batch {row['batch']} world {row['world_size']}: n/a ({e})"
    except torch.OutOfMemoryError:
        row["measured_error"] = "out of memory"
        torch.cuda.empty_cache()
        return f"measured {row['head']} {row['impl']} batch {row['batch']} world {row['world_size']}: out of memory"
    row["measured_peak_gib"] = peak / GIB
    return (f"measured {row['head']} {row['impl']} batch {row['batch']} world {row['world_size']}: "
            f"max_memory_allocated {peak / GIB:.2f} GiB, planned {row['peak_gib']:.2f} GiB "
            f"(planned / measured {row['peak_gib'] * GIB / peak:.3f})")


def main(argv=None):
    import sys

    import torch

    args = parse_args(argv)
    try:
        check_plannable("eager", args.compile == "on")
        os.makedirs(args.out, exist_ok=True)
        if args.readme_table:
            return readme_table_main(args)
        configs = configs_from_args(args)
        if not args.max_batch:
            check_free(configs, args.out, args.overwrite)
        rows, notes = [], []
        for config in configs:
            print(f"planning {config_name(config)}{' (largest batch)' if args.max_batch else ''} ...", flush=True)
            if args.max_batch:
                b, row = largest_batch(config, args.gpu_memory)
                fit = f"{b} per GPU fits" if b else "not even batch 1 fits"
                notes.append(f"max batch {config['head']} {config['impl']} world {config['world_size']}: {fit} "
                             f"{args.gpu_memory:g} GiB (planned peak x {1 + FRAGMENTATION:g} fragmentation "
                             f"+ {ALLOWANCE_GIB} GiB CUDA context and workspaces)")
            else:
                row = safe_plan_row(config)
            rows.append(row)
        if torch.cuda.is_available() and not args.no_measure:
            notes += [add_measurement(row) for row in rows]
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun (measuring on W GPUs): rank 0 reports
            return 0
        env = environment()
        for row in rows:
            check_free([row], args.out, args.overwrite)
            print("wrote " + ", ".join(write_row(row, args.out, env)))
        print("\n".join(notes + [summary_line(row) for row in rows]))
        return 0
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# --- the README table ------------------------------------------------------------------------

TABLE = [("naive", 16), ("pup", 16), ("mla", 16), ("mla", 8)]  # (head, global batch) of the recipes
TABLE_WORLDS = (1, 8)
TABLE_COLUMNS = [("eager", False), ("sdpa", False), ("triton", False), ("triton", True)]  # (impl, AC)
# mmseg's published Mem (GB) of these recipes (their SETR README): fp32, 8 GPUs x global / 8 images
MMSEG_MEM_GB = {("naive", 16): 18.40, ("pup", 16): 19.54, ("mla", 16): 17.30, ("mla", 8): 10.96}


def table_configs():
    return [dict(head=h, impl=i, batch=g // w, world_size=w, precision="bf16", crop=512, ac=ac, compile_=False,
                 backbone="vit_large", num_classes=150)
            for h, g in TABLE for w in TABLE_WORLDS for i, ac in TABLE_COLUMNS]


def load_row(outdir, config):
    path = os.path.join(outdir, config_name(config) + ".json")
    with open(path) as f:
        return json.load(f)


def render_table(outdir):
    """The README's planned-memory table, every number read from the results files in outdir."""
    lines = ["| model | global batch | GPUs x images/GPU | eager | sdpa | triton | triton + AC | "
             "mmseg Mem (GB), theirs |", "|---|---|---|---|---|---|---|---|"]
    envs = []
    for head, global_batch in TABLE:
        for world in TABLE_WORLDS:
            cells = []
            for impl, ac in TABLE_COLUMNS:
                config = dict(head=head, impl=impl, batch=global_batch // world, world_size=world, precision="bf16",
                              crop=512, ac=ac, backbone="vit_large")
                data = load_row(outdir, config)
                envs.append(data["environment"])
                cells.append(f"{data['row']['peak_gib']:.2f} ({data['row']['per_image_gib']:.2f})")
            theirs = (f"{MMSEG_MEM_GB[head, global_batch]:.2f} (fp32, 8 x {global_batch // 8})" if world == 8 else "")
            lines.append(f"| {HEAD_NAMES[head]} | {global_batch} | {world} x {global_batch // world} | "
                         + " | ".join(cells) + f" | {theirs} |")
    commits = sorted({(e.get("git_commit") or "unknown")[:10] for e in envs})
    lines += ["", f"Planned, not yet measured: GiB per GPU (per image in parentheses), ViT-L/16, 512x512, bf16 "
              f"(FSDP2 mixed precision), the peak of a training step planned on CPU by `python bench/memory.py "
              f"--estimate --readme-table` (torch {envs[0].get('torch')}, commit {', '.join(commits)}); every number "
              f"is read from `bench/results/estimate/<config>.json`. mmseg's Mem (GB) is theirs: fp32, "
              f"8 GPUs x 2 (b16) or x 1 (b8) images, max allocated per GPU (GB = 2^30 bytes)."]
    return "\n".join(lines) + "\n"


def readme_table_main(args):
    """Plan the table's configs that have no results file yet (all of them with --overwrite) and
    write <out>/readme_table.md."""
    env = environment()
    for config in table_configs():
        if os.path.exists(os.path.join(args.out, config_name(config) + ".json")) and not args.overwrite:
            continue
        print(f"planning {config_name(config)} ...", flush=True)
        row = safe_plan_row(config)
        write_row(row, args.out, env)
        print(summary_line(row), flush=True)
    table = render_table(args.out)
    path = os.path.join(args.out, "readme_table.md")
    write_atomic(path, table)
    print(table + f"wrote {path}")
    return 0
