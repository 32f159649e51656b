"""Causal experiments per iteration: activation patching, attribution patching and iteration
interventions on looped models.

Activation patching runs the corrupted input and, for one site at a time, puts back the clean
run's activation there, recording `metric(patched_logits)`. A site is a hook point at one
(iteration, layer) plus a position or a head, so a sweep is `[n_loops, n_block, pos]` patched
runs. They go through few forwards: every patched run is its own group of batch rows, and each
hook replaces only the rows of the runs that patch it, so rows never interact and each row's
logits equal those of a run with that one patch.

Attribution patching approximates the same numbers from three passes (a clean run, a corrupted
run and its backward pass): `metric(corrupt) + (a_clean - a_corrupt) . d metric / d a_corrupt`,
summed over the hidden dimension (and over the head's positions for `"head"`).

Clean and corrupted runs use the same start state: models that draw a random start state (Huginn)
draw it from `seed`, which gives every prompt of the same length the same state.

Also here: iteration interventions (`intervene`: skip, freeze_after, drop_injection; `transplant`;
`intervention_sweep`), answer flips of the lens per iteration (`answer_flips`), and halting: the
exit distribution (`exit_distribution`) and the gate logit's direct attribution (`gate_attribution`).

Modules: `sites` (which hook points each `site=` covers: the site plan both methods share),
`activation`, `attribution`, `result` (`PatchingResult`), `interventions`, `flips` (answer
flips), `halting`, and `common` (the checks and runs they share). Every public name is imported
here: `from loop_lens import patching as P; P.activation_patch(...)`.
"""

from loop_lens.patching.activation import activation_patch
from loop_lens.patching.attribution import attribution_patch
from loop_lens.patching.common import Metric
from loop_lens.patching.flips import AnswerFlips, answer_flips
from loop_lens.patching.halting import ExitDistribution, GateAttribution, exit_distribution, gate_attribution
from loop_lens.patching.interventions import (
    INTERVENTIONS,
    Intervened,
    InterventionSweep,
    intervene,
    intervention_sweep,
    transplant,
)
from loop_lens.patching.result import PatchingResult
from loop_lens.patching.sites import SITES

__all__ = [
    "SITES", "INTERVENTIONS", "Metric", "PatchingResult", "activation_patch", "attribution_patch", "Intervened",
    "intervene", "transplant", "InterventionSweep", "intervention_sweep", "AnswerFlips", "answer_flips",
    "ExitDistribution", "exit_distribution", "GateAttribution", "gate_attribution",
]
