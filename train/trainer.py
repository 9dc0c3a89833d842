"""The training loop: build, resume, train_step (top to bottom), evaluate, checkpoint, export.

Loss normalization. The model returns, per micro-batch, mmseg's loss: cross-entropy summed over
the micro-batch's label pixels (ignored ones count 0) and divided by all of its label pixels.
Every micro-batch has the same size, so dividing each by the number of accumulation steps and
letting FSDP average the gradients over ranks gives the gradient of the mean loss over the
global batch: the same as one process holding the whole batch (crops are equal-sized and
padding pixels count in the denominator, as in mmseg).
"""
import copy
import math
import os
import resource
import signal
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

import setr
from setr.data import EvalSamples, PositionSampler, TrainSamples, build_dataset
from setr.inference import evaluate
from train.checkpoint import Checkpointer, resolve_resume
from train.config import ConfigError
from train.flops import model_flops_utilization, peak_flops
from train.logger import format_duration
from train.parallelize import DTYPES

MAX_SKIPPED_IN_A_ROW = 20


def param_groups(model, lr, head_lr_mult):
    """mmseg's paramwise custom_keys={'head': lr_mult 10}: names containing 'head' (decode_head.*,
    auxiliary_head.*) get lr * head_lr_mult; everything else (backbone, MLA neck) the base lr."""
    base, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if "head" in name else base).append(p)  # wrapper prefixes (AC, compile) never say "head"
    groups = [{"params": base, "lr": lr, "name": "base"}]
    if head:
        groups.append({"params": head, "lr": lr * head_lr_mult, "name": "head"})
    return groups


class PolyLR:
    """mmseg's poly schedule per parameter group: lr(t) = (lr0 - min_lr) * (1 - t / T)^power + min_lr,
    t = the iteration about to run (0 for the first step)."""

    def __init__(self, optimizer, max_iters, power=0.9, min_lr=1e-4):
        self.optimizer = optimizer
        self.max_iters, self.power, self.min_lr = max_iters, power, min_lr
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.last_iter = 0
        self._apply()

    def lr_at(self, initial_lr, t):
        t = min(t, self.max_iters)
        return (initial_lr - self.min_lr) * (1 - t / self.max_iters) ** self.power + self.min_lr

    def _apply(self):
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(group["initial_lr"], self.last_iter)

    def step(self):
        self.last_iter += 1
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"last_iter": self.last_iter, "max_iters": self.max_iters, "power": self.power,
                "min_lr": self.min_lr}

    def load_state_dict(self, state):
        self.last_iter = int(state["last_iter"])
        self._apply()


def _worker_init(_worker_id):
    # Ctrl-C / SIGTERM (torchrun signals the whole session) are handled by the training process,
    # which writes a final checkpoint: its data workers must not die first. They exit with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _max_memory_gib(device):
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 2 ** 30,
                torch.cuda.max_memory_reserved(device) / 2 ** 30)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, None  # max RSS (kB on Linux)


def build_data(cfg):
    """Training samples (by global position) and the evaluation split, from the data config."""
    m, d = cfg.model, cfg.data
    kw = dict(root=d.root or None, num_classes=None if d.dataset == "ade20k" else m.num_classes,
              ignore_index=m.ignore_index, reduce_zero_label=d.reduce_zero_label,
              synthetic_size=tuple(d.synthetic_size), seed=cfg.seed)
    train_set = build_dataset(d.dataset, split="training", synthetic_samples=d.synthetic_train_samples, **kw)
    eval_set = build_dataset(d.dataset, split="validation", synthetic_samples=d.synthetic_val_samples, **kw)
    if train_set.num_classes != m.num_classes:
        raise ConfigError(f"the dataset has {train_set.num_classes} classes but --num-classes is {m.num_classes}")
    return SimpleNamespace(
        train=TrainSamples(train_set, tuple(d.crop_size), cfg.seed, scale=tuple(d.scale),
                           ratio_range=tuple(d.ratio_range), cat_max_ratio=d.cat_max_ratio),
        eval=EvalSamples(eval_set, scale=tuple(cfg.eval.scale)), class_names=list(eval_set.class_names),
        description=f"{d.dataset} ({len(train_set)} train / {len(eval_set)} val images)")


def build_model(cfg, device, log):
    """SETR built on the device, timm weights loaded (strict), and rank 0's tensors broadcast so
    that every rank shards the same model. Plain module: parallelize() comes next."""
    m = cfg.model
    torch.manual_seed(cfg.seed)
    model = setr.build_setr(m.head, m.backbone, m.num_classes, img_size=tuple(cfg.data.crop_size), impl=m.impl,
                            aux=m.aux, ignore_index=m.ignore_index, device=device)
    if m.pretrained:
        try:
            report = setr.load_timm_vit(model, m.pretrained)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"--pretrained: {e}") from None
        log.info(f"pretrained backbone {m.pretrained}: all {len(model.backbone.state_dict())} keys loaded"
                 + "".join(f"; {n}" for n in report["notes"]))
    if dist.get_world_size() > 1:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t, src=0)
    return model


def eval_copy(model):
    """A plain copy of the (not yet parallelized) model for evaluation, refreshed before each one."""
    copy_ = copy.deepcopy(model).eval()
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_


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

        o, s = cfg.optim, cfg.schedule
        self.optimizer = torch.optim.SGD(param_groups(self.model, o.lr, o.head_lr_mult), lr=o.lr,
                                         momentum=o.momentum, weight_decay=o.weight_decay)
        self.scheduler = PolyLR(self.optimizer, s.max_iters, s.poly_power, s.min_lr)
        self.scaler = None
        if cfg.parallel.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device=device.type)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.bn_buffers = [b for mod in self.model.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
                           for b in (mod.running_mean, mod.running_var, mod.num_batches_tracked) if b is not None]
        self.checkpointer = Checkpointer(cfg.work_dir, cfg.checkpoint.keep_last)

        self.iteration = 0
        self.best = {"mIoU": None, "iter": None}
        self.last = {"mIoU": None, "iter": None}
        self.skipped_total = 0
        self.skipped_in_a_row = 0
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
            f"{'on' if cfg.parallel.sync_bn else 'off'}, AC {'on' if cfg.parallel.activation_checkpointing else 'off'}, "
            f"compile {'on' if cfg.parallel.compile else 'off'}",
        ]
        return "\n".join(lines)

    def checkpoint_meta(self):
        return {"model": self.identity, "scheduler": self.scheduler.state_dict(),
                "data_position": self.iteration * self.global_batch,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "best": self.best, "last": self.last, "skipped_total": self.skipped_total,
                "config": self.cfg.to_dict()}

    def resume(self):
        path = resolve_resume(self.cfg.checkpoint.resume, self.cfg.work_dir)
        if path is None:
            if self.cfg.checkpoint.resume == "auto":
                self.log.info(f"--resume auto: no checkpoint in {self.cfg.work_dir}, starting from scratch")
            return
        meta = self.checkpointer.load(path, self.model, self.optimizer, self.identity)
        self.iteration = int(meta["iteration"])
        self.scheduler.load_state_dict(meta["scheduler"])
        if self.scaler and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.best, self.last = meta.get("best", self.best), meta.get("last", self.last)
        self.skipped_total = meta.get("skipped_total", 0)
        self.last_saved = self.iteration
        self.log.info(f"resumed from {path} at iteration {self.iteration} (data position "
                      f"{meta['data_position']}, RNG {'restored' if meta['rng_restored'] else 'not restored: other world size'})")

    def make_loader(self):
        sampler = PositionSampler(self.iteration * self.global_batch, self.rank, self.world_size,
                                  self.micro_batch, self.accum_steps)
        workers = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(
            self.train_samples, batch_size=self.micro_batch, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, worker_init_fn=_worker_init if workers > 0 else None)

    # ---------------------------------------------------------------------------------------------
    def train_step(self, micro_batches):
        """One optimizer step on this rank's micro-batches [(images, labels), ...].

        Returns the global mean loss terms, grad norm, lr and whether the step was applied."""
        model, opt, scaler = self.model, self.optimizer, self.scaler
        model.train()
        opt.zero_grad(set_to_none=True)
        bn_state = [b.clone() for b in self.bn_buffers]  # restored if the step is skipped

        # 1. forward + backward per micro-batch; FSDP reduce-scatters (averages over ranks) each time
        terms = {}
        for images, labels in micro_batches:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            losses = model(images, labels)  # {"decode": ..., "aux0": 0.4 * ..., ...}
            loss = sum(losses.values()) / self.accum_steps
            (scaler.scale(loss) if scaler else loss).backward()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + v.detach().float() / self.accum_steps

        # 2. global grad norm (gradients are sharded DTensors: the norm is over all shards)
        if scaler:
            scaler.unscale_(opt)
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()

        # 3. one all-reduce: loss terms averaged over ranks, non-finite count, stop request
        local = torch.stack(list(terms.values()))
        nonfinite = (~torch.isfinite(local)).any().float()
        stop = torch.tensor(float(self.stop_signal is not None), device=local.device)
        packed = torch.cat([local, nonfinite[None], stop[None]])
        dist.all_reduce(packed)
        values = packed.tolist()
        k = len(terms)
        mean_terms = {name: v / self.world_size for name, v in zip(terms, values[:k])}
        nonfinite_loss, stop = values[k] > 0, values[k + 1] > 0
        grad_norm = grad_norm.item()
        lr = self.scheduler.get_last_lr()

        # 4. step, unless something is not finite (reported by the caller, never applied silently)
        applied = False
        if not nonfinite_loss and (math.isfinite(grad_norm) or scaler):
            if self.cfg.optim.clip_grad > 0 and math.isfinite(grad_norm):
                torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.optim.clip_grad,
                                                     torch.tensor(grad_norm, device=grads[0].device))
            if scaler:
                scale = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                applied = scaler.get_scale() >= scale  # the scaler backs off when it skipped
            else:
                opt.step()
                applied = True
        elif scaler:  # unscale_ ran: close the scaler's iteration, backing off as for an overflow
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        if not applied:  # the forward's BatchNorm statistics are not kept either
            with torch.no_grad():
                for b, saved in zip(self.bn_buffers, bn_state):
                    b.copy_(saved)
        opt.zero_grad(set_to_none=True)
        self.scheduler.step()
        loss = sum(mean_terms.values())
        return {"loss": loss, "terms": mean_terms, "grad_norm": grad_norm, "lr": lr, "applied": applied,
                "stop": stop}

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
        autocast = DTYPES[cfg.parallel.precision] if self.device.type == "cuda" and cfg.parallel.precision != "fp32" else None
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
        path, seconds = self.checkpointer.save(self.iteration, self.model, self.optimizer, self.checkpoint_meta())
        self.last_saved = self.iteration
        self.log.info(f"checkpoint {path} ({seconds:.1f}s)")
        self.log.event("checkpoint", self.iteration, {"path": path, "seconds": seconds})

    def export(self):
        """Consolidated single-file model (loadable by setr.load_mmseg_checkpoint / setr.predict)."""
        self.sync_eval_model()
        path = os.path.join(self.cfg.work_dir, "model_final.pth")
        if self.rank == 0:
            setr.export_model(self.eval_model, path, class_names=self.class_names,
                              palette=[list(map(int, c)) for c in self.eval_samples.palette], iteration=self.iteration,
                              dataset=self.cfg.data.dataset, crop_size=list(self.cfg.data.crop_size),
                              eval=dict(mode=self.cfg.eval.mode, crop_size=list(self.cfg.eval.crop_size),
                                        stride=list(self.cfg.eval.stride), scale=list(self.cfg.eval.scale)),
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
        cfg = self.cfg
        s, mcfg = cfg.schedule, cfg.metrics
        old_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        memory_profile = cfg.profiler.memory_snapshot and self.device.type == "cuda"
        if memory_profile:
            torch.cuda.memory._record_memory_history(max_entries=100000)
        loader = iter(self.make_loader())
        window = {"loss": 0.0, "terms": {}, "n": 0, "grad_norm": 0.0, "data": 0.0, "time": 0.0, "iters": 0}
        start_iter, t_start = self.iteration, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        status = "finished"
        try:
            while self.iteration < s.max_iters:
                t0 = time.perf_counter()
                micro_batches = [next(loader) for _ in range(self.accum_steps)]
                t1 = time.perf_counter()
                out = self.train_step(micro_batches)
                self.iteration += 1
                it = self.iteration
                t2 = time.perf_counter()
                window["data"] += t1 - t0
                window["time"] += t2 - t0
                window["iters"] += 1
                if out["applied"]:
                    self.skipped_in_a_row = 0
                    window["loss"] += out["loss"]
                    window["grad_norm"] += out["grad_norm"]
                    window["n"] += 1
                    for k, v in out["terms"].items():
                        window["terms"][k] = window["terms"].get(k, 0.0) + v
                    self.last_loss = out["loss"]
                else:
                    self.skipped_total += 1
                    self.skipped_in_a_row += 1
                    what = ", ".join(f"{k} {v:.4g}" for k, v in out["terms"].items())
                    self.log.warning(f"iter {it}: non-finite loss or gradient ({what}, grad norm "
                                     f"{out['grad_norm']:.4g}): step skipped, weights unchanged "
                                     f"({self.skipped_total} skipped so far)")
                    self.log.event("skip", it, {"loss": out["loss"], "grad_norm": out["grad_norm"],
                                                "skipped": self.skipped_total})
                    if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                        raise FloatingPointError(f"{self.skipped_in_a_row} steps in a row had a non-finite "
                                                 f"loss or gradient: training diverged (lower --lr, set "
                                                 f"--clip-grad, or use --precision bf16/fp32)")
                elapsed = time.perf_counter() - t_start
                eta = elapsed / (it - start_iter) * (s.max_iters - it)
                self.log.progress(it, out["loss"], eta)
                if it % mcfg.log_interval == 0 or it == s.max_iters or it == start_iter + 1:
                    self._log_window(it, window, out, eta)
                    window = {"loss": 0.0, "terms": {}, "n": 0, "grad_norm": 0.0, "data": 0.0, "time": 0.0,
                              "iters": 0}
                if memory_profile and it - start_iter == cfg.profiler.snapshot_iters:
                    self._dump_memory_snapshot(it)
                    memory_profile = False
                # evaluate first, so that a checkpoint of the same iteration holds its best / last mIoU
                if cfg.eval.interval and it % cfg.eval.interval == 0 and it < s.max_iters:
                    self.evaluate()
                if cfg.checkpoint.interval and it % cfg.checkpoint.interval == 0 and it < s.max_iters:
                    self.save_checkpoint()
                if out["stop"]:
                    status = self.stop_signal or "SIGTERM"
                    break
        except torch.OutOfMemoryError:
            if memory_profile:
                self._dump_memory_snapshot(self.iteration, oom=True)
            raise
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        if status != "finished":
            if self.last_saved != self.iteration:
                self.save_checkpoint()
            self.log.info(f"stopped by {status} at iteration {self.iteration}; continue with --resume auto")
            return status
        if cfg.eval.at_end:
            self.evaluate()
        if self.last_saved != self.iteration:
            self.save_checkpoint()
        if cfg.checkpoint.export:
            self.export()
        if self.best["mIoU"] is not None:
            self.log.info(f"done: {self.iteration} iterations in {format_duration(time.perf_counter() - t_start)}; "
                          f"last mIoU {self.last['mIoU']:.2f} @ {self.last['iter']}, best mIoU "
                          f"{self.best['mIoU']:.2f} @ {self.best['iter']}")
        return status

    def _log_window(self, it, w, out, eta):
        n = max(1, w["n"])
        imgs_per_s = self.global_batch * w["iters"] / max(w["time"], 1e-9)
        mfu = model_flops_utilization(self.flops_per_image, imgs_per_s, self.peak, self.world_size)
        mem, reserved = _max_memory_gib(self.device)
        lr_base = out["lr"][0]
        lr_head = out["lr"][1] if len(out["lr"]) > 1 else None
        loss = w["loss"] / n if w["n"] else float("nan")
        terms = {k: v / n for k, v in w["terms"].items()}
        data_share = w["data"] / max(w["time"], 1e-9)
        parts = [f"iter {it}/{self.cfg.schedule.max_iters}", f"loss {loss:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in terms.items()]
        parts += [f"lr {lr_base:.3g}", f"grad_norm {w['grad_norm'] / n:.3f}", f"{imgs_per_s:.1f} img/s",
                  f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a",
                  f"data {100 * data_share:.0f}%",
                  (f"mem {mem:.2f}/{reserved:.2f} GiB (max active/reserved)" if reserved is not None
                   else f"max RSS {mem:.2f} GiB"),
                  f"eta {format_duration(eta)}"]
        if self.skipped_total:
            parts.append(f"skipped {self.skipped_total}")
        self.log.info("  ".join(parts))
        record = {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}, "lr": lr_base, "lr_head": lr_head,
                  "grad_norm": w["grad_norm"] / n, "img_per_s": imgs_per_s, "mfu": mfu, "data_wait": data_share,
                  "max_mem_gib": mem, "max_reserved_gib": reserved, "eta_s": eta, "skipped": self.skipped_total}
        scalars = {"loss/total": loss, **{f"loss/{k}": v for k, v in terms.items()}, "lr/base": lr_base,
                   "grad_norm": w["grad_norm"] / n, "throughput/img_per_s": imgs_per_s,
                   "throughput/data_wait": data_share, "memory/max_gib": mem}
        if lr_head is not None:
            scalars["lr/head"] = lr_head
        if mfu is not None:
            scalars["throughput/mfu"] = mfu
        self.log.event("train", it, record, scalars)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _dump_memory_snapshot(self, it, oom=False):
        import pickle

        folder = os.path.join(self.cfg.work_dir, "memory_snapshot")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{self.rank}_iter{it}{'_oom' if oom else ''}.pickle")
        with open(path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f, protocol=4)
        torch.cuda.memory._record_memory_history(enabled=None)
        self.log.info(f"memory snapshot {path}: open at https://pytorch.org/memory_viz")
