"""Every kernel microbenchmark in one run: one JSON + markdown table + PNG plot.

    python bench/kernels.py              # all kernels, SETR's shapes and sweeps, on the GPU
    python bench/kernels.py --setr-only  # SETR's training shapes only (bench/gpu_check.py runs this)
    python bench/kernels.py --quick      # small shapes, few repeats (the CPU smoke test)
    python bench/kernels.py --only attention layer_norm

Runs `run(quick, setr_only)` of bench/bench_layer_norm.py, bench_attention.py and bench_upsample.py,
concatenates their rows (bench/common.py's schema: kernel, mode, provider, shape, dtype, ms,
gbps / tflops, peak_mem_mb, error), adds to each row of ours its speedup over every peer measured
in the same run, and writes bench/results/<gpu>/kernels.{json,md,png} with the environment (GPU,
driver, torch, triton, commit, date), after each kernel script (a run stopped part-way keeps what
it measured). A kernel script that is missing or raises becomes an error
row; the run goes on and exits non-zero at the end, as it does when a row of ours has an error.
Peers that cannot run (not installed) are error rows of their own and do not fail the run.
"""
import argparse
import importlib
import os
import sys
import traceback

if __package__ in (None, ""):  # run as `python bench/kernels.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common

common.interpret_kernels_on_cpu()  # before any kernel module is imported

KERNEL_BENCHES = ("layer_norm", "attention", "upsample")  # bench/bench_<name>.py
COLUMNS = ["kernel", "mode", "provider", "shape", "dtype", "ms", "ms_p20", "ms_p80", "gbps", "tflops",
           "peak_mem_mb", "error"]
REQUIRED = ("kernel", "mode", "provider", "shape", "dtype")


def run_bench(name, quick, setr_only=False):
    """Rows of bench/bench_<name>.py, each tagged with bench=name; an error row if it fails."""
    module_name = f"bench.bench_{name}"
    try:
        module = importlib.import_module(module_name)
        rows = module.run(quick=quick, setr_only=setr_only)
        if not rows:
            raise RuntimeError("run() returned no rows")
        for r in rows:
            missing = [k for k in REQUIRED if k not in r]
            if missing:
                raise ValueError(f"row {r} lacks the field(s) {missing} of bench/common.py's schema")
    except Exception as e:  # noqa: BLE001 - reported as a row, the other kernels still run
        missing_module = isinstance(e, ModuleNotFoundError) and e.name == module_name
        reason = f"bench/bench_{name}.py not found" if missing_module else f"{type(e).__name__}: {e}"
        if not missing_module:
            traceback.print_exc()
        return [dict(bench=name, kernel=name, mode="-", provider=common.OURS, shape="-", dtype="-",
                     ms=None, error=f"benchmark failed: {reason}")]
    return [dict(r, bench=name) for r in rows]


def plot(rows, path):
    """One panel per (kernel, mode): bars of ours' speedup over each peer, per shape and dtype."""
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["provider"] == common.OURS and r.get("speedup_vs")]
    groups = {}
    for r in ours:
        groups.setdefault((r["kernel"], r["mode"]), []).append(r)
    if not groups:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no speedups to plot (no kernel of ours ran next to a peer)", ha="center")
        ax.axis("off")
        common.save_figure(fig, path, dpi=100)
        return
    ncols = 2 if len(groups) > 1 else 1
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 3.2 * nrows), squeeze=False)
    for ax, ((kernel, mode), group) in zip(axes.flat, groups.items()):
        peers = list(dict.fromkeys(p for r in group for p in r["speedup_vs"]))
        width = 0.8 / max(1, len(peers))
        for i, peer in enumerate(peers):
            xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(group))]
            bars = ax.bar(xs, [r["speedup_vs"].get(peer, 0) for r in group], width, label=peer)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([f"{r['shape']}\n{r['dtype']}" for r in group], fontsize=7)
        ax.set_title(f"{kernel} {mode}: speedup of ours (x)", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_shape_args(p)
    p.add_argument("--only", nargs="+", choices=KERNEL_BENCHES, default=list(KERNEL_BENCHES))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    on_cpu = not common.on_gpu()
    common.print_cpu_warning()
    quick = args.quick or on_cpu
    rows = []
    for i, name in enumerate(args.only):
        print(f"[{name}] ...", flush=True)
        rows += run_bench(name, quick, args.setr_only)
        last = i == len(args.only) - 1
        paths = common.write_results("kernels", rows, COLUMNS, args.out, plot=plot if last else None)
    print(common.markdown_table(rows, COLUMNS + ["speedup_vs"]))
    print("wrote " + ", ".join(paths))
    return common.finish(common.failure_lines(rows))


if __name__ == "__main__":
    sys.exit(main())
