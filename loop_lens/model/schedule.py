"""A run's schedule: the layers it traverses, in the order they run.

Every family's run is prelude layers, then `n_loops` passes that each traverse the same list of
layers (`Step`s: one stack for a plain loop; a family whose pass runs several stacks, or one
stack several times, lists them in order), then coda layers. The unrolled depth, the names on it (`blocks.{d}.*`),
`stop_at_layer`, `cache.depth_index` / `loop_index`, `cache.unrolled()` and the TransformerLens
view all read the schedule, so nothing outside a family's module knows how it nests.

A schedule of any length costs nothing: a pass's traversals are made when asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

_PREFIX_RE = re.compile(r"^(prelude\.\d+|coda\.\d+|iter\.\d+\.(?:[^.]+\.)*?blocks\.\d+)\.(.+)$")
_PASS_RE = re.compile(r"^iter\.(\d+)\.(.+)$")


class Step(NamedTuple):
    """One layer traversal inside every pass.

    `tail`: the KV-cache site after `("iter", t)`; `path`: its hook prefix after `iter.{t}.`;
    `stack`: the model attribute (a ModuleList) holding its weights, `layer` the index there;
    `coords`: what `loop_index` reports between the pass and the layer."""

    tail: tuple
    path: str
    stack: str
    layer: int
    kind: str = "loop"
    coords: tuple = ()


class Traversal(NamedTuple):
    """One layer of the unrolled stack: its site (KV cache key), hook prefix, weights and index
    (`loop_index`'s answer: `(kind, pass or None, *coords, layer)`)."""

    site: tuple
    prefix: str
    stack: str
    layer: int
    index: tuple


@dataclass(frozen=True)
class Schedule:
    """The traversals of a run of `n_loops` passes, and which norm reads its last state.

    `final_norm`: the model attribute of the norm between the unrolled stack's last layer and the
    unembedding (None: there is none); `final_alias`: the hook prefix whose norm hooks are that
    norm's on the unrolled depth (`ln_final.*`), when the model has no final norm of its own
    (Ouro without a coda: the last pass's `ln_state`)."""

    n_loops: int
    prelude: tuple[str, ...]  # hook prefixes, one per prelude layer (weights: prelude_blocks)
    steps: tuple[Step, ...]
    coda: tuple[str, ...]
    final_norm: Optional[str] = None
    final_alias: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)  # the family's run options (forward's own keywords)

    @property
    def depth(self) -> int:
        """The unrolled depth: every layer the run traverses."""
        return len(self.prelude) + self.n_loops * len(self.steps) + len(self.coda)

    def at(self, depth: int) -> Traversal:
        """The traversal at unrolled depth `depth` (IndexError outside the run)."""
        if not 0 <= depth < self.depth:
            raise IndexError(f"depth {depth} outside the unrolled depth {self.depth}")
        P, K = len(self.prelude), len(self.steps)
        if depth < P:
            return Traversal(("prelude", depth), self.prelude[depth], "prelude_blocks", depth, ("prelude", None, depth))
        if depth < P + self.n_loops * K:
            t, j = divmod(depth - P, K)
            step = self.steps[j]
            return Traversal(("iter", t, *step.tail), f"iter.{t}.{step.path}", step.stack, step.layer,
                             (step.kind, t, *step.coords, step.layer))
        layer = depth - P - self.n_loops * K
        return Traversal(("coda", None, layer), self.coda[layer], "coda_blocks", layer, ("coda", None, layer))

    def __iter__(self):
        return (self.at(d) for d in range(self.depth))

    def depth_of(self, prefix: str) -> int:
        """The unrolled depth of a layer's hook prefix (`iter.3.blocks.1`); KeyError if the run has none."""
        if prefix in self.prelude:
            return self.prelude.index(prefix)
        if prefix in self.coda:
            return len(self.prelude) + self.n_loops * len(self.steps) + self.coda.index(prefix)
        m = _PASS_RE.match(prefix)
        if m is not None and int(m[1]) < self.n_loops:
            for j, step in enumerate(self.steps):
                if step.path == m[2]:
                    return len(self.prelude) + int(m[1]) * len(self.steps) + j
        raise KeyError(f"no layer {prefix!r} in this run ({self.n_loops} passes)")

    def unrolled_name(self, name: str) -> str:
        """A loop-native hook name -> its name on the unrolled depth (`blocks.{d}.*`, `ln_final.*`);
        names outside any layer are kept."""
        m = _PREFIX_RE.match(name)
        if m is None:
            if self.final_alias and name.startswith(self.final_alias + "."):
                return "ln_final." + name.removeprefix(self.final_alias + ".")
            return name
        try:
            return f"blocks.{self.depth_of(m[1])}.{m[2]}"
        except KeyError:
            return name

    def loop_name(self, name: str) -> str:
        """A name on the unrolled depth (`blocks.{d}.*`, `ln_final.*`) -> the loop-native name."""
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if m is None:
            if self.final_alias and name.startswith("ln_final."):
                return f"{self.final_alias}." + name.removeprefix("ln_final.")
            return name
        try:
            return f"{self.at(int(m[1])).prefix}.{m[2]}"
        except IndexError as e:
            raise KeyError(f"{name!r}: {e}") from None
