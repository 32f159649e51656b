"""One run of the network: its checked inputs, the depth counter every layer goes through, and
what a caller (the forward, generation) hears after each pass.

The loop is written once (`HookedLoopedTransformer._loop`). What differs between a plain forward
and a generation step lives here, as a `Run` subclass: where each layer's keys and values come
from (`kv`), which positions still iterate (`running`), and what happens after a pass
(`after_pass`: keep states for an exit, freeze positions that stopped, test an exit criterion).

A *site* names one traversal of one layer and keys its KV cache: `("prelude", l)`,
`("iter", t, *tail)` inside pass t (`tail` is `(l,)` for block layer l; a family with more
stacks adds its own, e.g. `("low", cycle, l)`), `("coda", t_or_None, l)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import Tensor

from loop_lens.model.components import Rotary


class StopAtLayer(Exception):
    """Raised inside the forward when the unrolled depth reaches `stop_at_layer`."""

    def __init__(self, residual: Tensor):
        super().__init__()
        self.residual = residual


@dataclass
class Run:
    """One forward pass's inputs, checked once before any compute, and its depth counter."""

    tokens: Tensor
    n_loops: int
    exit: Union[str, int]
    mask: Optional[Tensor]
    rotary: Optional[Rotary]
    rope: Optional[tuple[Tensor, Tensor]]
    stop_at_layer: Optional[int]
    depth: int = 0
    allowed: Optional[Tensor] = None
    """[batch, query, key] pairs attention may use, when it is not causal-with-padding (`mask`),
    e.g. a PrefixLM block."""
    options: dict[str, Any] = field(default_factory=dict)
    """The family's own run options (checked by the model's `_run_options`)."""
    positions: Optional[Tensor] = None
    """[batch, pos] positions of the tokens (generation: each row from its first real token);
    None: 0..pos-1."""
    start: Union[None, str, Tensor] = None
    """The state entering pass 0: None (the model's rule), "zeros", "embed" or a tensor."""
    seed: Optional[int] = None
    generator: Any = None
    coda_t: Optional[int] = None
    """Which pass's coda the main readout's KV sites belong to (`("coda", coda_t, l)`)."""
    states: list[Tensor] = field(default_factory=list)
    gates: list[Tensor] = field(default_factory=list)

    @property
    def keeps_states(self) -> bool:
        """Whether the exit reads other passes than the last (their states and gates are kept)."""
        return self.exit != "last"

    def layer(self, site: tuple, block: Any, hooks: Any, x: Tensor, count: bool = True, **extra: Any) -> Tensor:
        """Run one layer at `site`, or stop here if `stop_at_layer` says so (`count=False`: a
        readout outside the unrolled stack, e.g. a lens, which neither counts nor stops). `extra`
        goes to the layer (a family's own inputs, e.g. value embeddings)."""
        if count:
            if self.depth == self.stop_at_layer:
                raise StopAtLayer(x)
            self.depth += 1
        mask = self.mask if self.allowed is None else self.allowed
        return block(x, hooks, self.rotary, self.rope, mask, self.kv(site, count), **extra)

    def kv(self, site: tuple, hooked: bool) -> Any:
        """The KV cache view of a site (None: attend over this call's positions only)."""
        return None

    def running(self, t: int) -> bool:
        """Whether pass t runs (generation: some position still iterates)."""
        return True

    def after_pass(self, model: Any, t: int, before: Any, carry: Any, gate: Optional[Tensor]) -> Any:
        """What pass t hands on (keeping its state and gate when the exit needs them)."""
        if self.keeps_states:
            self.states.append(model._state(carry))
            if gate is not None:
                self.gates.append(gate)
        return carry

    def readout_all(self) -> bool:
        """Whether an exit must read every pass's state (generation keeps every coda's keys)."""
        return False
