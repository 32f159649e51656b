"""The base of every result object (analyses, generation, patching): numbers as tensors, a tidy
table, a picture, an HTML repr. It imports nothing of loop_lens at import time, so any layer can use it."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any

import pandas as pd
import torch
from torch import Tensor


def _escaping(method: Any) -> Any:
    """`method` with its plotly figure passed through `loop_lens.plotting.safe_figure`."""
    @functools.wraps(method)
    def plot(self: Any, *args: Any, **kwargs: Any) -> Any:
        from loop_lens.plotting import safe_figure

        return safe_figure(method(self, *args, **kwargs))

    plot.__ll_escaping__ = True
    return plot


class Result(ABC):
    """Each analysis returns a subclass: tensors as attributes, `to_frame()` and `plot()`.

    Every `plot` / `plot_*` method a subclass defines returns its figure with all text
    HTML-escaped for plotly (token strings are untrusted: see `loop_lens.plotting`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, member in list(vars(cls).items()):
            if (name == "plot" or name.startswith("plot_")) and callable(member) and not getattr(member, "__ll_escaping__", False) \
                    and not getattr(member, "__isabstractmethod__", False):
                setattr(cls, name, _escaping(member))

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
