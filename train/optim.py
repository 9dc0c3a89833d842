"""Optimizer parameter groups and the learning-rate schedule of mmseg's SETR recipe."""
import torch


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


def sgd(model, optim):
    """mmseg's SGD of the recipe: optim is an OptimConfig (lr, head_lr_mult, momentum, weight_decay)."""
    return torch.optim.SGD(param_groups(model, optim.lr, optim.head_lr_mult), lr=optim.lr,
                           momentum=optim.momentum, weight_decay=optim.weight_decay)


class PolyLR:
    """mmseg's poly schedule per parameter group: lr(t) = (lr0 - min_lr) * (1 - t / T)^power + min_lr,
    t = the iteration about to run (0 for the first step). This is mmcv 0.x's PolyLrUpdaterHook,
    which trained the released checkpoints; mmengine's PolyLR(end=T) reaches min_lr one iteration
    earlier (total_iters = end - begin - 1)."""

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
