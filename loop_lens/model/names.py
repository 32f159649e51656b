"""Hook names: build them (`hook_name`) and take them apart (`parse_hook_name`).

Phases: "prelude" (`prelude.{l}.*`), "loop" (`iter.{t}.*`), "coda" (`coda.{l}.*`), and
"model" for names outside any layer (`hook_embed`, `ln_final.*`, `hook_latent`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

from loop_lens.model import sites

_NAME_RE = re.compile(
    r"^(?:(?P<phase>prelude|coda)\.(?P<pl>\d+)\."
    r"|iter\.(?P<it>\d+)\.(?:blocks\.(?P<bl>\d+)\.)?)?(?P<kind>.+)$"
)


class HookNameParts(NamedTuple):
    phase: str
    iteration: Optional[int]
    layer: Optional[int]
    kind: str


def _suffix(kind: str) -> str:
    """Short kind ('pattern', 'resid_post', 'ln1.hook_scale') -> hook suffix inside its container."""
    if "hook_" in kind:
        return kind
    short = sites.short_kinds()
    if kind in short:
        return short[kind]
    raise ValueError(
        f"unknown hook kind {kind!r}; use a short name ({sorted(short)}) or a full suffix such as 'ln1.hook_scale'"
    )


_COORDINATES: dict[str, Callable[..., str]] = {}


def register_coordinate(name: str, build: Callable[..., str]) -> None:
    """Let `hook_name` take a family's own coordinate `name=` (a cycle inside a pass): `build(kind,
    layer, iteration, phase, value)` returns the name."""
    _COORDINATES[name] = build


def hook_name(
    kind: str,
    layer: Optional[int] = None,
    iteration: Optional[int] = None,
    phase: Optional[str] = None,
    **coordinates: Any,
) -> str:
    """The hook name of `kind` at a layer / iteration, e.g.
    `hook_name("pattern", layer=1, iteration=3) == "iter.3.blocks.1.attn.hook_pattern"`. A family
    may add coordinates of its own (`register_coordinate`: a cycle inside the pass `iteration`,
    documented with the family)."""
    given = {k: v for k, v in coordinates.items() if v is not None}
    if given:
        unknown = sorted(set(given) - set(_COORDINATES))
        if unknown or len(given) > 1:
            raise TypeError(f"hook_name() got unexpected coordinate(s) {sorted(given)}; known: {sorted(_COORDINATES)}")
        (name, value), = given.items()
        return _COORDINATES[name](kind, layer, iteration, phase, value)
    suffix = _suffix(kind)
    scope = sites.scope_of(suffix)
    if scope == "model":
        return suffix
    if phase is None:
        phase = "loop" if iteration is not None else None
    if scope == "pass":
        if iteration is None:
            raise ValueError(f"{kind!r} is per iteration: give iteration=")
        return f"iter.{iteration}.{suffix}"
    if phase in ("prelude", "coda"):
        if layer is None or iteration is not None:
            raise ValueError(f"phase={phase!r} takes a layer and no iteration")
        return f"{phase}.{layer}.{suffix}"
    if phase == "loop":
        if layer is None or iteration is None:
            raise ValueError("a recurrent-block hook needs both layer= and iteration=")
        return f"iter.{iteration}.blocks.{layer}.{suffix}"
    raise ValueError(f"cannot place {kind!r}: give iteration= (loop) or phase='prelude'/'coda'")


def parse_hook_name(name: str) -> HookNameParts:
    """`"iter.3.blocks.1.attn.hook_pattern"` -> `("loop", 3, 1, "attn.hook_pattern")`."""
    m = _NAME_RE.match(name)
    if m is None or "hook_" not in name:
        raise ValueError(f"not a loop_lens hook name: {name!r}")
    if m["phase"]:
        return HookNameParts(m["phase"], None, int(m["pl"]), m["kind"])
    if m["it"] is not None:
        layer = int(m["bl"]) if m["bl"] is not None else None
        return HookNameParts("loop", int(m["it"]), layer, m["kind"])
    return HookNameParts("model", None, None, m["kind"])
