"""Train the zoo's k-hop models with HookedLoopedTransformer itself (no second implementation;
a family's model, e.g. the nested HRM-style one, is its registered class, trained by the same loop).

    python -m loop_lens.zoo.train khop-huginn --out loop_lens/zoo/models/khop-huginn   # train (1 thread), evaluate, write model + card
    python -m loop_lens.zoo.train khop-ouro --steps 50 --out /tmp/x                   # a quick, smaller run
    python -m loop_lens.zoo.train khop-ff --evaluate --out loop_lens/zoo/models/khop-ff   # re-measure saved weights

It writes only where `--out` says (never into an installed package by default).

Deterministic for a given seed on one machine (CPU, fixed thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from loop_lens.adapters import load
from loop_lens.adapters.dory import dory_config
from loop_lens.config import LoopConfig
from loop_lens.errors import SaveError
from loop_lens.families import model_class
from loop_lens.files import write_text_atomic
from loop_lens.model.init import init_weights
from loop_lens.saving import check_save_target
from loop_lens.zoo import accuracy_axes
from loop_lens.zoo.task import ANSWER_FROM, MAX_HOPS, SEQ_LEN, VOCAB, answers_after, make_tokenizer, sample

_COMMON = dict(d_model=64, n_heads=4, d_mlp=128, d_vocab=len(VOCAB), n_ctx=SEQ_LEN, norm_eps=1e-6)


def dory_fields(name: str, **config) -> dict:
    """The `config.json` fields of a transformers `DoryConfig` at the zoo's widths (plus `config`);
    `dory_config` maps them to a LoopConfig as `ll.load` maps a Dory checkpoint."""
    return {"model_type": "dory", "_name_or_path": name, "hidden_size": _COMMON["d_model"],
            "num_attention_heads": _COMMON["n_heads"], "num_key_value_heads": _COMMON["n_heads"],
            "head_dim": _COMMON["d_model"] // _COMMON["n_heads"], "intermediate_size": _COMMON["d_mlp"],
            "vocab_size": len(VOCAB), "max_position_embeddings": SEQ_LEN, **config}


KHOP_DORY_FIELDS = dory_fields("khop-dory", num_hidden_layers=4, n_input_layers=1, n_recurrent_layers=2, n_output_layers=1,
                               n_recurrent_loops=3, sliding_window=64, initializer_range=0.02, ngpt_alpha_init=0.25,
                               tie_word_embeddings=False)
"""zoo:khop-dory's config as transformers' DoryConfig fields (tests/test_zoo.py runs its weights in DoryForCausalLM)."""


@dataclass
class Recipe:
    cfg: LoopConfig
    train_hops: list[int]
    loops: list[int]  # loop counts sampled per batch during training
    steps: int
    description: str
    eval_loops: list[int] = field(default_factory=list)
    lr: float = 1e-3
    batch: int = 128
    seed: int = 0
    schedule: str = "wsd"  # warmup, constant, linear decay to 0 over the last `decay` of steps; or "cosine"
    warmup: int = 0
    decay: float = 0.15


RECIPES = {
    "khop-huginn": Recipe(
        cfg=LoopConfig(**_COMMON, family="native", model_name="khop-huginn", n_prelude=1, n_block=2, n_coda=1,
                       default_loops=6, norm_placement="sandwich_resid", rope_style="adjacent", injection="linear",
                       initial_state="trunc_normal", init_std=0.02, norm_after_loop=True, tie_embeddings=True),
        train_hops=[1, 2], loops=[2, 3, 4, 5, 6], steps=2800,
        description="Huginn-style (1, 2 x T, 1), linear injection, random start state; trained with 2-6 loops per batch",
        eval_loops=[1, 2, 3, 4, 6, 8, 12],
    ),
    "khop-ouro": Recipe(
        cfg=LoopConfig(**_COMMON, family="native", model_name="khop-ouro", n_block=2, default_loops=4,
                       norm_placement="sandwich", iter_norm=True, final_norm=False, exit_gate=True),
        train_hops=[1, 2, 3], loops=[4], steps=3000,
        description="Ouro-style (0, 2 x 4, 0): sandwich norms, per-iteration norm, exit gate (Ouro's entropy-regularised objective)",
        eval_loops=[1, 2, 3, 4, 6, 8],
    ),
    "khop-ff": Recipe(
        cfg=LoopConfig(**_COMMON, family="native", model_name="khop-ff", n_block=8, default_loops=1, norm_placement="pre"),
        train_hops=[1, 2, 3], loops=[1], steps=3400,
        description="feedforward baseline: 8 pre-norm layers, the depth of khop-ouro unrolled",
        eval_loops=[1],
    ),
    # HRM-Text's nested recurrence, configured as loop_lens/adapters/hrm_text.py maps a real
    # checkpoint (parameterless RMSNorms, gated attention, SwiGLU, additive z_H + z_L, no final
    # norm, untied head, rotate-half RoPE); embed_scale = 1 / the embedding's init std (8 here, as
    # HRM-Text's 1 / initializer_range); z_L_init stays at zeros and frozen, as transformers'
    # HrmText initialises it. n_loops = H cycles (2-4 per batch, 3 by default), L cycles fixed at 2.
    "khop-hrm": Recipe(
        cfg=LoopConfig(**_COMMON, family="hrm_text", model_name="khop-hrm", n_block=1, default_loops=3, l_cycles=2,
                       norm_placement="pre", norm_weight=False, attn_gate=True, injection="additive",
                       initial_state="embed", final_norm=False, tie_embeddings=False, embed_scale=8.0,
                       rope_style="rotate_half", rope_theta=10000.0, extra={"prefix_lm": False}),
        train_hops=[1, 2], loops=[2, 3, 4], steps=3000,
        description="HRM-Text-style nested recurrence: 1-layer H and L stacks, 2 L cycles per H cycle; trained with 2-4 H cycles per batch",
        eval_loops=[1, 2, 3, 4, 6, 8],
    ),
    # Dory (NVIDIA's looped nGPT), configured as a transformers DoryConfig: (1, 2 x T, 1), every
    # layer an nGPT layer on the unit sphere (learned lambda rates, sqk, s_gate, suv, logit scale,
    # all at Dory's init); layer types as DoryConfig's default pattern (every fourth layer full
    # attention, here the coda) with a sliding window of 64 > the task's 41 tokens, so no layer's
    # view is cut; sliding and full layers keep their own RoPE thetas (1e4 and 1e7).
    "khop-dory": Recipe(
        cfg=dory_config(KHOP_DORY_FIELDS),
        train_hops=[1, 2], loops=[2, 3, 4], steps=2600, lr=2e-3,
        description="Dory-style looped nGPT (1, 2 x T, 1): unit-sphere layers, unit(h) + unit(e) at each pass; trained with 2-4 loops per batch",
        eval_loops=[1, 2, 3, 4, 6, 8],
    ),
}


def lr_factor(recipe: Recipe, step: int, steps: int) -> float:
    """The learning-rate multiplier at `step`: linear warmup, then constant ("wsd": linear decay to
    zero over the last `recipe.decay` of the steps) or cosine decay."""
    warm = min(1.0, (step + 1) / max(1, recipe.warmup))
    if recipe.schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    decay_from = steps * (1 - recipe.decay)
    return warm * min(1.0, max(0.0, (steps - step) / max(1.0, steps - decay_from)))


def _answer_logits(model, tokens: torch.Tensor, n_loops: int, seed: Optional[int] = None) -> torch.Tensor:
    """Logits at every position whose next token is an answer: [batch, QUERIES, vocab]."""
    return model(tokens, n_loops=n_loops, seed=seed)[:, ANSWER_FROM]


class Curriculum:
    """Stages of (hop counts, largest loop count), entered one at a time: the next once the running
    training accuracy on the current stage exceeds `threshold`. Stage i trains hops 1..i with at
    most i + 2 loops; once every hop count is in, a last stage opens all the recipe's loop counts.
    Deterministic given the training trajectory."""

    def __init__(self, hops: list[int], loops: list[int], threshold: float = 0.9, decay: float = 0.95):
        hops = sorted(hops)
        self.stages = [(hops[: i + 1], i + 3) for i in range(len(hops))]
        if max(loops) > self.stages[-1][1]:
            self.stages.append((hops, max(loops)))
        self.loops, self.level, self.threshold, self.decay, self.acc = sorted(loops), 1, threshold, decay, 0.0
        self.log: list[tuple[int, int]] = []  # (step, stage) when a stage was entered, counting from 1

    @property
    def current(self) -> list[int]:
        return self.stages[self.level - 1][0]

    @property
    def current_loops(self) -> list[int]:
        return [t for t in self.loops if t <= self.stages[self.level - 1][1]] or self.loops[:1]

    def update(self, step: int, accuracy: float) -> None:
        self.acc = self.decay * self.acc + (1 - self.decay) * accuracy
        if self.acc > self.threshold and self.level < len(self.stages):
            self.level += 1
            self.acc = 0.0
            self.log.append((step, self.level))


def _ouro_loss(model, tokens, answers, n_loops, beta=0.05):
    """Ouro stage-I objective: sum_t p_t CE_t - beta * H(p), over the exit distribution."""
    states, gates = [], []

    def keep_state(x, hook):
        states.append(x)

    def keep_gate(x, hook):
        gates.append(x)

    hooks = [(f"iter.{t}.hook_state_post", keep_state) for t in range(n_loops)]
    hooks += [(f"iter.{t}.hook_exit_logit", keep_gate) for t in range(n_loops)]
    model.run_with_hooks(tokens, n_loops=n_loops, fwd_hooks=hooks, return_type=None)
    p = model.exit_distribution(torch.stack(gates))[:, :, ANSWER_FROM]  # [T, batch, QUERIES]
    step_logits = [model.finish(s)[:, ANSWER_FROM] for s in states]
    ce = torch.stack([F.cross_entropy(lg.flatten(0, 1), answers.flatten(), reduction="none").view_as(answers) for lg in step_logits])
    entropy = -(p * torch.log(p.clamp_min(1e-9))).sum(0)
    return ((p * ce).sum(0) - beta * entropy).mean(), step_logits[-1]


EVAL_SEED = 1234


def _heldout(k: int, n: int, seed: int):
    """The n held-out k-hop prompts every measurement for (n, seed) uses."""
    return sample(n, [k], torch.Generator().manual_seed(seed + k), split="heldout")


def _first_answers(model, tokens: torch.Tensor, n_loops: int, seed: int) -> torch.Tensor:
    """The model's answer to the first question of each prompt."""
    return _answer_logits(model, tokens, n_loops, seed=seed)[:, 0].argmax(-1)


@torch.no_grad()
def evaluate(model, hops: list[int], loops: list[int], n: int = 256, seed: int = EVAL_SEED) -> dict[str, float]:
    """Held-out accuracy per (hops, n_loops) on the first question of n prompts: `{"k=3,T=4": 0.97}`."""
    model.eval()
    out = {}
    for k in hops:
        batch = _heldout(k, n, seed)
        for T in loops:
            pred = _first_answers(model, batch.tokens, T, seed)
            out[f"k={k},T={T}"] = round((pred == batch.answers[:, 0]).float().mean().item(), 4)
    return out


@torch.no_grad()
def landing(model, hops: list[int], n_loops: int, n: int = 256, seed: int = EVAL_SEED) -> dict[str, dict[str, float]]:
    """Where answers land on k-hop questions: the share of first answers equal to the letter j hops
    from the start, j = 1..max(hops) (same prompts as `evaluate`): `{"k=4": {"j=3": 0.93, ...}}`.
    Shows whether a model stops early (j < k) on hop counts it was not trained on."""
    model.eval()
    out = {}
    for k in hops:
        tokens = _heldout(k, n, seed).tokens
        pred = _first_answers(model, tokens, n_loops, seed)
        out[f"k={k}"] = {f"j={j}": round((pred == answers_after(tokens, j)[:, 0]).float().mean().item(), 4)
                         for j in range(1, max(hops) + 1)}
    return out


def _measure(model, recipe: Recipe, n: int, seed: int = EVAL_SEED) -> dict:
    """The card's measured entries: accuracy per (hops, n_loops) and where untrained hop counts land."""
    return {
        "trained_loops": recipe.cfg.default_loops,
        "eval_prompts": n,
        "eval_seed": seed,
        "heldout_accuracy": evaluate(model, eval_hops(recipe), recipe.eval_loops, n=n, seed=seed),
        "untrained_hops_land_on": landing(model, _untrained(recipe), recipe.cfg.default_loops, n=n, seed=seed),
    }


def _untrained(recipe: Recipe) -> list[int]:
    return [k for k in eval_hops(recipe) if k not in recipe.train_hops]


def eval_hops(recipe: Recipe) -> list[int]:
    """The hop counts a card reports: 1 to 6, and two past the trained ones."""
    return list(range(1, min(max(6, max(recipe.train_hops) + 2), MAX_HOPS) + 1))


def reevaluate(name: str, path: Path, quiet: bool = False) -> dict:
    """Measure saved weights again on the card's held-out set and rewrite the card's table."""
    recipe, target = RECIPES[name], Path(path)
    card = json.loads((target / "card.json").read_text())
    model = load(target)
    card.update(_measure(model, recipe, n=card["eval_prompts"], seed=card["eval_seed"]))
    write_text_atomic(target / "card.json", json.dumps(card, indent=2) + "\n")
    if not quiet:
        print_table(card)
    return card


def train(name: str, out: Path, steps: Optional[int] = None, quiet: bool = False, eval_n: int = 256) -> dict:
    """Train one recipe, evaluate it on held-out cycles, save the model and its card to `out`.

    `out` may hold an earlier model and card (they are replaced); anything else there is refused
    before training starts."""
    recipe, target = RECIPES[name], Path(out)
    foreign = [f for f in check_save_target(target, overwrite=True) if f != "card.json"]
    if foreign:
        raise SaveError(f"{target} holds files that are not a zoo model and its card: {foreign}")
    steps = recipe.steps if steps is None else steps
    torch.manual_seed(recipe.seed)
    model = model_class(recipe.cfg.family)(recipe.cfg, tokenizer=make_tokenizer())
    init_weights(model, seed=recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(recipe, s, steps))
    g = torch.Generator().manual_seed(recipe.seed)
    start, cpu_start = time.time(), time.process_time()
    curriculum = Curriculum(recipe.train_hops, recipe.loops)
    bar = tqdm(range(steps), desc=f"train {name}", disable=quiet, mininterval=10)
    for step in bar:
        model.train()
        batch = sample(recipe.batch, curriculum.current, g)
        loops = curriculum.current_loops
        T = loops[int(torch.randint(len(loops), (1,), generator=g))]
        if recipe.cfg.exit_gate:
            loss, logits = _ouro_loss(model, batch.tokens, batch.answers, T)
        else:
            logits = _answer_logits(model, batch.tokens, T, seed=int(torch.randint(2**31, (1,), generator=g)))
            loss = F.cross_entropy(logits.flatten(0, 1), batch.answers.flatten())
        curriculum.update(step, (logits.argmax(-1) == batch.answers).float().mean().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", T=T, hops=curriculum.level, acc=f"{curriculum.acc:.2f}")
    wall, cpu = time.time() - start, time.process_time() - cpu_start
    card = {
        "name": name,
        "layout": recipe.cfg.layout,
        "description": recipe.description,
        "task": "k-hop pointer following over a 10-cycle, 4 questions per prompt (loop_lens.zoo.task)",
        "curriculum": "stages entered once the running training accuracy passes 90%: hops 1..i with loops <= i + 2, then all loop counts",
        "curriculum_stages": curriculum.log,
        "lr": recipe.lr,
        "schedule": f"{recipe.schedule}: {recipe.warmup} warmup steps" + (f", linear decay over the last {recipe.decay:.0%}" if recipe.schedule == "wsd" else ""),
        "trained": True,
        "train_hops": recipe.train_hops,
        "train_loops": recipe.loops,
        "command": f"python -m loop_lens.zoo.train {name} --out loop_lens/zoo/models/{name} --threads {torch.get_num_threads()}"
        + ("" if steps == recipe.steps else f" --steps {steps}"),
        "seed": recipe.seed,
        "steps": steps,
        "batch": recipe.batch,
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "n_params": sum(p.numel() for p in model.parameters()),
        **_measure(model, recipe, n=eval_n),
    }
    model.save(target, overwrite=True)
    write_text_atomic(target / "card.json", json.dumps(card, indent=2) + "\n")
    if not quiet:
        print_table(card)
    return card


def print_table(card: dict) -> None:
    acc = card["heldout_accuracy"]
    hops, loops = accuracy_axes(acc)
    print(f"\n{card['name']} {card['layout']}: held-out accuracy (rows: hops k, columns: n_loops T)")
    print("k \\ T " + "".join(f"{t:>7}" for t in loops))
    for k in hops:
        print(f"{k:<6}" + "".join(f"{acc[f'k={k},T={t}']:>7.3f}" for t in loops))
    print(f"trained {card['steps']} steps in {card['wall_time_s']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a zoo model on the k-hop task.")
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--out", type=Path, required=True, help="output directory (the shipped models: loop_lens/zoo/models/NAME)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for determinism; the shipped models used 1)")
    parser.add_argument("--evaluate", action="store_true", help="only re-measure saved weights and rewrite the card's table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.evaluate:
        reevaluate(args.name, args.out)
    else:
        train(args.name, args.out, steps=args.steps)


if __name__ == "__main__":
    main()
