"""Timing, environment capture and result writing shared by every benchmark script.

Every benchmark produces rows (plain dicts) with at least:
    kernel, mode ("fwd" | "bwd" | "fwd+bwd" | ...), provider, shape, dtype, ms (median),
    ms_p20, ms_p80, and where it applies gbps / tflops / peak_mem_mb, or "error" when the
    provider could not run (a peer that is not installed is reported, never skipped silently).
`write_results` adds, for each row of ours, the speed ratio to every peer measured in the same
run, and writes JSON + markdown (+ a PNG plot when matplotlib is importable).
"""
import datetime
import json
import os
import platform
import subprocess
import time

import torch

OURS = "ours"


def on_gpu():
    return torch.cuda.is_available()


def default_device():
    return torch.device("cuda" if on_gpu() else "cpu")


def cpu_warning():
    return "no CUDA device: these timings come from the CPU (Triton interpreter / reference) and mean nothing"


def environment():
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "git_commit": _git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if on_gpu():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        env["driver"] = _nvidia_driver()
    else:
        env["gpu"] = None
        env["note"] = cpu_warning()
    return env


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def bench(fn, warmup=25, rep=100, quick=False):
    """Median, 20th and 80th percentile time of fn() in milliseconds.

    CUDA: triton.testing.do_bench (flushes L2 between runs). CPU: a few wall-clock repeats.
    """
    if on_gpu():
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    fn()
    times = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[0], times[-1]


def peak_memory_mb(fn):
    """Peak allocated CUDA memory of one call of fn, above what was allocated before (None on CPU)."""
    if not on_gpu():
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def add_ratios(rows):
    """For each row of ours: speedup over every peer row with the same kernel/mode/shape/dtype."""
    key = lambda r: (r["kernel"], r["mode"], str(r["shape"]), r["dtype"])
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    for r in rows:
        if r["provider"] != OURS or r.get("ms") is None:
            continue
        r["speedup_vs"] = {p["provider"]: round(p["ms"] / r["ms"], 3)
                           for p in groups[key(r)] if p is not r and p.get("ms")}
    return rows


def results_dir(root=None):
    base = root or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    name = torch.cuda.get_device_name(0) if on_gpu() else "cpu"
    return os.path.join(base, name.replace(" ", "_").replace("/", "_"))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {x:.2f}x" for k, x in v.items()) or "-"
    return str(v)


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name, rows, columns, outdir=None, plot=None):
    """Write <outdir>/<name>.json and <name>.md (and <name>.png via plot(rows, path)). Returns paths."""
    outdir = outdir or results_dir()
    os.makedirs(outdir, exist_ok=True)
    env = environment()
    rows = add_ratios(rows)
    json_path = os.path.join(outdir, f"{name}.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    md_path = os.path.join(outdir, f"{name}.md")
    header = [f"# {name}", "", "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), ""]
    if env["gpu"] is None:
        header += [f"**{cpu_warning()}**", ""]
    with open(md_path, "w") as f:
        f.write("\n".join(header) + markdown_table(rows, columns + ["speedup_vs"]) + "\n")
    paths = [json_path, md_path]
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            png = os.path.join(outdir, f"{name}.png")
            plot(rows, png)
            paths.append(png)
        except ImportError:
            print("matplotlib not installed: no plot written")
    return paths
