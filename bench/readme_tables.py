"""Render the README's benchmark tables from the results files of one GPU, and nothing else.

    python bench/readme_tables.py                                  # the only GPU folder in bench/results
    python bench/readme_tables.py --results bench/results/NVIDIA_H100_80GB_HBM3 --out tables.md

Reads train_step_<head>.json (and memory_sweep_<head>.json when present) for the model table:
training memory and speed and inference fps per head, ours (impl=triton) vs eager, and
kernels.json for the kernel table. Every number printed is read from those files, and each table
names the file and the GPU, torch, triton, commit and date it came from. Results of a CPU run are
refused (their timings mean nothing) unless --allow-cpu, which is for tests.
"""
import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as `python bench/readme_tables.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import OURS  # noqa: E402

HEAD_NAMES = {"naive": "SETR-Naive", "pup": "SETR-PUP", "mla": "SETR-MLA"}
BACKBONE_NAMES = {"vit_large": "ViT-L/16", "vit_base": "ViT-B/16", "vit_tiny": "ViT-tiny"}
EAGER = "eager"


def load(path):
    with open(path) as f:
        data = json.load(f)
    if "environment" not in data or "rows" not in data:
        raise ValueError(f"{path}: not a results file (expected keys 'environment' and 'rows')")
    return data


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_line(path, env):
    path = os.path.abspath(path)
    if path.startswith(REPO + os.sep):
        path = os.path.relpath(path, REPO)
    commit = (env.get("git_commit") or "unknown")[:10]
    return (f"Source: `{path}` on {env.get('gpu') or 'CPU'} (torch {env.get('torch')}, "
            f"triton {env.get('triton')}, commit {commit}, {env.get('date')}).")


def _num(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def _pick(rows, mode, provider, **match):
    for r in rows:
        if r.get("mode") == mode and r.get("provider") == provider and "error" not in r \
                and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def model_table(results_dir, allow_cpu=False):
    """Markdown lines of the per-head table (ours vs eager) and the files they come from."""
    lines = ["| model | train batch | Mem (GB) ours | Mem (GB) eager | Mem (GB), 2 img, ours | "
             "Mem (GB), 2 img, eager | train img/s ours | train img/s eager | inf fps ours | inf fps eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sources = []
    for head in HEAD_NAMES:
        path = os.path.join(results_dir, f"train_step_{head}.json")
        if not os.path.exists(path):
            sources.append(f"{HEAD_NAMES[head]}: no results file `{path}`.")
            continue
        data = load(path)
        check_gpu(path, data["environment"], allow_cpu)
        rows = data["rows"]
        ours_t, eager_t = _pick(rows, "train", OURS), _pick(rows, "train", EAGER)
        ours_i, eager_i = _pick(rows, "inference", OURS), _pick(rows, "inference", EAGER)
        any_row = next((r for r in rows if r.get("mode") == "train"), rows[0] if rows else {})
        name = f"{HEAD_NAMES[head]} {BACKBONE_NAMES.get(any_row.get('backbone'), any_row.get('backbone'))}"
        get = lambda r, k: r.get(k) if r else None
        sources.append(source_line(path, data["environment"]))
        mem2 = {OURS: None, EAGER: None}
        sweep_path = os.path.join(results_dir, f"memory_sweep_{head}.json")
        if os.path.exists(sweep_path):
            sweep = load(sweep_path)
            check_gpu(sweep_path, sweep["environment"], allow_cpu)
            for p in mem2:
                mem2[p] = get(_pick(sweep["rows"], "batch_sweep", p, batch=2), "peak_gib")
            sources.append(source_line(sweep_path, sweep["environment"]))
        lines.append(f"| {name} | {get(any_row, 'batch') or '-'} | {_num(get(ours_t, 'peak_mem_gib'))} | "
                     f"{_num(get(eager_t, 'peak_mem_gib'))} | {_num(mem2[OURS])} | {_num(mem2[EAGER])} | "
                     f"{_num(get(ours_t, 'images_per_s'), 1)} | {_num(get(eager_t, 'images_per_s'), 1)} | "
                     f"{_num(get(ours_i, 'fps'), 1)} | {_num(get(eager_i, 'fps'), 1)} |")
    notes = ["", "ours = impl=triton, eager = plain PyTorch ops; bf16 autocast over fp32 weights, SGD; "
             "Mem = peak allocated during a training step (GB = 2^30 bytes); inf fps = eval mode, "
             "whole image, batch 1, bf16; 2 img = the memory sweep's batch 2 (mmseg's 2 img/GPU, "
             "but bf16).", ""]
    return lines + notes + sources


def kernel_table(results_dir, allow_cpu=False):
    path = os.path.join(results_dir, "kernels.json")
    if not os.path.exists(path):
        return [f"No kernel results file `{path}`."]
    data = load(path)
    check_gpu(path, data["environment"], allow_cpu)
    rows = data["rows"]
    lines = ["| kernel | mode | shape | dtype | ours ms | ours TFLOP/s | ours GB/s | speedup of ours vs peers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("provider") != OURS or r.get("ms") is None:
            continue
        speedups = ", ".join(f"{p} {x:.2f}x" for p, x in (r.get("speedup_vs") or {}).items()) or "-"
        lines.append(f"| {r['kernel']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['ms']:.4g} | "
                     f"{_num(r.get('tflops'), 1)} | {_num(r.get('gbps'), 0)} | {speedups} |")
    not_run = sorted({f"{r['provider']} ({r['error'][:80]})" for r in rows if r.get("error")})
    notes = [""]
    if not_run:
        notes.append("Not measured in this run: " + "; ".join(not_run) + ".")
    return lines + notes + ["", source_line(path, data["environment"])]


def check_gpu(path, env, allow_cpu):
    if env.get("gpu") is None:
        if not allow_cpu:
            raise SystemExit(f"{path} comes from a CPU run (its timings mean nothing): the README takes "
                             "GPU results only (--allow-cpu renders it anyway, for tests)")
        print(f"WARNING: {path} comes from a CPU run: these numbers mean nothing", file=sys.stderr)


def default_results_dir():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    gpus = sorted(d for d in os.listdir(root) if d != "cpu" and os.path.isdir(os.path.join(root, d))) \
        if os.path.isdir(root) else []
    if len(gpus) != 1:
        raise SystemExit(f"{root} holds {len(gpus)} GPU result folders {gpus}: name one with --results")
    return os.path.join(root, gpus[0])


def render(results_dir, allow_cpu=False):
    return "\n".join(["### Speed and memory per model (ours vs eager)", ""]
                     + model_table(results_dir, allow_cpu)
                     + ["", "### Kernels", ""] + kernel_table(results_dir, allow_cpu)) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=None, help="bench/results/<gpu> folder (default: the only GPU one)")
    p.add_argument("--out", default=None, help="write the markdown here instead of stdout")
    p.add_argument("--allow-cpu", action="store_true", help="render CPU results too (tests only)")
    args = p.parse_args(argv)
    text = render(args.results or default_results_dir(), args.allow_cpu)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
