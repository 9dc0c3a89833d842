"""One optimizer step: the tensor work the trainer, the train-step benchmark and the memory planner
all run, built by one helper from the config and the parallelized model.

    state = build_step_state(cfg, model, device)   # model as train.parallelize.parallelize returns it
    out = train_step(state, [(images, labels), ...], stop=False)

Loss normalization. The model returns, per micro-batch, mmseg's loss: cross-entropy summed over
the micro-batch's label pixels (ignored ones count 0) and divided by all of its label pixels.
Every micro-batch has the same size, so dividing each by the number of micro-batches and letting
FSDP average the gradients over ranks gives the gradient of the mean loss over the global batch:
the same as one process holding the whole batch (crops are equal-sized and padding pixels count
in the denominator, as in mmseg).

Host syncs. The step reads device values on the host once, in every precision: the loss terms,
the non-finite flag, the stop request and the global grad norm, packed into one tensor after the
one all-reduce. Whether the optimizer steps is decided from that read. fp16's loss scale is
therefore a Python float updated after it (LossScaler), rather than torch's ShardedGradScaler,
whose step() and get_scale() read its device tensors each step.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from train.optim import PolyLR, sgd


class LossScaler:
    """Dynamic fp16 loss scale as torch.amp.GradScaler keeps it (init 2^16, x0.5 after a skipped step,
    x2 after `growth_interval` applied steps in a row), held on the host: the step already reads
    on the host whether the gradients are finite, so updating the scale costs no sync of its own.
    state_dict() has GradScaler's keys, so checkpoints of either load."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale, self.growth_tracker = float(init_scale), 0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def get_scale(self):
        return self.scale

    def update(self, applied):
        """After a step: back off when it was skipped, grow after growth_interval applied ones."""
        if not applied:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self):
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self.growth_tracker}

    def load_state_dict(self, state):
        self.scale, self.growth_tracker = float(state["scale"]), int(state["_growth_tracker"])
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = state["growth_interval"]


@dataclass
class StepState:
    """What one optimizer step reads and updates besides the batch."""
    model: torch.nn.Module            # as train.parallelize.parallelize returns it (FSDP2)
    optimizer: torch.optim.Optimizer  # mmseg's SGD (train.optim.sgd)
    scheduler: PolyLR
    scaler: Optional[LossScaler]      # fp16 only
    params: list                      # trainable parameters (sharded)
    bn_buffers: list                  # BatchNorm running statistics, put back when a step is skipped
    clip_grad: float                  # max global grad norm; 0 = off
    device: torch.device              # where the micro-batches go


def build_step_state(cfg, model, device):
    """The optimizer, schedule, fp16 loss scaler, parameter and BatchNorm-buffer lists of cfg's
    recipe for a model parallelized by train.parallelize.parallelize."""
    optimizer = sgd(model, cfg.optim)
    s = cfg.schedule
    return StepState(
        model=model, optimizer=optimizer, scheduler=PolyLR(optimizer, s.max_iters, s.poly_power, s.min_lr),
        scaler=LossScaler() if cfg.parallel.precision == "fp16" else None,
        params=[p for p in model.parameters() if p.requires_grad],
        bn_buffers=[b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                    for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None],
        clip_grad=cfg.optim.clip_grad, device=torch.device(device))


def train_step(state, micro_batches, stop=False, sync=True):
    """One optimizer step on this rank's micro-batches [(images (B, 3, H, W), labels (B, H, W)), ...].

    stop: this rank asks every rank to stop after this step (a signal arrived).
    Returns {"loss", "terms" {name: value}, "grad_norm", "lr" [per group], "applied", "stop"}: the
    loss terms averaged over ranks and micro-batches, the global grad norm (before clipping),
    the learning rates the step used, whether the step was applied (not when a loss term or the
    grad norm is not finite: weights, momentum and BatchNorm statistics stay as they were) and
    whether any rank asked to stop; all Python numbers, from the step's one host sync.

    sync=False leaves the host read out, for tracing under FakeTensorMode (the memory planner):
    the step is then applied whatever the values, and None is returned.
    """
    model, opt, scaler = state.model, state.optimizer, state.scaler
    model.train()
    opt.zero_grad(set_to_none=True)
    bn_state = [b.clone() for b in state.bn_buffers]  # put back if the step is skipped

    # 1. forward + backward per micro-batch; FSDP reduce-scatters (averages over ranks) each time
    terms = {}
    for images, labels in micro_batches:
        images = images.to(state.device, non_blocking=True)
        labels = labels.to(state.device, non_blocking=True)
        losses = model(images, labels)  # {"decode": ..., "aux0": 0.4 * ..., ...}
        loss = sum(losses.values()) / len(micro_batches)
        (loss * scaler.scale if scaler else loss).backward()
        for k, v in losses.items():
            terms[k] = terms.get(k, 0.0) + v.detach().float() / len(micro_batches)

    # 2. global grad norm (gradients are sharded DTensors: the norm is over all shards)
    grads = [p.grad for p in state.params if p.grad is not None]
    if scaler:
        torch._foreach_mul_(grads, 1.0 / scaler.scale)  # a power of two: exact
    grad_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()

    # 3. one all-reduce: loss terms averaged over ranks, non-finite count, stop request
    local = torch.stack(list(terms.values()))
    nonfinite = (~torch.isfinite(local)).any().float()
    packed = torch.cat([local, nonfinite[None], local.new_full((1,), float(stop))])  # filled on the device: no copy
    dist.all_reduce(packed)
    applied = True  # sync=False: applied whatever the values
    if sync:
        values = torch.cat([packed, grad_norm.reshape(1).to(packed.dtype)]).tolist()  # the step's one host sync
        k, world = len(terms), dist.get_world_size()
        mean_terms = {name: v / world for name, v in zip(terms, values[:k])}
        nonfinite_loss, stop_requested, norm = values[k] > 0, values[k + 1] > 0, values[k + 2]
        lr = state.scheduler.get_last_lr()
        applied = not nonfinite_loss and math.isfinite(norm)

    # 4. step, unless something is not finite (reported by the caller, never applied silently)
    if applied:
        if state.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(state.params, state.clip_grad, grad_norm)
        opt.step()
    else:  # the forward's BatchNorm statistics are not kept either
        with torch.no_grad():
            for b, saved in zip(state.bn_buffers, bn_state):
                b.copy_(saved)
    if scaler and sync:
        scaler.update(applied)
    opt.zero_grad(set_to_none=True)
    state.scheduler.step()
    if not sync:
        return None
    return {"loss": sum(mean_terms.values()), "terms": mean_terms, "grad_norm": norm, "lr": lr,
            "applied": applied, "stop": stop_requested}
