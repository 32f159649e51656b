"""The site plan of a patching sweep: which hook points each `site=` covers, in which order, and
the result's shapes; the checks of a sweep's arguments (`_plan`) shared by both methods."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from torch import Tensor

from loop_lens.checks import check_n_loops, integer
from loop_lens.patching.common import _pair, _seed

SITES = ("resid_post", "attn_out", "mlp_out", "head", "state", "injection")
"""The sites a sweep can patch."""

_BLOCK_HOOK = {"resid_post": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "head": "attn.hook_z"}
_ITER_HOOK = {"state": "hook_state_post", "injection": "hook_injected"}


# ---------------------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class _Site:
    """One patchable activation: the hook name and what is patched there (a position, or a head
    at every position)."""

    hook: str
    index: int  # position, or head for "head"
    phase: str  # "prelude", "loop" or "coda"
    iteration: int  # -1 outside the loop
    layer: int  # -1 for per-iteration sites


def _sites(model: Any, site: str, T: int, positions: list[int]) -> tuple[list[_Site], dict[str, tuple[int, ...]]]:
    """Every patch of a sweep, in the order of the result's values, and the result's shapes
    (`values`, `prelude`, `coda`)."""
    cfg = model.cfg
    if site in _ITER_HOOK:
        sites = [_Site(f"iter.{t}.{_ITER_HOOK[site]}", p, "loop", t, -1) for t in range(T) for p in positions]
        return sites, {"values": (T, len(positions))}
    width = cfg.n_heads if site == "head" else len(positions)
    idx = list(range(cfg.n_heads)) if site == "head" else positions
    suffix = _BLOCK_HOOK[site]
    sites = [_Site(f"prelude.{l}.{suffix}", i, "prelude", -1, l) for l in range(cfg.n_prelude) for i in idx]
    sites += [_Site(f"iter.{t}.blocks.{l}.{suffix}", i, "loop", t, l) for t in range(T) for l in range(cfg.n_block) for i in idx]
    sites += [_Site(f"coda.{l}.{suffix}", i, "coda", -1, l) for l in range(cfg.n_coda) for i in idx]
    shapes = {"values": (T, cfg.n_block, width)}
    if cfg.n_prelude:
        shapes["prelude"] = (cfg.n_prelude, width)
    if cfg.n_coda:
        shapes["coda"] = (cfg.n_coda, width)
    return sites, shapes


def _split(flat: Tensor, shapes: dict[str, tuple[int, ...]], model: Any) -> dict[str, Tensor]:
    """Flat per-site numbers (in `_sites` order: prelude, loop, coda) -> the result's tensors."""
    n_pre = shapes["prelude"][0] * shapes["prelude"][1] if "prelude" in shapes else 0
    n_loop = 1
    for d in shapes["values"]:
        n_loop *= d
    out = {"values": flat[n_pre : n_pre + n_loop].reshape(shapes["values"])}
    if "prelude" in shapes:
        out["prelude"] = flat[:n_pre].reshape(shapes["prelude"])
    if "coda" in shapes:
        out["coda"] = flat[n_pre + n_loop :].reshape(shapes["coda"])
    return out


def _site(model: Any, site: Any) -> str:
    if site not in SITES:
        raise ValueError(f"site must be one of {list(SITES)}, got {site!r}")
    if site == "injection" and model.cfg.injection == "none":
        raise ValueError("site='injection' needs a model with input injection; this model has injection='none'")
    return site


def _positions(positions: Any, site: str, S: int) -> list[int]:
    """The positions patched one at a time (all of them by default), as non-negative ints."""
    if site == "head":
        if positions is not None:
            raise ValueError("site='head' patches a head at every position; positions must be None")
        return list(range(S))
    if positions is None:
        return list(range(S))
    if isinstance(positions, (str, bytes)) or not isinstance(positions, (Sequence, Tensor)):
        raise ValueError(f"positions must be None or a sequence of position indices, got {positions!r}")
    values = positions.tolist() if isinstance(positions, Tensor) else list(positions)
    if not values:
        raise ValueError("positions is empty; give at least one position (or None for all)")
    out = []
    for p in values:
        p = integer(p, "positions")
        if not -S <= p < S:
            raise ValueError(f"positions holds {p}, out of range for {S} positions (valid: {-S} .. {S - 1})")
        out.append(p % S)
    return out


def _names_for(model: Any, site: str, T: int) -> list[str]:
    names = []
    if site in _ITER_HOOK:
        return [f"iter.{t}.{_ITER_HOOK[site]}" for t in range(T)]
    suffix = _BLOCK_HOOK[site]
    names += [f"prelude.{l}.{suffix}" for l in range(model.cfg.n_prelude)]
    names += [f"iter.{t}.blocks.{l}.{suffix}" for t in range(T) for l in range(model.cfg.n_block)]
    names += [f"coda.{l}.{suffix}" for l in range(model.cfg.n_coda)]
    return names



class _Plan(NamedTuple):
    """A patching sweep's checked arguments and sites, shared by both methods."""

    site: str
    n_loops: int
    clean: Tensor
    corrupt: Tensor
    positions: list[int]
    seed: Optional[int]
    run: dict
    sites: list[_Site]
    shapes: dict[str, tuple[int, ...]]
    names: list[str]


def _plan(model: Any, clean: Any, corrupt: Any, site: Any, n_loops: Any, seed: Any, positions: Any, exit: Any) -> _Plan:
    """Check a patching sweep's arguments and list its sites and hook names."""
    site = _site(model, site)
    T = check_n_loops(n_loops, model.cfg.default_loops)
    clean_tokens, corrupt_tokens = _pair(model, clean, corrupt)
    pos = _positions(positions, site, corrupt_tokens.shape[1])
    seed = _seed(model, seed)
    sites, shapes = _sites(model, site, T, pos)
    return _Plan(site, T, clean_tokens, corrupt_tokens, pos, seed, dict(n_loops=T, seed=seed, exit=exit), sites, shapes,
                 _names_for(model, site, T))

