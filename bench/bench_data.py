"""Data-pipeline benchmark: training samples per second in one worker, and each step's share.

    python bench/bench_data.py                          # the ADE20K samples shipped in ../shared
    python bench/bench_data.py --data-root /data/ADEChallengeData2016 --split training -n 200

One worker, one thread (torch and OpenCV), as a DataLoader worker runs: the time per sample of
the full ADE20K training pipeline (read jpg + png, random rescale 0.5-2.0 of (2048, 512), random
crop 512 with cat_max_ratio 0.75, flip, photometric distortion, normalize, pad), and of each step
alone on the decoded sample. Results: bench_data.{json,md} in --out (default a new
bench/results/bench_data/<date>/). The training loop's data wait: bench/gpu_check.py's training runs.
"""
import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as `python bench/<script>.py`: the repo root first, not bench/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import UsageError, new_results_dir, run_script, writable_dir  # noqa: E402

SHARED_ADE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                          "data", "ade20k_sceneparsing_samples")
COLUMNS = ["kernel", "provider", "shape", "samples_per_s", "ms", "n"]


def ours_rows(dataset, n, crop):
    """Per step: samples/s and ms per sample over n samples after a warm-up call."""
    import numpy as np

    from setr.data import TrainSamples
    from setr.data import transforms as T

    samples = TrainSamples(dataset, crop, seed=0)
    image, label, _ = dataset[0]
    steps = {
        "train pipeline": lambda i: samples[i],
        "read files": lambda i: dataset[i % len(dataset)],
        "random rescale": lambda i: T.random_rescale(image, label, np.random.default_rng(i)),
        "photometric distortion": lambda i: T.photometric_distortion(image[:crop, :crop], np.random.default_rng(i)),
        "normalize + pad": lambda i: T.normalize_pad(image[:crop, :crop], label[:crop, :crop], (crop, crop)),
    }
    rows = []
    for name, fn in steps.items():
        fn(0)
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        ms = (time.perf_counter() - t0) * 1e3 / n
        shape = f"{crop}x{crop}" if name == "train pipeline" else f"{image.shape[0]}x{image.shape[1]}"
        rows.append(dict(kernel=name, provider="setr", shape=shape, samples_per_s=1e3 / ms, ms=ms, n=n))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=SHARED_ADE, help="ADEChallengeData2016 folder (default: the shared samples)")
    p.add_argument("--split", default="validation", help="split to read (default validation: the shared samples)")
    p.add_argument("-n", type=int, default=60, help="samples timed per row (default 60)")
    p.add_argument("--crop", type=int, default=512, help="crop size (default 512)")
    p.add_argument("--out", default=None, help="output folder (default: a new bench/results/bench_data/<date>/)")
    args = p.parse_args(argv)
    out = writable_dir(args.out or new_results_dir("bench_data"))
    import cv2
    import torch

    from bench import common
    from setr.data import ADE20K, DataError

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        dataset = ADE20K(args.data_root, args.split)
    except (DataError, OSError) as e:
        raise UsageError(f"--data-root {args.data_root} --split {args.split}: {e}") from None
    rows = ours_rows(dataset, args.n, args.crop)
    for r in rows:
        print(f"{r['kernel']:<24} {r['samples_per_s']:8.1f} samples/s  {r['ms']:7.2f} ms")
    # the data pipeline runs on the CPU for real: its timings stand without a GPU
    paths = common.write_results("bench_data", rows, COLUMNS, out, cpu_timings_mean_nothing=False)
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
