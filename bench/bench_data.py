"""Data-pipeline benchmark: training samples per second in one worker, ours and mmseg's recipe.

    python bench/bench_data.py                          # the ADE20K samples shipped in ../shared
    python bench/bench_data.py --data-root /data/ADEChallengeData2016 --split training -n 200

One worker, one thread (torch and OpenCV), as a DataLoader worker runs: the time per sample of
the full ADE20K training pipeline (read jpg + png, random rescale 0.5-2.0 of (2048, 512), random
crop 512 with cat_max_ratio 0.75, flip, photometric distortion, normalize, pad), and of each step
alone on the decoded sample. mmseg's own pipeline (mmseg 1.x `LoadImageFromFile` ...
`PhotoMetricDistortion` + `SegDataPreProcessor`'s normalize) is timed on the same files when mmseg
is importable, otherwise reported as not installed. Results: bench/results/<device>/bench_data.{json,md}.
"""
import argparse
import json
import os
import sys
import time

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, markdown_table, results_dir  # noqa: E402
from setr.data import ADE20K, TrainSamples  # noqa: E402
from setr.data import transforms as T  # noqa: E402
from setr.files import write_atomic  # noqa: E402

try:  # mmseg 1.x's own transforms, timed side by side where installed
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets.transforms import (LoadAnnotations, PhotoMetricDistortion, RandomCrop, RandomFlip,
                                           RandomResize)
    MMSEG_MISSING = None
except ImportError as e:
    MMSEG_MISSING = str(e)

SHARED_ADE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                          "data", "ade20k_sceneparsing_samples")
PROVIDER = "setr"  # our data pipeline (bench.OURS names our kernels)
COLUMNS = ["kernel", "provider", "shape", "samples_per_s", "ms", "n", "error"]


def _rate(fn, n):
    """(samples/s, ms per sample) of fn(i) for i in range(n), after one warm-up call."""
    fn(0)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    seconds = time.perf_counter() - start
    return n / seconds, 1000 * seconds / n


def ours_rows(dataset, n, crop):
    samples = TrainSamples(dataset, crop, seed=0)
    rows = []
    sps, ms = _rate(lambda i: samples[i], n)
    rows.append(dict(kernel="train pipeline", provider=PROVIDER, shape=f"{crop}x{crop}", samples_per_s=sps, ms=ms, n=n))
    image, label, _ = dataset[0]
    steps = {
        "read files": lambda i: dataset[i % len(dataset)],
        "random rescale": lambda i: T.random_rescale(image, label, np.random.default_rng(i)),
        "photometric distortion": lambda i: T.photometric_distortion(image[:crop, :crop], np.random.default_rng(i)),
        "normalize + pad": lambda i: T.normalize_pad(image[:crop, :crop], label[:crop, :crop], (crop, crop)),
    }
    for name, fn in steps.items():
        sps, ms = _rate(fn, n)
        rows.append(dict(kernel=name, provider=PROVIDER, shape=f"{image.shape[0]}x{image.shape[1]}",
                         samples_per_s=sps, ms=ms, n=n))
    return rows


def mmseg_rows(dataset, n, crop):
    """mmseg 1.x's ADE20K train pipeline on the same files (when mmseg is importable)."""
    base = dict(kernel="train pipeline", provider="mmseg", shape=f"{crop}x{crop}", n=n)
    if MMSEG_MISSING:
        return [dict(base, error=f"mmseg not installed ({MMSEG_MISSING})")]
    pipeline = [LoadImageFromFile(), LoadAnnotations(reduce_zero_label=True),
                RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
                RandomCrop(crop_size=(crop, crop), cat_max_ratio=0.75), RandomFlip(prob=0.5),
                PhotoMetricDistortion()]
    mean = torch.tensor(T.MEAN).view(3, 1, 1)
    std = torch.tensor(T.STD).view(3, 1, 1)

    def one(i):
        k = i % len(dataset)
        results = dict(img_path=dataset.image_paths[k], seg_map_path=dataset.label_paths[k], reduce_zero_label=True,
                       seg_fields=[])
        for t in pipeline:
            results = t(results)
        img = torch.from_numpy(np.ascontiguousarray(results["img"][..., ::-1].transpose(2, 0, 1)))
        return (img.float() - mean) / std  # SegDataPreProcessor: bgr_to_rgb, normalize (its pad left out)

    sps, ms = _rate(one, n)
    return [dict(base, samples_per_s=sps, ms=ms)]


def write(rows, outdir):
    """<outdir>/bench_data.{json,md} (no CPU caveat: the data pipeline runs on the CPU for real)."""
    os.makedirs(outdir, exist_ok=True)
    env = environment()
    paths = [os.path.join(outdir, "bench_data.json"), os.path.join(outdir, "bench_data.md")]
    texts = [json.dumps({"environment": env, "rows": rows}, indent=1),
             "# bench_data: training samples per second, one worker, one thread\n\nEnvironment: "
             + ", ".join(f"{k}={v}" for k, v in env.items()) + "\n\n" + markdown_table(rows, COLUMNS) + "\n"]
    for path, text in zip(paths, texts):
        write_atomic(path, text)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=SHARED_ADE, help="ADEChallengeData2016 folder (default: the shared samples)")
    p.add_argument("--split", default="validation", help="split to read (default validation: the shared samples)")
    p.add_argument("-n", type=int, default=60, help="samples timed per row (default 60)")
    p.add_argument("--crop", type=int, default=512, help="crop size (default 512)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    dataset = ADE20K(args.data_root, args.split)
    rows = ours_rows(dataset, args.n, args.crop) + mmseg_rows(dataset, args.n, args.crop)
    for r in rows:
        rate = f"{r['samples_per_s']:8.1f} samples/s  {r['ms']:7.2f} ms" if "samples_per_s" in r else r["error"]
        print(f"{r['provider']:>6} {r['kernel']:<24} {rate}")
    for path in write(rows, args.out or results_dir()):
        print("wrote", path)
    failed = [f"{r['kernel']}: {r['error']}" for r in rows if r.get("error") and r["provider"] == PROVIDER]
    for what in failed:
        print(f"FAILED: {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
