"""Hook names: build them (`hook_name`) and take them apart (`parse_hook_name`).

Phases: "prelude" (`prelude.{l}.*`), "loop" (`iter.{t}.*`), "coda" (`coda.{l}.*`), and
"model" for names outside any layer (`hook_embed`, `ln_final.*`, `hook_latent`).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

_ATTN = {"q", "k", "v", "z", "rot_q", "rot_k", "attn_scores", "pattern", "gate"}
_MLP = {"pre", "post", "pre_linear"}
_BLOCK = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"}
_ITER = {"state_pre", "state_post", "injected", "exit_logit"}
_MODEL = {"embed", "pos_embed", "latent"}

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
    """Short kind ('pattern', 'resid_post', 'ln1.hook_scale') -> hook suffix inside a layer."""
    if "hook_" in kind:
        return kind
    if kind in _ATTN:
        return f"attn.hook_{kind}"
    if kind in _MLP:
        return f"mlp.hook_{kind}"
    if kind in _BLOCK or kind in _ITER or kind in _MODEL:
        return f"hook_{kind}"
    raise ValueError(
        f"unknown hook kind {kind!r}; use a short name ({sorted(_ATTN | _MLP | _BLOCK | _ITER)}) "
        "or a full suffix such as 'ln1.hook_scale'"
    )


def hook_name(
    kind: str,
    layer: Optional[int] = None,
    iteration: Optional[int] = None,
    phase: Optional[str] = None,
    low_cycle: Optional[int] = None,
) -> str:
    """The hook name of `kind` at a layer / iteration, e.g.
    `hook_name("pattern", layer=1, iteration=3) == "iter.3.blocks.1.attn.hook_pattern"`; with
    `low_cycle=l` (nested HRM loops) the name inside L cycle l of H cycle `iteration`:
    `hook_name("resid_post", layer=0, iteration=1, low_cycle=2) == "iter.1.low.2.blocks.0.hook_resid_post"`."""
    if low_cycle is not None:
        return _low_hook_name(kind, layer, iteration, phase, low_cycle)
    suffix = _suffix(kind)
    bare = kind.removeprefix("hook_")
    if bare in _MODEL or kind.startswith("ln_final") or kind.startswith("ln_loop"):
        return suffix
    if phase is None:
        phase = "loop" if iteration is not None else None
    if bare in _ITER or suffix.startswith("ln_state"):
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


def _low_hook_name(kind: str, layer: Optional[int], iteration: Optional[int], phase: Optional[str], low_cycle: int) -> str:
    """`iter.{iteration}.low.{low_cycle}.[blocks.{layer}.]<suffix>` (a nested loop's L cycle)."""
    if iteration is None or phase not in (None, "loop"):
        raise ValueError("low_cycle= places a hook in an L cycle: give iteration= (the H cycle) and no phase")
    if isinstance(low_cycle, bool) or not isinstance(low_cycle, int) or low_cycle < 0:
        raise ValueError(f"low_cycle must be an integer >= 0, got {low_cycle!r}")
    suffix = _suffix(kind)
    bare = kind.removeprefix("hook_")
    if bare in ("state_pre", "state_post") or suffix.startswith("ln_state"):
        if layer is not None:
            raise ValueError(f"{kind!r} is per L cycle: give no layer=")
        return f"iter.{iteration}.low.{low_cycle}.{suffix}"
    if bare in _ITER or bare in _MODEL:
        raise ValueError(f"{kind!r} does not exist inside an L cycle")
    if layer is None:
        raise ValueError(f"{kind!r} inside an L cycle needs layer=")
    return f"iter.{iteration}.low.{low_cycle}.blocks.{layer}.{suffix}"


_NESTED_RE = re.compile(r"^iter\.(?P<h>\d+)\.(?:low\.(?P<l>\d+)\.)?(?:blocks\.(?P<k>\d+)\.)?(?P<kind>.*hook_.*)$")


class NestedHookNameParts(NamedTuple):
    h_cycle: int
    low_cycle: Optional[int]
    layer: Optional[int]
    kind: str


def parse_nested_hook_name(name: str) -> NestedHookNameParts:
    """A nested (HRM) loop's hook name -> (H cycle, L cycle or None, layer or None, kind):
    `"iter.1.low.2.blocks.0.attn.hook_gate"` -> `(1, 2, 0, "attn.hook_gate")`,
    `"iter.1.blocks.0.hook_resid_post"` -> `(1, None, 0, "hook_resid_post")`."""
    m = _NESTED_RE.match(name)
    if m is None or m["kind"].startswith(("low.", "blocks.")):  # a malformed cycle or layer index
        raise ValueError(f"not a nested-loop hook name (iter.{{h}}[.low.{{l}}][.blocks.{{k}}].<hook>): {name!r}")
    low = int(m["l"]) if m["l"] is not None else None
    layer = int(m["k"]) if m["k"] is not None else None
    return NestedHookNameParts(int(m["h"]), low, layer, m["kind"])
