"""The optimiser, its schedule, and the guarded step that refuses non-finite values."""

from __future__ import annotations

import logging
import math

import torch
from accelerate import Accelerator
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from reftkit.config import TrainerOptions
from reftkit.training.errors import NonFiniteError

log = logging.getLogger("reftkit")


def make_optimizer(params, cfg: TrainerOptions, total_steps: int):
    """AdamW with linear warm-up, then linear decay to 0 or a constant rate.

    `params` is an iterable of tensors or of param-group dicts (a group may set its own "lr")."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        groups = [{"params": [p for p in params if p.requires_grad]}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=_fused_adamw(groups) or None)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.lr_schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    return optimizer, scheduler


def _fused_adamw(groups: list[dict]) -> bool:
    """Whether AdamW's fused kernel serves these parameters: one pass per tensor instead of one per
    operation (several times faster a step for SmolLM2-135M on a 2-core CPU), the same update. Only
    on CPU and CUDA (the parameters move there later, in accelerator.prepare: not where an MPS or XPU
    device would take them) and with a torch whose CPU kernel exists (2.4+)."""
    if torch.backends.mps.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return False
    tensors = [p for g in groups for p in g["params"]]
    if not all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in tensors):
        return False
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):  # a torch without the CPU kernel refuses at construction
        return False
    return True


def guarded_step(accelerator: Accelerator, model, optimizer, cfg: TrainerOptions, loss: torch.Tensor,
                 where: str) -> tuple[bool, float | None]:
    """Clips the gradients and takes the optimiser step unless the loss (on any process) or the
    gradient norm is non-finite: then the run stops (cfg.nonfinite "stop", nothing is saved) or the
    step is skipped ("skip"). Returns (stepped, gradient norm). `where` names the step in messages."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=accelerator.device)
    bad = accelerator.reduce(bad, "sum").item() > 0
    norm = float(grad_norm) if grad_norm is not None else None  # DeepSpeed clips inside its own step
    if bad or (norm is not None and not math.isfinite(norm)):
        what = f"non-finite {'loss' if bad else 'gradient norm'} at {where}"
        if cfg.nonfinite == "stop":
            raise NonFiniteError(f"{what}: run stopped, nothing of this step saved; the last checkpoint is intact "
                                 "(lower lr, or rerun with --nonfinite skip to skip such steps)")
        log.warning("%s: step skipped (nonfinite: skip)", what)
        optimizer.zero_grad()
        return False, norm
    optimizer.step()
    optimizer.zero_grad()
    return True, norm
