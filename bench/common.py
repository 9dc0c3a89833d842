"""Timing, ratios, the environment and result files of the benchmark scripts: a row is a dict of
kernel, mode ("fwd" | "bwd" | "fwd+bwd" | "train"), provider, shape, dtype, ms (median), ms_p20,
ms_p80 and where it applies gbps / tflops / peak_mem_mb, or "error"."""
import json
import os
import time

import torch

from bench import GIB, OURS, error_text
from bench import environment as bench_environment
from setr.files import write_atomic


def on_gpu():
    return torch.cuda.is_available()


def default_device():
    return torch.device("cuda" if on_gpu() else "cpu")


CPU_WARNING = "no CUDA device: these timings come from the CPU (Triton interpreter / reference) and mean nothing"


def print_cpu_warning():
    if not on_gpu():
        print(f"!! WARNING: {CPU_WARNING}.\n!! A smoke test of the harness (tiny config): run on a GPU for real "
              "numbers.", flush=True)


def finish(failed):
    """End of a benchmark run: the CPU banner again, what failed; exit status 1 if anything did."""
    print_cpu_warning()
    print("".join(f"FAILED: {what}\n" for what in failed), end="")
    return 1 if failed else 0


# torch.compile peers: inductor on the GPU; on CPU (a smoke test) Dynamo's graph capture alone,
# since inductor's C++ compiles take seconds per case there
def compile_backend():
    return "inductor" if on_gpu() else "eager"


def compiled(fn):
    """torch.compile(fn) for one case: a fresh compile (so no recompile limit is reached), static shapes."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, backend=compile_backend())


def failure_lines(rows):
    """One line per row of ours with an error, for finish() (a peer's error is reported, no failure)."""
    return [f"{r.get('bench', r['kernel'])}: {r['kernel']} {r['mode']} {r['shape']} {r['dtype']}: {r['error']}"
            for r in rows if r.get("error") and r["provider"] == OURS]


def environment():
    """bench.environment() with the GPU as torch sees it (None when it runs on the CPU) and its CUDA."""
    env = bench_environment()
    if on_gpu():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / GIB, 1), cuda=torch.version.cuda)
    else:
        env.update(gpu=None, gpu_memory_gb=None, driver=None, note=CPU_WARNING)
    return env


def bench(fn, quick=False):
    """Median, 20th and 80th percentile time of fn() in milliseconds.

    CUDA: triton.testing.do_bench (flushes L2 between runs; warm-up and measurement in ms, shorter
    with quick). CPU: a few wall-clock repeats after a warm-up call; one call with quick.
    """
    if on_gpu():
        import triton.testing

        warmup, rep = (5, 20) if quick else (25, 100)
        return tuple(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8]))
    if not quick:  # warm-up; a CPU smoke run (quick) times its one call, compile and all
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
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


MODES = ("fwd", "bwd", "fwd+bwd")


def time_modes(fn, args, leaves, base, quick=False, grads=None, bytes_moved=None, flops=None,
               memory_modes=("fwd+bwd",)):
    """One row per mode of outs = fn(*args): fwd (leaves require grad), bwd (of a kept forward) and
    fwd+bwd, with gradients w.r.t. `leaves`. grads: the output gradients (random by default; None
    for a scalar). bytes_moved / flops: {mode: count} for GB/s / TFLOP/s. peak_mem_mb for
    memory_modes. A provider that cannot run raises (time_provider reports it)."""
    outs = fn(*args)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    if grads is None:
        grads = [torch.randn_like(o) if o.dim() else None for o in outs]
    fwd = lambda: fn(*args)  # noqa: E731 - the three timed calls, side by side
    bwd = lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)  # noqa: E731
    fwd_bwd = lambda: torch.autograd.grad(fn(*args), leaves, grads)  # noqa: E731
    rows = []
    for mode, f in zip(MODES, (fwd, bwd, fwd_bwd)):
        ms, p20, p80 = bench(f, quick=quick)
        row = dict(base, mode=mode, ms=ms, ms_p20=p20, ms_p80=p80)
        if bytes_moved:
            row["gbps"] = bytes_moved[mode] / (ms * 1e-3) / 1e9
        if flops:
            row["tflops"] = flops[mode] / (ms * 1e-3) / 1e12
        if mode in memory_modes:
            row["peak_mem_mb"] = peak_memory_mb(f)
        rows.append(row)
    return rows


def time_provider(make_fn, args, leaves, base, quick=False, **kw):
    """time_modes(make_fn(), ...) for the provider base names, or, when it cannot run, a row per
    mode with its error (never skipped silently); torch.compile's backend goes in the rows."""
    if base["provider"] == "torch.compile":
        base = dict(base, compile_backend=compile_backend())
    try:
        return time_modes(make_fn(), args, leaves, base, quick, **kw)
    except Exception as e:  # noqa: BLE001 - reported in the rows
        if on_gpu():
            torch.cuda.empty_cache()
        return [dict(base, mode=mode, ms=None, error=error_text(e)) for mode in MODES]


def add_ratios(rows, ours=(OURS,), keys=("kernel", "mode", "shape", "dtype")):
    """Each row whose provider is in `ours` gets speedup_vs = {peer: peer ms / its ms} over every
    row of a peer (a provider not in `ours`) with the same `keys`."""
    key = lambda r: tuple(str(r.get(k)) for k in keys)
    for r in rows:
        if r["provider"] in ours and r.get("ms"):
            r["speedup_vs"] = {p["provider"]: round(p["ms"] / r["ms"], 3) for p in rows
                               if p["provider"] not in ours and p.get("ms") and key(p) == key(r)}


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


def write_results(name, rows, columns, outdir, not_run=None, cpu_timings_mean_nothing=True):
    """Write <outdir>/<name>.json and <name>.md; not_run: {provider: why} of the peers left out on
    this machine. Returns the paths."""
    env = environment()
    if not cpu_timings_mean_nothing:
        env.pop("note", None)
    json_path = os.path.join(outdir, f"{name}.json")
    write_atomic(json_path, json.dumps({"environment": env, "rows": rows, "not_run": not_run or {}}, indent=1))
    md_path = os.path.join(outdir, f"{name}.md")
    header = [f"# {name}", "", "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), ""]
    if "note" in env:
        header += [f"**{env['note']}**", ""]
    if not_run:
        header += [not_run_line(not_run), ""]
    write_atomic(md_path, "\n".join(header) + markdown_table(rows, columns + ["speedup_vs"]) + "\n")
    return [json_path, md_path]


def not_run_line(not_run):
    return "Not run here: " + "; ".join(f"{p} ({why})" for p, why in sorted(not_run.items())) + "."
