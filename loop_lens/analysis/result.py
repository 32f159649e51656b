"""Base for analysis results: numbers (tensors), a tidy table, a picture, an HTML repr."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import pandas as pd
import torch
from torch import Tensor


class Result(ABC):
    """Each analysis returns a subclass: tensors as attributes, `to_frame()` and `plot()`."""

    @abstractmethod
    def to_frame(self) -> pd.DataFrame:
        """The numbers as a tidy table, one row per observation."""

    @abstractmethod
    def plot(self, **kwargs: Any):
        """A plotly figure."""

    def _repr_html_(self) -> str:
        frame = self.to_frame()
        head = f"<p><b>{type(self).__name__}</b> ({len(frame)} rows; first 20)</p>"
        return head + frame.head(20).to_html(index=False, float_format=lambda v: f"{v:.4g}")


def long_frame(tensor: Tensor, dims: list[str], value: str) -> pd.DataFrame:
    """A tensor as a tidy table: one column per dimension index, one for the value (floats in fp32,
    integers kept)."""
    t = tensor.detach().cpu()
    t = t.float() if t.is_floating_point() else t
    ranges = [torch.arange(n, device="cpu") for n in t.shape]
    index = torch.cartesian_prod(*ranges) if t.ndim > 1 else ranges[0][:, None]
    frame = pd.DataFrame(index.reshape(-1, t.ndim).numpy(), columns=dims)
    frame[value] = t.reshape(-1).numpy()
    return frame


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
