"""The hook sites, declared once.

Each `Site` says where a hook point lives (`path` inside its container), at what scope it fires
(`"layer"`: inside a layer, at `prelude.{l}.*`, `iter.{t}.blocks.{l}.*`, `coda.{l}.*`; `"pass"`:
once per iteration, at `iter.{t}.*`; `"model"`: once per run), its shape, which configurations
have it, and its short name for `hook_name`. From this table come the hook containers
(`containers.py`), `NO_HOOKS`'s known attributes, `hook_name` / `parse_hook_name`'s kinds, and
`cache.stack`'s shapes. A family with sites of its own `register`s them from its module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

SCOPES = ("layer", "pass", "model")


def _always(cfg: Any) -> bool:
    return True


class Site(NamedTuple):
    """One hook point: its path inside its container, scope, shape and which models have it."""

    path: str
    scope: str
    shape: str
    when: Callable[[Any], bool] = _always
    doc: str = ""

    @property
    def short(self) -> str:
        """The short kind `hook_name` accepts (`"pattern"` for `attn.hook_pattern`); norm hooks
        (`ln1.hook_scale`, `attn.ln_sub.hook_scale`) have none and are named by their path."""
        *parents, leaf = self.path.split(".")
        if len(parents) > 1 or (parents and parents[0] not in ("attn", "mlp")) or not leaf.startswith("hook_"):
            return ""
        return leaf.removeprefix("hook_")


def _norm(prefix: str, when: Callable[[Any], bool], doc: str, scope: str = "layer") -> list[Site]:
    return [Site(f"{prefix}.hook_scale", scope, "B S 1", when, doc),
            Site(f"{prefix}.hook_normalized", scope, "B S D", when, doc + " (before its weight)")]


def _pre_norms(c: Any) -> bool:
    return c.norm_placement != "post"


def _post_norms(c: Any) -> bool:
    return c.norm_placement != "pre"


# In firing order: containers are built in this order, and hook_names lists them so.
LAYER_SITES: list[Site] = [
    Site("hook_resid_pre", "layer", "B S D", doc="the layer's input"),
    *_norm("ln1", _pre_norms, "pre-attention norm"),
    Site("attn.hook_q", "layer", "B S H hd", doc="after qk-norm / qk-bias, before RoPE"),
    Site("attn.hook_k", "layer", "B S K hd"),
    Site("attn.hook_v", "layer", "B S K hd"),
    Site("attn.hook_rot_q", "layer", "B S H hd", lambda c: c.positional_embedding_type == "rotary", "after RoPE"),
    Site("attn.hook_rot_k", "layer", "B S K hd", lambda c: c.positional_embedding_type == "rotary", "after RoPE"),
    Site("attn.hook_attn_scores", "layer", "B H S S", doc="scaled, causal mask applied"),
    Site("attn.hook_pattern", "layer", "B H S S", doc="rows are queries and sum to 1"),
    Site("attn.hook_z", "layer", "B S H hd"),
    Site("attn.hook_gate", "layer", "B S H hd", lambda c: c.attn_gate, "sigmoid output gate multiplying z"),
    *_norm("ln1_post", _post_norms, "norm on the attention output (or on the residual: sandwich_resid)"),
    Site("hook_attn_out", "layer", "B S D", doc="what attention adds"),
    Site("hook_resid_mid", "layer", "B S D"),
    *_norm("ln2", _pre_norms, "pre-MLP norm"),
    Site("mlp.hook_pre", "layer", "B S M", doc="gate input (SwiGLU) or the pre-activation"),
    Site("mlp.hook_pre_linear", "layer", "B S M", lambda c: c.mlp_type == "swiglu", "SwiGLU's up projection"),
    Site("mlp.hook_post", "layer", "B S M"),
    *_norm("ln2_post", _post_norms, "norm on the MLP output (or on the residual: sandwich_resid)"),
    Site("hook_mlp_out", "layer", "B S D", doc="what the MLP adds"),
    Site("hook_resid_post", "layer", "B S D", doc="the layer's output, whatever its norm placement"),
]

PASS_SITES: list[Site] = [
    Site("hook_state_pre", "pass", "B S D", doc="the state entering the iteration (before injection)"),
    Site("hook_injected", "pass", "B S D", lambda c: c.injection != "none", "after input injection"),
    Site("blocks", "pass", "", doc="the pass's layers: iter.{t}.blocks.{l}.<layer site>"),
    *_norm("ln_state", lambda c: c.iter_norm, "per-iteration norm (Ouro)", scope="pass"),
    Site("hook_state_post", "pass", "B S D", doc="the state leaving the iteration"),
    Site("hook_exit_logit", "pass", "B S", lambda c: c.exit_gate, "exit gate logit (Ouro)"),
]

MODEL_SITES: list[Site] = [
    Site("hook_embed", "model", "B S D", doc="after the embedding scale"),
    Site("hook_pos_embed", "model", "S D", lambda c: c.positional_embedding_type == "learned"),
    *_norm("ln_loop", lambda c: c.norm_after_loop, "post-loop norm (Huginn)", scope="model"),
    Site("hook_latent", "model", "B S D", doc="the state handed to the coda"),
    *_norm("ln_final", lambda c: True, "final norm", scope="model"),
]

_TABLES = {"layer": LAYER_SITES, "pass": PASS_SITES, "model": MODEL_SITES}
ATTRIBUTES: set[str] = set()
"""Every attribute a hooks container can have: each path component of every site, and what
families registered (kept up to date by `register`)."""


def register(new: Iterable[Site], attributes: Iterable[str] = (), before: dict[str, str] | None = None) -> None:
    """Add a family's sites, each at its scope, placed before `before[path]` (default: a layer
    site before `hook_resid_post`, a pass site before `hook_state_post`), and container
    attributes that hold sites (e.g. a list of sub-containers), so `NO_HOOKS` answers them.
    Registering the same path again does nothing."""
    for site in new:
        if site.scope not in SCOPES:
            raise ValueError(f"site {site.path!r}: scope must be one of {SCOPES}, got {site.scope!r}")
        table = _TABLES[site.scope]
        if any(s.path == site.path for s in table):
            continue
        last = (before or {}).get(site.path) or {"layer": "hook_resid_post", "pass": "hook_state_post"}.get(site.scope)
        at = next((i for i, s in enumerate(table) if s.path == last), len(table))
        table.insert(at, site)
        ATTRIBUTES.update(site.path.split("."))
    ATTRIBUTES.update(attributes)


def sites(scope: str, cfg: Any = None) -> list[Site]:
    """The sites of a scope, in firing order (only those a model with `cfg` has, if given)."""
    return [s for s in _TABLES[scope] if cfg is None or s.when(cfg)]


def scope_of(path: str) -> str:
    """The scope of a site's path (`"attn.hook_pattern"` -> "layer"); "layer" if unknown."""
    for scope, table in _TABLES.items():
        if any(s.path == path for s in table):
            return scope
    return "layer"


def short_kinds() -> dict[str, str]:
    """Short kind -> path (`"pattern"` -> `"attn.hook_pattern"`, `"state_post"` -> `"hook_state_post"`)."""
    out: dict[str, str] = {}
    for table in _TABLES.values():
        for s in table:
            if s.short:
                out.setdefault(s.short, s.path)
    return out


for _table in _TABLES.values():
    for _site in _table:
        ATTRIBUTES.update(_site.path.split("."))
