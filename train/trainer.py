"""The training loop: build, resume, train (top to bottom), evaluate, checkpoint, export.
The optimizer step itself is train.step.train_step; the loop reads its results."""
import functools
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

import setr
from setr.data import PositionSampler
from setr.inference import evaluate
from train.checkpoint import Checkpointer, DamagedCheckpoint, resolve_resume
from train.flops import model_flops_utilization, peak_flops
from train.logger import BadSamples, MetricWindow, dump_memory_snapshot, format_duration, max_memory_gib
from train.parallelize import DTYPES, data_worker_init
from train.step import build_step_state, train_step

MAX_SKIPPED_IN_A_ROW = 20


class Trainer:
    """Owns the sharded model, the optimizer, schedule, data stream, checkpoints and metrics."""

    def __init__(self, cfg, model, eval_model, data, device, log):
        self.cfg, self.model, self.eval_model, self.device, self.log = cfg, model, eval_model, device, log
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.per_rank, self.micro_batch, self.accum_steps = cfg.batch_layout(self.world_size)
        self.global_batch = cfg.schedule.batch_size
        m = cfg.model
        # a checkpoint must match these to be resumed (the batch and seed define the data stream)
        self.identity = {"head": m.head, "backbone": m.backbone, "num_classes": m.num_classes,
                         "ignore_index": m.ignore_index, "global_batch": self.global_batch, "seed": cfg.seed}
        self.train_samples, self.eval_samples = data.train, data.eval
        self.class_names, self.data_desc = data.class_names, data.description
        self.num_params = sum(p.numel() for p in eval_model.parameters())
        self.flops_per_image = 3 * eval_model.forward_flops(*cfg.data.crop_size)  # forward + backward

        self.state = build_step_state(cfg, model, device)  # optimizer, schedule, fp16 loss scaler
        self.checkpointer = Checkpointer(cfg.work_dir, cfg.checkpoint.keep_last)

        self.iteration = 0
        self.best = {"mIoU": None, "iter": None}
        self.last = {"mIoU": None, "iter": None}
        self.skipped_total = 0
        self.skipped_in_a_row = 0
        self.bad_samples = BadSamples(self.log, len(data.train.dataset), cfg.data.max_bad_fraction, device)
        self.last_saved = None
        self.last_loss = None
        self.stop_signal = None
        self.peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                               cfg.parallel.precision)

    # ---------------------------------------------------------------------------------------------
    def describe(self):
        cfg = self.cfg
        lines = [
            f"model: SETR-{cfg.model.head.upper()} {cfg.model.backbone}, {self.num_params / 1e6:.2f}M params, "
            f"{cfg.model.num_classes} classes, impl={cfg.model.impl}, "
            f"{self.flops_per_image / 1e9:.2f} GFLOP per training image (fwd+bwd)",
            f"data: {self.data_desc}, crop {tuple(cfg.data.crop_size)}",
            f"batch: {self.global_batch} global = {self.world_size} rank(s) x {self.accum_steps} "
            f"micro-batch(es) x {self.micro_batch} image(s); {cfg.schedule.max_iters} iterations",
            f"optim: SGD lr {cfg.optim.lr} (x{cfg.optim.head_lr_mult:g} for '*head*' params), momentum "
            f"{cfg.optim.momentum}, wd {cfg.optim.weight_decay}, poly {cfg.schedule.poly_power} -> "
            f"{cfg.schedule.min_lr}, clip {cfg.optim.clip_grad or 'off'}",
            f"parallel: FSDP2 over {self.world_size} {self.device.type} rank(s) "
            f"({dist.get_backend()}), precision {cfg.parallel.precision}, SyncBN "
            f"{'on' if cfg.parallel.sync_bn else 'off'}, recompute {cfg.parallel.recompute}, "
            f"compile {'on' if cfg.parallel.compile else 'off'}",
        ]
        return "\n".join(lines)

    def model_meta(self):
        """What a model file needs besides its weights: setr.export_model's meta (also in every
        checkpoint, so that setr.predict can consolidate one)."""
        cfg = self.cfg
        return dict(self.eval_model.config, class_names=self.class_names,
                    palette=[list(map(int, c)) for c in self.eval_samples.palette],
                    dataset=cfg.data.dataset, crop_size=list(cfg.data.crop_size),
                    eval=dict(mode=cfg.eval.mode, crop_size=list(cfg.eval.crop_size),
                              stride=list(cfg.eval.stride), scale=list(cfg.eval.scale), short_min=cfg.eval.short_min))

    def checkpoint_meta(self):
        return {"model": self.identity, "scheduler": self.state.scheduler.state_dict(),
                "data_position": self.iteration * self.global_batch,
                "scaler": self.state.scaler.state_dict() if self.state.scaler else None,
                "best": self.best, "last": self.last, "skipped_total": self.skipped_total,
                "bad_samples": self.bad_samples.count(), "export": self.model_meta(),
                "config": self.cfg.to_dict()}

    def resume(self):
        """Load the --resume checkpoint; with 'auto', a damaged newest one falls back to the
        newest complete one, saying so."""
        candidates = resolve_resume(self.cfg.checkpoint.resume, self.cfg.work_dir)
        if not candidates:
            if self.cfg.checkpoint.resume == "auto":
                self.log.info(f"--resume auto: no checkpoint in {self.cfg.work_dir}, starting from scratch")
            return
        for i, path in enumerate(candidates):
            try:
                meta = self.checkpointer.load(path, self.model, self.state.optimizer, self.identity)
                break
            except DamagedCheckpoint as e:
                if i + 1 == len(candidates):
                    raise DamagedCheckpoint(f"{e}; no other complete checkpoint to resume from") from None
                self.log.warning(f"{e}: resuming from the older {candidates[i + 1]} instead")
        self.iteration = int(meta["iteration"])
        self.state.scheduler.load_state_dict(meta["scheduler"])
        if self.state.scaler and meta.get("scaler"):
            self.state.scaler.load_state_dict(meta["scaler"])
        self.best, self.last = meta.get("best", self.best), meta.get("last", self.last)
        self.skipped_total = meta.get("skipped_total", 0)
        self.bad_samples.restored = meta.get("bad_samples", 0)
        self.last_saved = self.iteration
        if meta["rng_restored"]:
            rng = "RNG states restored"
        else:  # the data stream does not need them: samples are seeded by their position
            rng = (f"RNG states not restored (the checkpoint has {meta.get('world_size')} ranks' states, this run "
                   f"{self.world_size}; the data does not depend on them)")
        self.log.info(f"resumed from {path} at iteration {self.iteration}: model, optimizer, lr schedule and data "
                      f"position ({meta['data_position']}) restored; {rng}")

    def make_loader(self):
        sampler = PositionSampler(self.iteration * self.global_batch, self.rank, self.world_size,
                                  self.micro_batch, self.accum_steps)
        workers = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(
            self.train_samples, batch_size=self.micro_batch, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, collate_fn=self.train_samples.collate,
            worker_init_fn=functools.partial(data_worker_init, os.getpid()) if workers > 0 else None)

    def next_micro_batches(self, loader):
        """This rank's micro-batches [(images, labels), ...] of the next iteration."""
        micro_batches = []
        for _ in range(self.accum_steps):
            images, labels, bad = next(loader)
            micro_batches.append((images, labels))
            for path, problem in bad:
                self.bad_samples.note(path, problem)
        return micro_batches

    # ---------------------------------------------------------------------------------------------
    def sync_eval_model(self):
        """Copy the full (unsharded) weights and BN statistics into the plain evaluation model."""
        sharded = get_model_state_dict(self.model)
        own = self.eval_model.state_dict()
        if set(sharded) != set(own):
            raise RuntimeError(f"state dict keys differ between the trained and the eval model: "
                               f"{sorted(set(sharded) ^ set(own))[:5]}")
        with torch.no_grad():
            for name, value in sharded.items():
                if isinstance(value, DTensor):
                    value = value.full_tensor()
                own[name].copy_(value)

    def evaluate(self):
        cfg, e = self.cfg, self.cfg.eval
        self.sync_eval_model()
        on_gpu_amp = self.device.type == "cuda" and cfg.parallel.precision != "fp32"
        autocast = DTYPES[cfg.parallel.precision] if on_gpu_amp else None
        res = evaluate(self.eval_model, self.eval_samples, cfg.model.num_classes, cfg.model.ignore_index,
                       mode=e.mode, crop_size=tuple(e.crop_size), stride=tuple(e.stride),
                       class_names=self.class_names, rank=self.rank, world_size=self.world_size,
                       max_samples=e.max_samples or None, autocast_dtype=autocast)
        it = self.iteration
        self.last = {"mIoU": res["mIoU"], "iter": it}
        if self.best["mIoU"] is None or res["mIoU"] > self.best["mIoU"]:
            self.best = {"mIoU": res["mIoU"], "iter": it}
        self.log.info(f"eval iter {it}: mIoU {res['mIoU']:.2f}  mAcc {res['mAcc']:.2f}  aAcc {res['aAcc']:.2f} "
                      f"({res['num_images']} images, {res['seconds']:.1f}s)  best mIoU {self.best['mIoU']:.2f} "
                      f"@ {self.best['iter']}")
        self.log.event("eval", it, {"loss": self.last_loss, "mIoU": res["mIoU"], "mAcc": res["mAcc"],
                                    "aAcc": res["aAcc"], "best_mIoU": self.best["mIoU"],
                                    "best_iter": self.best["iter"], "num_images": res["num_images"],
                                    "IoU": res["IoU"], "eval_seconds": res["seconds"]},
                       {"eval/mIoU": res["mIoU"], "eval/mAcc": res["mAcc"], "eval/aAcc": res["aAcc"]})
        return res

    def save_checkpoint(self):
        path, seconds = self.checkpointer.save(self.iteration, self.model, self.state.optimizer, self.checkpoint_meta())
        self.last_saved = self.iteration
        self.log.info(f"checkpoint {path} ({seconds:.1f}s)")
        self.log.event("checkpoint", self.iteration, {"path": path, "seconds": seconds})

    def export(self):
        """Consolidated single-file model (loadable by setr.load_mmseg_checkpoint / setr.predict)."""
        self.sync_eval_model()
        path = os.path.join(self.cfg.work_dir, "model_final.pth")
        if self.rank == 0:
            setr.export_model(self.eval_model.state_dict(), path, **self.model_meta(), iteration=self.iteration,
                              mIoU=self.last["mIoU"])
            self.log.info(f"exported the model to {path}")
        dist.barrier()
        return path

    # ---------------------------------------------------------------------------------------------
    def _request_stop(self, signum, _frame):
        self.stop_signal = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C / SIGTERM stops at once
        self.log.info(f"{self.stop_signal} received: stopping after this iteration (again to abort)")

    def train(self):
        """Run to max_iters (or until SIGINT / SIGTERM). Returns 'finished' or the signal name."""
        max_iters = self.cfg.schedule.max_iters
        old_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._start_memory_history()
        loader = iter(self.make_loader())
        window, start_iter, t_start = MetricWindow(), self.iteration, time.perf_counter()
        status = "finished"
        try:
            while self.iteration < max_iters:
                t0 = time.perf_counter()
                micro_batches = self.next_micro_batches(loader)
                t1 = time.perf_counter()
                out = train_step(self.state, micro_batches, stop=self.stop_signal is not None)
                self.iteration += 1
                window.add(out, t1 - t0, time.perf_counter() - t0)
                self._count_skipped(out)
                eta = (time.perf_counter() - t_start) / (self.iteration - start_iter) * (max_iters - self.iteration)
                self.log.progress(self.iteration, out["loss"], eta)
                due = self.due(start_iter)
                if due["log"]:
                    self._log_window(window.means(self.global_batch), out, eta)
                    window = MetricWindow()
                if due["snapshot"]:
                    self._dump_memory_snapshot()
                if due["eval"]:  # first, so that a checkpoint of the same iteration holds its mIoU
                    self.evaluate()
                if due["checkpoint"]:
                    self.save_checkpoint()
                if out["stop"]:
                    status = self.stop_signal or "SIGTERM"
                    break
        except torch.OutOfMemoryError:
            if self.memory_history:
                self._dump_memory_snapshot(oom=True)
            raise
        finally:
            # the DataLoader's SIGCHLD handler raises, anywhere, once a worker has died: not while we report
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            del loader  # its workers stop here (or with this process)
        return self._finish(status, t_start)

    def due(self, start_iter):
        """What runs after the iteration just done: {log, snapshot, eval, checkpoint} -> bool.
        Evaluations and checkpoints at the last iteration are left to _finish."""
        cfg, it = self.cfg, self.iteration
        last = cfg.schedule.max_iters

        def every(interval):
            return bool(interval) and it % interval == 0 and it < last
        return {"log": it % cfg.metrics.log_interval == 0 or it == last or it == start_iter + 1,
                "snapshot": self.memory_history and it - start_iter == cfg.profiler.snapshot_iters,
                "eval": every(cfg.eval.interval), "checkpoint": every(cfg.checkpoint.interval)}

    def _count_skipped(self, out):
        """Account a step that train_step did not apply (non-finite loss or gradient)."""
        if out["applied"]:
            self.skipped_in_a_row = 0
            self.last_loss = out["loss"]
            return
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        what = ", ".join(f"{k} {v:.4g}" for k, v in out["terms"].items())
        self.log.warning(f"iter {self.iteration}: non-finite loss or gradient ({what}, grad norm "
                         f"{out['grad_norm']:.4g}): step skipped, weights unchanged "
                         f"({self.skipped_total} skipped so far)")
        self.log.event("skip", self.iteration, {"loss": out["loss"], "grad_norm": out["grad_norm"],
                                                "skipped": self.skipped_total})
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(f"{self.skipped_in_a_row} steps in a row had a non-finite loss or "
                                     f"gradient: training diverged (lower --lr, set --clip-grad, or use "
                                     f"--precision bf16/fp32)")

    def _finish(self, status, t_start):
        """After the loop: a stopped run checkpoints; a finished one evaluates, checkpoints, exports."""
        if status != "finished":
            if self.last_saved != self.iteration:
                self.save_checkpoint()
            self.log.info(f"stopped by {status} at iteration {self.iteration}; continue with --resume auto")
            return status
        if self.cfg.eval.at_end:
            self.evaluate()
        if self.last_saved != self.iteration:
            self.save_checkpoint()
        if self.cfg.checkpoint.export:
            self.export()
        if self.best["mIoU"] is not None:
            self.log.info(f"done: {self.iteration} iterations in {format_duration(time.perf_counter() - t_start)}; "
                          f"last mIoU {self.last['mIoU']:.2f} @ {self.last['iter']}, best mIoU "
                          f"{self.best['mIoU']:.2f} @ {self.best['iter']}")
        return status

    def _log_window(self, w, out, eta):
        """One log line, metrics.jsonl record and TensorBoard scalars; w: MetricWindow.means()."""
        it, loss, terms = self.iteration, w["loss"], w["terms"]
        mfu = model_flops_utilization(self.flops_per_image, w["img_per_s"], self.peak, self.world_size)
        mem, reserved = max_memory_gib(self.device)
        lr_base = out["lr"][0]
        lr_head = out["lr"][1] if len(out["lr"]) > 1 else None
        bad = self.bad_samples.count()
        parts = [f"iter {it}/{self.cfg.schedule.max_iters}", f"loss {loss:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in terms.items()]
        parts += [f"lr {lr_base:.3g}", f"grad_norm {w['grad_norm']:.3f}", f"{w['img_per_s']:.1f} img/s",
                  f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a",
                  f"data {100 * w['data_wait']:.0f}%",
                  (f"mem {mem:.2f}/{reserved:.2f} GiB (max active/reserved)" if reserved is not None
                   else f"max RSS {mem:.2f} GiB"),
                  f"eta {format_duration(eta)}"]
        parts += [f"skipped {self.skipped_total}"] if self.skipped_total else []
        parts += [f"bad samples {bad}"] if bad else []
        self.log.info("  ".join(parts))
        record = {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}, "lr": lr_base, "lr_head": lr_head,
                  "grad_norm": w["grad_norm"], "img_per_s": w["img_per_s"], "mfu": mfu,
                  "data_wait": w["data_wait"], "max_mem_gib": mem, "max_reserved_gib": reserved, "eta_s": eta,
                  "skipped": self.skipped_total, "bad_samples": bad}
        scalars = {"loss/total": loss, **{f"loss/{k}": v for k, v in terms.items()}, "lr/base": lr_base,
                   "lr/head": lr_head, "grad_norm": w["grad_norm"], "throughput/img_per_s": w["img_per_s"],
                   "throughput/data_wait": w["data_wait"], "throughput/mfu": mfu, "memory/max_gib": mem}
        self.log.event("train", it, record, scalars)  # None scalars are left out
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _start_memory_history(self):
        self.memory_history = self.cfg.profiler.memory_snapshot and self.device.type == "cuda"
        if self.memory_history:
            torch.cuda.memory._record_memory_history(max_entries=100000)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _dump_memory_snapshot(self, oom=False):
        path = dump_memory_snapshot(self.cfg.work_dir, self.rank, self.iteration, oom)
        self.memory_history = False
        self.log.info(f"memory snapshot {path}: open at https://pytorch.org/memory_viz")
