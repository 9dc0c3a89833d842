"""Training curves of one or more runs, overlaid, in one PNG (like mmseg's analyze_logs.py).

    python -m train.plot WORK_DIR [WORK_DIR ...] [--out FILE]

Reads each run's metrics.jsonl (the trainer's "train" and "eval" events) and draws, over
iterations: the loss and its terms, the learning rate (base and head), the gradient norm,
images/s, the data-wait share of the step, and the validation mIoU. Default output:
<first WORK_DIR>/curves.png. A resumed run logs some iterations twice: the later record wins.
"""

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from setr.files import write_atomic  # noqa: E402

PANELS = (  # (title, y label, [(record key, legend suffix)], event)
    ("loss", "loss", None, "train"),  # None: "loss" and every "loss_<term>" key
    ("learning rate", "lr", [("lr", "base"), ("lr_head", "head")], "train"),
    ("gradient norm", "grad norm", [("grad_norm", "")], "train"),
    ("throughput", "images/s", [("img_per_s", "")], "train"),
    ("data wait", "share of the step", [("data_wait", "")], "train"),
    ("validation", "mIoU (%)", [("mIoU", "")], "eval"),
)


class PlotError(Exception):
    """A run folder without readable metrics."""


def read_metrics(work_dir):
    """{event kind: {iteration: record}} from work_dir/metrics.jsonl; unreadable lines (a write cut
    short by a crash) are reported on stderr and skipped."""
    path = os.path.join(work_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{work_dir}: no metrics.jsonl (not a training run folder?)")
    events = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                events.setdefault(record["event"], {})[int(record["iter"])] = record
            except (ValueError, KeyError, TypeError) as e:
                print(f"warning: {path}:{n}: skipped unreadable record ({type(e).__name__})", file=sys.stderr)
    if not events.get("train") and not events.get("eval"):
        raise PlotError(f"{path}: no train or eval records")
    return events


def _series(records, key):
    """(iterations, values) of `key` over records sorted by iteration, finite numbers only."""
    xs, ys = [], []
    for it in sorted(records):
        v = records[it].get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(it)
            ys.append(v)
    return xs, ys


def plot_runs(runs, out):
    """runs: [(label, events)]; writes one PNG at `out` (atomically) and returns it."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, (title, ylabel, keys, kind) in zip(axes.flat, PANELS):
        for colour, (label, events) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, runs):
            records = events.get(kind, {})
            panel_keys = keys
            if panel_keys is None:
                terms = sorted({k for r in records.values() for k in r if k.startswith("loss_")})
                panel_keys = [("loss", "total")] + [(k, k[len("loss_"):]) for k in terms]
            for style, (key, suffix) in zip(("-", "--", ":", "-.") * 4, panel_keys):
                xs, ys = _series(records, key)
                if xs:
                    ax.plot(xs, ys, style, color=colour, marker="o" if kind == "eval" else None,
                            markersize=3, linewidth=1.2, label=f"{label} {suffix}".strip())
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n")[0])
    p.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="training run folders (metrics.jsonl inside)")
    p.add_argument("--out", default=None, help="PNG to write (default <first WORK_DIR>/curves.png)")
    args = p.parse_args(argv)
    try:
        names = [os.path.basename(os.path.normpath(d)) for d in args.work_dirs]
        if len(set(names)) < len(names):  # runs/a/run and runs/b/run: tell them apart by path
            names = list(args.work_dirs)
        runs = [(name, read_metrics(d)) for name, d in zip(names, args.work_dirs)]
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.work_dirs[0], "curves.png")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    print(plot_runs(runs, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
