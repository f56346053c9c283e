"""SGD with per-group weight decay, and the warm-up + step-decay schedule in iterations.

Schedules are written at the paper's batch size (``reference_batch_size``, 2 images) and scaled
to the real total batch (devices × nodes × images per device × accumulation), as Detectron2's
``REFERENCE_WORLD_SIZE``: the learning rate linearly, iterations, decay steps and warm-up inversely.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

log = logging.getLogger(__name__)

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class Schedule:
    """A step schedule; ``scaled(total_batch)`` gives the one to run at another batch size."""

    base_lr: float
    max_iters: int
    steps: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    reference_batch_size: int = 2
    eval_period: int | None = None  # iterations between evaluations; None: only at the end
    checkpoint_period: int | None = None  # iterations between resumable checkpoints besides evaluations

    def __post_init__(self) -> None:
        if self.max_iters < 1:
            raise ValueError(f"schedule.max_iters must be >= 1, got {self.max_iters}")
        if list(self.steps) != sorted(self.steps) or any(s < 1 for s in self.steps):
            raise ValueError(f"schedule.steps must be increasing positive iterations, got {list(self.steps)}")
        if any(s > self.max_iters for s in self.steps):
            # as Detectron2: a shortened run keeps the schedule's shape; later decays just never happen
            log.warning("schedule.steps %s beyond max_iters %d are ignored", list(self.steps), self.max_iters)

    def scaled(self, total_batch_size: int) -> Schedule:
        """The same schedule in images seen, at ``total_batch_size`` images per iteration."""
        k = total_batch_size / self.reference_batch_size
        if k == 1:
            return self
        max_iters = max(1, round(self.max_iters / k))
        return replace(
            self,
            base_lr=self.base_lr * k,
            max_iters=max_iters,
            steps=tuple(max(1, round(s / k)) for s in self.steps),
            warmup_iters=round(self.warmup_iters / k),
            reference_batch_size=total_batch_size,
            eval_period=max(1, round(self.eval_period / k)) if self.eval_period else None,
            checkpoint_period=max(1, round(self.checkpoint_period / k)) if self.checkpoint_period else None,
        )

    def lr_factor(self, iteration: int) -> float:
        """Multiplier of ``base_lr`` at ``iteration``: linear warm-up, then ×gamma at each step."""
        factor = self.gamma ** bisect.bisect_right(self.steps, iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def param_groups(
    model: nn.Module, weight_decay: float, weight_decay_norm: float = 0.0, weight_decay_bias: float = 0.0
) -> list[dict]:
    """Trainable parameters in three groups: norm layers, biases, the rest (each its decay)."""
    norm, bias, rest, seen = [], [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NORMS):
                norm.append(p)
            elif name == "bias":
                bias.append(p)
            else:
                rest.append(p)
    groups = [
        {"params": rest, "weight_decay": weight_decay},
        {"params": norm, "weight_decay": weight_decay_norm},
        {"params": bias, "weight_decay": weight_decay_bias},
    ]
    return [g for g in groups if g["params"]]


def build_sgd(
    model: nn.Module,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    weight_decay_norm: float = 0.0,
    weight_decay_bias: float = 0.0,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> torch.optim.SGD:
    """SGD over :func:`param_groups` (the paper: momentum 0.9, weight decay 1e-4).

    ``foreach`` (multi-tensor) and ``fused`` (one CUDA kernel) are torch's fast update paths;
    ``None`` lets torch choose.
    """
    groups = param_groups(model, weight_decay, weight_decay_norm, weight_decay_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=foreach, fused=fused)


def total_batch_size(batch_per_device: int, world_size: int, accumulate: int = 1) -> int:
    """Images per optimizer step across all devices."""
    return batch_per_device * world_size * accumulate
