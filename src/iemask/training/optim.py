"""SGD with per-group weight decay, and the warm-up + step-decay schedule in iterations.

Schedules are written at the paper's batch size (``reference_batch_size``, 2 images) and scaled
to the real total batch (devices × nodes × images per device × accumulation), as Detectron2's
``REFERENCE_WORLD_SIZE``: the learning rate linearly, iterations, decay steps and warm-up inversely.
"""

from __future__ import annotations

import bisect
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator, XLAAccelerator
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


def trainer_world_size(
    accelerator: str = "auto", devices: int | str | Sequence[int] = "auto", num_nodes: int = 1
) -> int:
    """The processes a Lightning Trainer given these arguments trains on: devices per node × nodes.

    Known before the Trainer exists, so that it can be built with the scaled schedule's length. Parsed
    as the Trainer parses them, with Lightning's accelerator API: accelerator ``auto`` is TPU, MPS or
    CUDA, whichever is available, else CPU (``gpu``: MPS, else CUDA); devices ``auto`` are all devices
    of that kind (one CPU; one GPU in a notebook or REPL, as Lightning does there), ``-1`` all, a
    count, or device indices (a list, or a string such as ``"0,1"``).
    """
    if accelerator == "auto":
        available = (("tpu", XLAAccelerator), ("mps", MPSAccelerator), ("cuda", CUDAAccelerator))
        accelerator = next((name for name, kind in available if kind.is_available()), "cpu")
    elif accelerator == "gpu":
        accelerator = "mps" if MPSAccelerator.is_available() else "cuda"
    kind = AcceleratorRegistry.get(accelerator)
    if devices == "auto":
        interactive = hasattr(sys, "ps1") or bool(sys.flags.interactive)
        devices = 1 if interactive and accelerator == "cuda" else kind.auto_device_count()
    elif isinstance(devices, Sequence) and not isinstance(devices, str):
        devices = list(devices)  # also an OmegaConf ListConfig
    return len(kind.get_parallel_devices(kind.parse_devices(devices))) * num_nodes
