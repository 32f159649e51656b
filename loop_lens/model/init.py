"""Random initialisation for looped models built from a LoopConfig (sweeps, the zoo)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


@torch.no_grad()
def init_weights(model: nn.Module, std: Optional[float] = None, seed: Optional[int] = None) -> nn.Module:
    """Normal(0, std) linear and embedding weights (std = 1/sqrt(d_model) by default), output
    projections scaled by 1/sqrt(2 * depth), norms at 1, biases at 0."""
    cfg = model.cfg
    std = std if std is not None else 1 / math.sqrt(cfg.d_model)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    out_std = std / math.sqrt(2 * max(cfg.n_layers, 1))
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            p.copy_(torch.randn(p.shape, generator=g) * s)
        elif name.endswith("bias"):
            p.zero_()
        elif name.endswith("weight"):
            p.fill_(1.0)
    if getattr(model, "injection", None) is not None and cfg.injection == "linear":
        D = cfg.d_model
        w = model.injection.adapter.weight  # [D, 2D] on concat([state, e])
        w.copy_(torch.cat([torch.eye(D), torch.eye(D)], dim=1) / math.sqrt(2) + torch.randn(w.shape, generator=g) * std * 0.1)
    return model
