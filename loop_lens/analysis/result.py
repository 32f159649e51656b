"""Helpers for analysis results; the `Result` base itself lives in `loop_lens.result`."""

from __future__ import annotations

import torch
from torch import Tensor

from loop_lens.result import Result, long_frame

__all__ = ["Result", "first_stable", "long_frame"]


def first_stable(values: Tensor, tol: float, dim: int = 0) -> Tensor:
    """First index t along `dim` such that every value at t' > t is below `tol` (NaN counts as
    below, for the undefined t = 0 step); -1 where the values never settle."""
    v = values.movedim(dim, 0)
    above = (v >= tol) & ~torch.isnan(v)  # [T, ...]
    T = v.shape[0]
    idx = torch.arange(T, device=v.device).view(T, *([1] * (v.ndim - 1)))
    # the last t with a big step is the first state after which every step is small
    last_above = torch.where(above, idx, torch.full_like(idx, -1)).amax(dim=0)
    return torch.where(last_above >= T - 1, torch.full_like(last_above, -1), last_above.clamp_min(0))
