"""A tuned lens for looped models: a learned affine translator in front of the logit lens at
every (iteration, block layer), or one per block layer shared across iterations.

The tuned lens (Belrose et al. 2023) reads a hidden state h through an affine map before the
logit lens, `unembed(final_norm(h + A h + b))`, with A and b trained so that the lens's
distribution matches the model's final one (KL(final || lens), averaged over positions). A looped
model visits block layer l once per iteration, so there are two natural choices: a translator per
(iteration t, layer l) (`share_iterations=False`), or one per layer l used at every iteration
(`share_iterations=True`), which also reads iterations the fit never saw. Translators start at
zero (A = 0, b = 0): an unfitted tuned lens is the logit lens.

`TunedLens` is a `Lens`, so `logit_lens`, `lens_of_states`, `stream_analyses` and the sweep take an
instance wherever they take `lens=`. Saved as one safetensors file (translators, a sample of the
model's weights, and JSON metadata in its header), written atomically; loading refuses a model
whose config or weights differ from the one the lens was fitted on.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from loop_lens.analysis import _checks
from loop_lens.analysis._types import LoopedModel, Mask
from loop_lens.analysis.batching import Prompts, encode_prompts, prompt_list
from loop_lens.analysis.lens import Lens, LogitLens
from loop_lens.checks import single_loop
from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, LoadError, SaveError
from loop_lens.files import write_bytes_atomic
from loop_lens.model.names import hook_name, parse_hook_name

FORMAT = "loop_lens.tuned_lens"
"""The `format` entry of a saved tuned lens's safetensors metadata."""
VERSION = 1
FINGERPRINT_SIZE = 64
"""Values of each model parameter kept in a saved lens to recognise the model it was fitted on."""
FINGERPRINT_RTOL = 1e-2
"""Relative tolerance of that comparison: bf16 copies of the same weights (rounding error 2^-9)
pass, other weights do not."""
_PREFIX = "fingerprint."


class TunedLens(Lens):
    """`unembed(final_norm(h + A h + b))`, with (A, b) per (iteration, layer) or per layer.

    Build one with `TunedLens.fit(model, tokens)` or `TunedLens.load(path, model)`;
    `TunedLens(model, n_loops)` has zero translators (it equals the logit lens). It reads block
    layer outputs (`iter.{t}.blocks.{l}.hook_resid_post`) and, in models that do not norm the state
    every iteration, the state leaving an iteration (`iter.{t}.hook_state_post`, the last layer's
    output). Translators are kept in fp32; the translated state is cast back to the input's dtype.
    """

    name = "tuned"
    pointwise = True

    def __init__(
        self,
        model: LoopedModel,
        n_loops: int,
        share_iterations: bool = False,
        weight: Optional[Float[Tensor, "sites d_model d_model"]] = None,
        bias: Optional[Float[Tensor, "sites d_model"]] = None,
        fit_info: Optional[dict[str, Any]] = None,
    ):
        super().__init__(model)
        single_loop(model, "TunedLens")
        self.n_loops = _checks.loop_count(n_loops, model.cfg.default_loops)
        if not isinstance(share_iterations, bool):
            raise TypeError(f"share_iterations must be True or False, got {share_iterations!r}")
        self.share_iterations = share_iterations
        D = model.cfg.d_model
        n = self.n_sites
        device = model.device
        self.weight = _translator_tensor(weight, "weight", (n, D, D), device)
        self.bias = _translator_tensor(bias, "bias", (n, D), device)
        self.fit_info: dict[str, Any] = dict(fit_info or {})
        self._logit = LogitLens(model)

    @property
    def n_sites(self) -> int:
        """How many translators: n_block (shared) or n_loops * n_block."""
        L = self.model.cfg.n_block
        return L if self.share_iterations else self.n_loops * L

    def __repr__(self) -> str:
        kind = "shared across iterations" if self.share_iterations else f"per iteration, n_loops={self.n_loops}"
        return f"TunedLens({self.model.cfg.model_name!r}, {kind})"

    # ------------------------------------------------------------------ reading
    def site(self, iteration: int, layer: int) -> int:
        """The translator index of block layer `layer` at iteration `iteration`."""
        L = self.model.cfg.n_block
        layer = _checks.index(layer, "layer", L, "block layers")
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
        if self.share_iterations:
            return layer
        if iteration >= self.n_loops:
            raise ValueError(
                f"this tuned lens has translators per iteration for iterations 0..{self.n_loops - 1}, not iteration "
                f"{iteration}: fit it with n_loops >= {iteration + 1}, or with share_iterations=True to read any iteration")
        return iteration * L + layer

    def site_of(self, hook: Optional[str]) -> int:
        """The translator index for the activation at hook point `hook`."""
        if hook is None:
            raise ValueError("a tuned lens needs the hook name of the activation it reads (hook=), "
                             "e.g. 'iter.3.blocks.1.hook_resid_post': its translators are per site")
        parts = parse_hook_name(hook)
        if parts.phase == "loop" and parts.kind == "hook_resid_post" and parts.layer is not None:
            return self.site(parts.iteration, parts.layer)
        if parts.phase == "loop" and parts.kind == "hook_state_post" and parts.layer is None:
            if self.model.cfg.iter_norm:
                raise ValueError(
                    f"hook {hook!r}: this model norms the state after every iteration (iter_norm), so the state is not "
                    "a block layer output and the tuned lens has no translator for it; read the last layer's "
                    f"output instead ({hook_name('resid_post', layer=self.model.cfg.n_block - 1, iteration=parts.iteration)})")
            return self.site(parts.iteration, self.model.cfg.n_block - 1)  # the state is the last layer's output
        raise ValueError(f"a tuned lens reads block layer outputs (iter.{{t}}.blocks.{{l}}.hook_resid_post) and iteration "
                         f"states (iter.{{t}}.hook_state_post), not {hook!r}")

    def translator(self, iteration: int, layer: int) -> tuple[Float[Tensor, "d_model d_model"], Float[Tensor, " d_model"]]:
        """The affine map at (iteration, layer) as (M, b) with translate(h) = h @ M + b (M = I + A)."""
        i = self.site(iteration, layer)
        eye = torch.eye(self.model.cfg.d_model, device=self.weight.device)
        return eye + self.weight[i], self.bias[i].clone()

    def translate(self, x: Float[Tensor, "*lead d_model"], hook: Optional[str]) -> Float[Tensor, "*lead d_model"]:
        """`x + x A + b` with the translator of `hook`'s site, in fp32, cast back to x's dtype."""
        i = self.site_of(hook)
        if x.shape[-1] != self.model.cfg.d_model:
            raise ValueError(f"x has {x.shape[-1]} features in its last dimension, but the model's d_model is {self.model.cfg.d_model}")
        W, b = self.weight[i].to(x.device), self.bias[i].to(x.device)
        xf = x.float()
        return (xf + xf @ W + b).to(x.dtype)

    def __call__(
        self,
        x: Float[Tensor, "*lead pos d_model"],
        hook: Optional[str] = None,
        attention_mask: Optional[Mask] = None,
    ) -> Float[Tensor, "*lead pos d_vocab"]:
        """Logits of the translated `x`: the logit lens of `translate(x, hook)`; `hook` is required,
        `attention_mask` is not needed (each position is read alone)."""
        return self._logit(self.translate(x, hook), hook)

    def check_model(self, model: LoopedModel) -> None:
        """The config check of every lens, and the weights: a tuned lens fitted on one model reads
        no other (even one with the same config)."""
        super().check_model(model)
        if model is not self.model:
            problem = _fingerprint_mismatch(_fingerprint(self.model), model)
            if problem:
                raise ValueError(f"lens {self!r} was fitted on a model with other weights than this model's: {problem}")

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        model: LoopedModel,
        tokens: Union[Tensor, Prompts],
        n_loops: Optional[int] = None,
        attention_mask: Optional[Mask] = None,
        share_iterations: bool = False,
        steps: int = 400,
        lr: float = 1e-2,
        positions_per_step: int = 2048,
        batch_size: int = 32,
        seed: int = 0,
        progress: bool = False,
        **run_kwargs: Any,
    ) -> TunedLens:
        """Fit translators on `tokens` ([batch, pos] ids with an optional `attention_mask`, or a
        list of prompts: text or token-id lists) run for `n_loops` iterations.

        The target at each real position is the model's final distribution, the rest of the
        network from the last iteration's state (`model.finish`, as `logit_lens`'s
        `kl_to_final`). The loss is KL(final || lens) averaged over every (iteration, layer) and
        `positions_per_step` positions drawn at each step (generator seeded with `seed`);
        Adam with learning rate `lr`, decayed linearly to zero over `steps` steps. Activations of
        all real positions are collected first (`batch_size` prompts per forward pass; fp32
        [n_loops, n_block, positions, d_model] plus [positions, d_vocab] targets in memory), so a
        fit costs one forward pass over the prompts and then only lens evaluations. `run_kwargs`
        go to the model's runs (`seed=` for a random start state). The model's weights are
        not changed and get no gradients.
        """
        single_loop(model, "TunedLens.fit")
        cfg = model.cfg
        T = _checks.loop_count(n_loops, cfg.default_loops)
        if not isinstance(share_iterations, bool):
            raise TypeError(f"share_iterations must be True or False, got {share_iterations!r}")
        steps = _checks.positive_int(steps, "steps")
        positions_per_step = _checks.positive_int(positions_per_step, "positions_per_step")
        batch_size = _checks.positive_int(batch_size, "batch_size")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        seed = _checks.integer(seed, "seed", 0, 2**63 - 1)
        chunks = _chunks(model, tokens, attention_mask, batch_size)
        started = time.perf_counter()
        x, target = _collect(model, chunks, T, **run_kwargs)  # [T, L, N, D], [N, V]
        collected = time.perf_counter()
        lens = cls(model, T, share_iterations)
        history = _optimise(lens, x, target, steps, float(lr), positions_per_step, seed, progress)
        lens.fit_info = {
            "n_loops": T, "share_iterations": share_iterations, "steps": steps, "lr": float(lr),
            "positions_per_step": positions_per_step, "seed": seed, "n_positions": int(x.shape[2]),
            "loss_first": history[0], "loss_last": history[-1],
            "collect_seconds": round(collected - started, 3), "train_seconds": round(time.perf_counter() - collected, 3),
            "run_kwargs": {k: v for k, v in run_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))},
        }
        return lens

    # ------------------------------------------------------------------ saving
    def save(self, path: Union[str, Path]) -> Path:
        """Write the lens to one safetensors file at `path`, atomically (a crash mid-write leaves
        the previous file). It holds the translators, a sample of the model's weights, and the
        config, layout and fit settings as JSON in the header's metadata. Raises SaveError."""
        from safetensors.torch import save

        path = Path(path).expanduser()
        if path.is_dir():
            raise SaveError(f"cannot save the tuned lens to {path}: it is a folder; give a file path such as {path / 'tuned_lens.safetensors'}")
        if not path.parent.is_dir():
            raise SaveError(f"cannot save the tuned lens to {path}: folder {path.parent} does not exist")
        tensors = {"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()}
        tensors.update({_PREFIX + k: v for k, v in _fingerprint(self.model).items()})
        meta = {"version": VERSION, "config": json.loads(self.model.cfg.to_json()), "n_loops": self.n_loops,
                "share_iterations": self.share_iterations, "fit": self.fit_info}
        try:
            data = save(tensors, metadata={"format": FORMAT, "tuned_lens": json.dumps(meta, sort_keys=True)})
            return write_bytes_atomic(path, data)
        except (OSError, ValueError, TypeError) as err:
            raise SaveError(f"could not save the tuned lens to {path}: {err}; any previous file there is unchanged") from err

    @classmethod
    def load(cls, path: Union[str, Path], model: LoopedModel) -> TunedLens:
        """A lens saved by `save`, bound to `model`, which must be the model it was fitted on:
        the same config and the same weights (compared on the saved sample, with rtol
        `FINGERPRINT_RTOL`, so a bf16 copy passes). Never runs code from the file. Raises
        LoadError naming the file and what disagrees."""
        from safetensors import SafetensorError, safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise LoadError(f"no tuned lens file {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise LoadError(f"{path} is not a readable safetensors file: {err}") from err
        if metadata.get("format") != FORMAT:
            raise LoadError(f"{path} is not a loop_lens tuned lens: its safetensors metadata has format "
                            f"{str(metadata.get('format'))[:60]!r}, expected {FORMAT!r}")
        meta = _metadata(path, metadata.get("tuned_lens"))
        try:
            cfg = LoopConfig.from_dict(meta["config"])
        except (ConfigError, ValueError, TypeError, KeyError) as err:
            raise LoadError(f"{path}: the saved model config is not valid: {err}") from err
        diff = _checks.config_diff(cfg, model.cfg)
        if diff:
            raise LoadError(f"the tuned lens in {path} was fitted on a model whose config differs from this model's "
                            f"(lens vs model: {diff})")
        for name in ("weight", "bias"):
            if name not in tensors:
                raise LoadError(f"{path} has no {name!r} tensor")
        saved = {k[len(_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
        extra = sorted(set(tensors) - {"weight", "bias"} - {_PREFIX + k for k in saved})
        if extra:
            raise LoadError(f"{path} holds tensors a tuned lens does not have: {extra[:8]}")
        problem = _fingerprint_mismatch(saved, model)
        if problem:
            raise LoadError(f"the tuned lens in {path} was fitted on a model with other weights than this model's: {problem}")
        try:
            return cls(model, meta["n_loops"], meta["share_iterations"], tensors["weight"], tensors["bias"], meta["fit"])
        except (TypeError, ValueError) as err:
            raise LoadError(f"{path}: {err}") from err


# ---------------------------------------------------------------------- helpers
def _translator_tensor(value: Optional[Tensor], name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A translator tensor of `shape` in fp32 on `device`; zeros for None."""
    if value is None:
        return torch.zeros(shape, device=device)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor of shape {list(shape)}, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} has shape {list(value.shape)}, expected {list(shape)} (translators, d_model[, d_model])")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got dtype {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return value.detach().to(device=device, dtype=torch.float32).clone()


def _metadata(path: Path, text: Optional[str]) -> dict[str, Any]:
    """The JSON metadata of a saved lens, each field checked."""
    if not isinstance(text, str):
        raise LoadError(f"{path} has no 'tuned_lens' entry in its safetensors metadata")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise LoadError(f"{path}: the 'tuned_lens' metadata is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise LoadError(f"{path}: the 'tuned_lens' metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("version") != VERSION:
        raise LoadError(f"{path}: tuned lens format version {str(meta.get('version'))[:20]!r} is not supported (this loop_lens reads {VERSION})")
    checks = {"config": dict, "n_loops": int, "share_iterations": bool, "fit": dict}
    for field, kind in checks.items():
        value = meta.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise LoadError(f"{path}: metadata field {field!r} must be a {kind.__name__}, got {type(value).__name__}")
    if meta["n_loops"] < 1:
        raise LoadError(f"{path}: metadata field 'n_loops' must be >= 1, got {meta['n_loops']}")
    return meta


def _fingerprint(model: LoopedModel) -> dict[str, Tensor]:
    """Up to `FINGERPRINT_SIZE` evenly spaced values of each parameter, in fp32 on the CPU."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            k = min(flat.numel(), FINGERPRINT_SIZE)
            idx = torch.linspace(0, flat.numel() - 1, k, device=flat.device).round().long() if k else torch.zeros(0, dtype=torch.long)
            out[name] = flat[idx].float().cpu()
    return out


def _fingerprint_mismatch(saved: dict[str, Tensor], model: LoopedModel) -> str:
    """Why `model`'s weights are not the ones `saved` sampled; empty when they are."""
    ours = _fingerprint(model)
    missing, extra = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
    if missing or extra:
        return f"parameters differ by name (the model has {missing[:4]} the lens does not, the lens has {extra[:4]})"
    for name, mine in ours.items():
        theirs = saved[name].float()
        if theirs.shape != mine.shape:
            return f"parameter {name} has a sample of {mine.numel()} values, the lens {theirs.numel()}"
        atol = 1e-6 + 1e-3 * float(theirs.abs().max()) if theirs.numel() else 0.0  # for values that round to 0
        if not torch.allclose(mine, theirs, rtol=FINGERPRINT_RTOL, atol=atol):
            worst = float((mine - theirs).abs().max())
            return f"parameter {name} differs (largest difference {worst:.3g} on the sampled values)"
    return ""


def _chunks(
    model: LoopedModel, tokens: Union[Tensor, Prompts], attention_mask: Optional[Mask], batch_size: int
) -> list[tuple[Tensor, Optional[Tensor]]]:
    """(tokens, mask) per batch of prompts, on the model's device, every argument checked."""
    cfg, device = model.cfg, model.device
    if isinstance(tokens, Tensor) and tokens.ndim in (1, 2):
        tokens = tokens if tokens.ndim == 2 else tokens[None]
        B, S = tokens.shape
        _checks.not_empty(B, S, "tokens")
        tokens = _checks.token_ids(tokens, "tokens", B, S, cfg.d_vocab, device, holder="tokens")
        mask = _checks.mask_for(attention_mask, B, S, device, "attention_mask", holder="tokens")
        return [(tokens[i : i + batch_size], None if mask is None else mask[i : i + batch_size]) for i in range(0, B, batch_size)]
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a token tensor; a list of prompts is padded (and masked) here")
    items = prompt_list(tokens)
    out = []
    for start in range(0, len(items), batch_size):
        ids, mask = encode_prompts(model, items[start : start + batch_size], first=start)
        ids = _checks.token_ids(ids, "prompts", *ids.shape, cfg.d_vocab, device, holder="prompts")
        out.append((ids, mask))
    return out


def _collect(model: LoopedModel, chunks: list, T: int, **run_kwargs: Any) -> tuple[Tensor, Tensor]:
    """Block outputs at every real position [T, L, N, D] (fp32) and the final log-probabilities [N, V]."""
    last = hook_name("state_post", iteration=T - 1)
    wanted = lambda name: name == last or (name.startswith("iter.") and name.endswith(".hook_resid_post"))  # noqa: E731
    xs, targets = [], []
    with torch.no_grad():
        for tokens, mask in chunks:
            _, cache = model.run_with_cache(tokens, n_loops=T, attention_mask=mask, names_filter=wanted,
                                            return_type=None, **run_kwargs)
            real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
            x = cache.stack("hook_resid_post")  # [T, L, b, S, D]
            xs.append(x[:, :, real].float())
            final = model.finish(cache[last], mask)
            targets.append(F.log_softmax(final.float(), -1)[real])
            del cache, x, final
    return torch.cat(xs, dim=2), torch.cat(targets)


@contextlib.contextmanager
def _frozen(model: LoopedModel) -> Iterator[None]:
    """The model's parameters without gradients for the duration (the lens's alone are trained)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def kl_to_target(lens: TunedLens, x: Tensor, target: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """KL(target || lens) per (iteration, layer, position) of activations x [T, L, N, D] against
    target log-probabilities [N, V], for translators (weight, bias) indexed by `lens.site`."""
    T, L = x.shape[:2]
    sites = torch.tensor([[lens.site(t, layer) for layer in range(L)] for t in range(T)], device=x.device)
    y = x + torch.einsum("tlnd,tlde->tlne", x, weight[sites]) + bias[sites][:, :, None]
    logp = F.log_softmax(lens._logit(y.to(getattr(lens.model, "dtype", y.dtype))).float(), -1)
    return (target.exp() * (target - logp)).sum(-1)  # [T, L, N]


def _optimise(
    lens: TunedLens, x: Tensor, target: Tensor, steps: int, lr: float, per_step: int, seed: int, progress: bool
) -> list[float]:
    """Adam on the mean KL over sites and a random draw of positions per step; returns the losses."""
    from tqdm.auto import tqdm

    N = x.shape[2]
    weight = torch.zeros_like(lens.weight, requires_grad=True)
    bias = torch.zeros_like(lens.bias, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    history = []
    with _frozen(lens.model), torch.enable_grad():
        for _ in tqdm(range(steps), desc="tuned lens", disable=not progress):
            idx = torch.randperm(N, generator=generator)[:per_step].to(x.device) if per_step < N else slice(None)
            loss = kl_to_target(lens, x[:, :, idx], target[idx], weight, bias).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            history.append(float(loss.detach()))
    lens.weight = weight.detach()
    lens.bias = bias.detach()
    return history
