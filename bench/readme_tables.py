"""Every README table, rendered from results files and nothing else.

    python bench/readme_tables.py                        # the planned-memory table + the GPU tables
    python bench/readme_tables.py --results bench/results/NVIDIA_H100_80GB_HBM3 --out tables.md

Planned memory: the plans of TABLE's configs in bench/results/estimate/ (bench/memory.py
--readme-table), a row per dataset, model, layout and recompute policy, a column per impl, beside
mmseg's published Mem. From a gpu_check folder (the only one in bench/results unless --results
names it): the training run, the train step per preset and the kernels, each table naming its
files and their GPU, torch, triton, commit and date. CPU results are refused unless --allow-cpu.
"""
import argparse
import glob
import json
import os
import sys
import textwrap

if __package__ in (None, ""):  # run as `python bench/<script>.py`: the repo root first, not bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import OURS, REPO, RESULTS, UsageError, plan_config, plan_name, run_script, writable_dir

HEAD_NAMES = {"naive": "SETR-Naive", "pup": "SETR-PUP", "mla": "SETR-MLA"}
BACKBONE_NAMES = {"vit_large": "ViT-L/16", "vit_base": "ViT-B/16", "vit_tiny": "ViT-tiny"}
IMPL_ORDER = ("eager", "sdpa", OURS)
ESTIMATE = os.path.join(RESULTS, "estimate")

# The planned table: (training preset, GPU counts, every recompute policy or training's default
# only), and mmseg's published Mem (GB; fp32, 8 GPUs x batch / 8) of those recipes.
TABLE = [("naive", (8,), True), ("pup", (1, 8), True), ("mla", (8,), True), ("mla_b8", (8,), True),
         ("naive_cityscapes", (8,), True), ("pup_cityscapes", (8,), True), ("mla_cityscapes", (8,), True),
         ("pup_pascal_context", (8,), False)]
MMSEG_MEM_GB = {"naive": 18.40, "pup": 19.54, "mla": 17.30, "mla_b8": 10.96, "naive_cityscapes": 24.06,
                "pup_cityscapes": 27.96, "mla_cityscapes": 24.10}


def table_configs():
    """The planned table's configs (bench.plan_config), which bench/memory.py --readme-table plans."""
    from train.config import RECOMPUTE, ParallelConfig

    return [plan_config(preset, impl, policy, world) for preset, worlds, every in TABLE for world in worlds
            for policy in (RECOMPUTE if every else (ParallelConfig().recompute,)) for impl in IMPL_ORDER]


def planned_table(estimate_dir=ESTIMATE, configs=None):
    """The README's planned-memory table from the plans of `configs` (default TABLE's) in estimate_dir: a row
    per dataset, model, layout and recompute policy (a layout's policies by planned memory, most first)."""
    rows, envs = {}, []
    paths = [os.path.join(estimate_dir, plan_name(c) + ".json") for c in configs or table_configs()]
    for path in filter(os.path.exists, paths):
        with open(path) as f:
            data = json.load(f)
        r = data["row"]
        envs.append(data["environment"])
        key = (r["dataset"], r["crop"], r["head"], r["preset"], r["batch"] * r["world_size"], r["world_size"],
               r["recompute"])
        rows.setdefault(key, {})[r["impl"]] = r
    if not rows:
        return f"No plans in {estimate_dir}: run `python bench/memory.py --readme-table`.\n"
    presets, heads = [t[0] for t in TABLE], list(HEAD_NAMES)
    order = lambda k: (presets.index(k[3]) if k[3] in presets else len(presets), heads.index(k[2]), k[5],
                       -max(r["peak_gib"] for r in rows[k].values()))
    lines = ["| dataset, crop | model | global batch | GPUs x images | recompute | eager | sdpa | triton | "
             "mmseg Mem (GB), theirs |", "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(rows, key=order):
        dataset, crop, head, preset, batch, world, policy = key
        mmseg = MMSEG_MEM_GB.get(preset)
        cells = [f"{rows[key][i]['peak_gib']:.2f} ({rows[key][i]['per_image_gib']:.2f})" if i in rows[key] else "-"
                 for i in IMPL_ORDER]
        lines.append(f"| {dataset} {crop}x{crop} | {HEAD_NAMES[head]} | {batch} | {world} x {batch // world} | "
                     f"{policy} | " + " | ".join(cells)
                     + f" | {f'{mmseg:.2f} (fp32, 8 x {batch // 8})' if mmseg and world == 8 else ''} |")
    commits = sorted({(e.get("git_commit") or "unknown")[:10] for e in envs})
    torches = sorted({e.get("torch") for e in envs})
    lines += ["", textwrap.fill(
        f"Planned, not measured: GiB per GPU (per image in parentheses), ViT-L/16, bf16 (FSDP2 mixed precision), the "
        f"peak of training's step planned on CPU by `python bench/memory.py --readme-table` (torch "
        f"{', '.join(torches)}, commit {', '.join(commits)}); every number is read from "
        f"`bench/results/estimate/<config>.json`. mmseg's Mem (GB) is theirs: fp32, 8 GPUs, max allocated per GPU "
        f"(GB = 2^30 bytes).", 100)]
    return "\n".join(lines) + "\n"


def load(path, allow_cpu):
    with open(path) as f:
        data = json.load(f)
    if "environment" not in data or "rows" not in data:
        raise UsageError(f"{path}: not a results file (expected keys 'environment' and 'rows')")
    if data["environment"].get("gpu") is None and not allow_cpu:
        raise UsageError(f"{path} comes from a CPU run (its timings mean nothing): the README takes GPU results "
                         "only (--allow-cpu renders it anyway, for tests)")
    return data


def source_line(path, env):
    path = os.path.abspath(path)
    path = os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path
    return (f"Source: `{path}` on {env.get('gpu') or 'CPU'} (torch {env.get('torch')}, triton {env.get('triton')}, "
            f"commit {(env.get('git_commit') or 'unknown')[:10]}, {env.get('date')}).")


def num(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def run_table(results_dir, allow_cpu=False):
    """The training command itself (gpu_check's train_run parts): one row per run."""
    path = os.path.join(results_dir, "train_run.json")
    if not os.path.exists(path):
        return [f"No results file `{path}`."]
    data = load(path, allow_cpu)
    lines = ["| run | impl | recompute | batch | iterations | img/s | MFU | max allocated (GiB) | data wait |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        pct = lambda k, digits: num(r[k] and 100 * r[k], digits) + "%"
        lines.append(f"| {r['name']} | error: {r['error']} |||||||" if "error" in r else
                     f"| {r['name']} | {r['impl']} | {r['recompute']} | {r['batch']} | {r['iters']} | "
                     f"{num(r['img_per_s'], 1)} | {pct('mfu', 1)} | {num(r['max_mem_gib'])} | {pct('data_wait', 0)} |")
    return lines + ["", "The means of the run's metrics.jsonl records after the first (which holds compiling and "
                        "autotuning).", "", source_line(path, data["environment"])]


def step_table(results_dir, allow_cpu=False):
    """Per preset: each variant's train step (impl, recompute, compile)."""
    lines = ["| model (preset) | impl | recompute | compile | precision | batch | img/s | MFU | peak (GiB) | per image "
             "(GiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    sources = []
    for path in sorted(glob.glob(os.path.join(results_dir, "train_step_*.json"))):
        data = load(path, allow_cpu)
        sources.append(source_line(path, data["environment"]))
        for r in data["rows"]:
            cells = ([f"error: {r['error']}"] + [""] * 4 if "error" in r else
                     [num(r["images_per_s"], 1), num(r["mfu"] and 100 * r["mfu"], 1) + "%", num(r["peak_mem_gib"]),
                      num(r.get("mem_per_image_gib"))])
            model = f"{HEAD_NAMES[r['head']]} {BACKBONE_NAMES.get(r['backbone'], r['backbone'])} ({r['preset']})"
            lines.append(f"| {model} | {r['impl']} | {r['recompute']} | {'on' if r['compile'] else 'off'} | "
                         f"{r['dtype']} | {r['batch']} | " + " | ".join(cells) + " |")
    if not sources:
        return [f"No train-step results (`train_step_<preset>.json`) in `{results_dir}`."]
    return lines + ["", "One step of `train.step.train_step` on the model as training builds it (FSDP2 on one rank "
                        "with its mixed precision, SyncBN), fixed random batch.", ""] + sources


def kernel_table(results_dir, allow_cpu=False):
    """Each kernel of ours per mode, shape and dtype: time, TFLOP/s or GB/s, speedup over each peer."""
    path = os.path.join(results_dir, "kernels.json")
    data = load(path, allow_cpu) if os.path.exists(path) else dict(rows=[], environment={})
    lines = ["| kernel | mode | shape | dtype | ours ms | ours TFLOP/s | ours GB/s | speedup of ours vs peers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["provider"] == OURS and r.get("ms") is not None:
            speedups = ", ".join(f"{p} {x:.2f}x" for p, x in (r.get("speedup_vs") or {}).items()) or "-"
            lines.append(f"| {r['kernel']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['ms']:.4g} | "
                         f"{num(r.get('tflops'), 1)} | {num(r.get('gbps'), 0)} | {speedups} |")
    missing = [f"{p} ({why})" for p, why in sorted(data.get("not_run", {}).items())]
    missing += sorted({f"{r['provider']} ({r['error'][:80]})" for r in data["rows"] if r.get("error")})
    if not data["rows"]:
        return [f"No results file `{path}`."]
    return lines + ([""] + ["Not measured in this run: " + "; ".join(missing) + "."] if missing else []) + \
        ["", source_line(path, data["environment"])]


def gpu_results_dirs(root=RESULTS):
    """The folders of gpu_check runs on a GPU in root (bench/results/cpu holds its dry runs)."""
    return sorted(os.path.join(root, d) for d in (os.listdir(root) if os.path.isdir(root) else [])
                  if d != "cpu" and os.path.exists(os.path.join(root, d, "gpu_check.json")))


def render(results_dir=None, allow_cpu=False, estimate_dir=ESTIMATE):
    parts = ["### Planned memory", "", planned_table(estimate_dir)]
    if results_dir is None:
        found = gpu_results_dirs()
        if len(found) > 1:
            raise UsageError(f"{RESULTS} holds {len(found)} GPU result folders {found}: name one with --results")
        if not found:
            return "\n".join(parts + [f"No GPU results in {RESULTS} yet: `python bench/gpu_check.py` on a GPU "
                                      "writes them."]) + "\n"
        results_dir = found[0]
    if not os.path.isdir(results_dir):
        raise UsageError(f"--results {results_dir}: no such folder")
    parts += ["### Training run (train/main.py)", ""] + run_table(results_dir, allow_cpu)
    parts += ["", "### Train step per model", ""] + step_table(results_dir, allow_cpu)
    parts += ["", "### Kernels", ""] + kernel_table(results_dir, allow_cpu)
    return "\n".join(parts) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=None, help="a bench/results/<gpu> folder (default: the only GPU one)")
    p.add_argument("--estimate", default=ESTIMATE, help="the plans' folder (default bench/results/estimate)")
    p.add_argument("--out", default=None, help="write the markdown here instead of stdout")
    p.add_argument("--allow-cpu", action="store_true", help="render CPU results too (tests only)")
    args = p.parse_args(argv)
    if args.out:
        writable_dir(os.path.dirname(os.path.abspath(args.out)))
    text = render(args.results, args.allow_cpu, args.estimate)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(f"wrote {args.out}" if args.out else text)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
