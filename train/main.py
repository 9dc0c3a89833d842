"""Train SETR with mmsegmentation's recipe, sharded with FSDP2.

    # anywhere (no GPU, no dataset): the CPU demo preset on built-in synthetic data
    torchrun --standalone --nproc_per_node=2 train/main.py --head pup
    python train/main.py --head pup                       # the same in a single process

    # one node, 8 GPUs, ADE20K, SETR-PUP (mmseg's setr_vit-l_pup_8xb2-160k_ade20k-512x512)
    torchrun --nproc_per_node=8 train/main.py --head pup \
        --data-root /data/ADEChallengeData2016 --pretrained vit_large_p16_384.pth

    # multi-node (run on every node; the work dir must be on storage all nodes share)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        --rdzv_id=setr train/main.py --head pup --data-root ... --work-dir /shared/runs/pup

    # continue a stopped run exactly where it was
    torchrun --nproc_per_node=8 train/main.py --head pup --data-root ... --resume auto

`python train/main.py --help` lists the flags; train/config.py documents every field.
"""
import os
import sys

if __package__ in (None, ""):  # `python train/main.py` / `torchrun train/main.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from setr.data import DataError  # noqa: E402
from train.checkpoint import CheckpointError  # noqa: E402
from train.config import ConfigError, parse_config  # noqa: E402
from train.logger import Logger  # noqa: E402
from train.parallelize import destroy_distributed, init_distributed  # noqa: E402


def check_work_dir(work_dir):
    """Fail now, not at the first checkpoint, when the run directory is not writable."""
    try:
        os.makedirs(work_dir, exist_ok=True)
        probe = os.path.join(work_dir, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--work-dir {work_dir!r} is not writable ({e.strerror or e})") from None


def main(argv=None):
    cfg = parse_config(argv)
    device_type = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    rank, log = int(os.environ.get("RANK", 0)), None
    try:
        rank, world_size, local_rank = init_distributed(device_type)
        if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # cores / processes on this node, minus the data workers: oversubscribed OpenMP spins (10x slower)
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // per_node - cfg.data.num_workers))
        device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
        cfg.validate(world_size)
        check_work_dir(cfg.work_dir)
        log = Logger(cfg.work_dir, rank, cfg.schedule.max_iters, cfg.metrics.progress_bar, cfg.metrics.tensorboard)
        for note in cfg.notes:
            log.info(note)
        if rank == 0:
            cfg.save(os.path.join(cfg.work_dir, "config.json"))
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=device_type == "cuda")
            torch.backends.cudnn.benchmark = False
        from torch.distributed.device_mesh import init_device_mesh

        from train.parallelize import parallelize
        from train.trainer import Trainer, build_data, build_model, eval_copy

        data = build_data(cfg)  # first: a bad dataset fails before any model work
        model = build_model(cfg, device, log)
        eval_model = eval_copy(model)  # plain copy for evaluation, refreshed from the shards
        model = parallelize(model, cfg, init_device_mesh(device_type, (world_size,)))
        trainer = Trainer(cfg, model, eval_model, data, device, log)
        log.info(trainer.describe())
        log.info(f"work dir {os.path.abspath(cfg.work_dir)} (config.json, metrics.jsonl, train.log, checkpoints/)")
        if log.tb_note:
            log.info(log.tb_note)
        trainer.resume()
        trainer.train()
        return 0
    except (ConfigError, CheckpointError, DataError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if log:
            log.close()
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
