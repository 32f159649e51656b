"""Helpers for analysis results; the `Result` base itself lives in `loop_lens.result`."""

from __future__ import annotations

import torch
from torch import Tensor

from loop_lens.checks import tolerance
from loop_lens.result import Result, long_frame

__all__ = ["Result", "first_stable", "long_frame"]


def first_stable(values: Tensor, tol: float, dim: int = 0, name: str = "tol") -> Tensor:
    """First index t along `dim` such that every value at t' > t is below `tol`; -1 where the
    values never settle. Only the undefined first step (NaN at t = 0, where there is no previous
    state) counts as below; a NaN or infinite value anywhere later is a step that did not settle.
    `tol` must be a positive finite number (ValueError naming `name`)."""
    tol = tolerance(tol, name)
    v = values.movedim(dim, 0)
    above = ~(v < tol)  # NaN and inf are above
    if v.shape[0]:
        above[0] = above[0] & ~torch.isnan(v[0])
    T = v.shape[0]
    idx = torch.arange(T, device=v.device).view(T, *([1] * (v.ndim - 1)))
    # the last t with a big step is the first state after which every step is small
    last_above = torch.where(above, idx, torch.full_like(idx, -1)).amax(dim=0)
    return torch.where(last_above >= T - 1, torch.full_like(last_above, -1), last_above.clamp_min(0))
