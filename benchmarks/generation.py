"""Generation: KV-cached against recompute-per-step, and adaptive compute per token.

    python benchmarks/generation.py              # a few minutes on one core
    python benchmarks/generation.py --repeats 1 --prompts 16

1. Speed: greedy generation of 64 tokens after a 128-token prompt, with the KV cache and by
   recomputing the whole sequence at every step (start state "zeros" so both runs are
   deterministic; both must generate the same tokens, checked); best of `--repeats` runs each,
   one thread, for one prompt and for a batch of four. On zoo:khop-huginn at its default 6
   iterations (d_model 64: per-call Python overhead dominates both), and on a randomly
   initialised Huginn-style model of the paper's small layout (2, 4 x 4, 2) at d_model 256,
   where the arithmetic dominates. For scale, the time of 64 plain one-token forwards (no cache,
   nothing to attend to) is recorded as the floor: roughly what 64 cached steps cost at best.
2. Adaptive compute: held-out k-hop prompts (1-3 hops) on zoo:khop-huginn, answering the first
   question and going on for 4 more tokens, with at most 12 iterations per token, under each
   criterion; mean iterations per generated token, and first-answer accuracy next to a fixed
   6-iteration run.

Figures and ratios are merged into benchmarks/results.json under "generation" (other keys kept).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from results_file import merge_results  # benchmarks/ is on sys.path when a script here runs

import loop_lens as ll
from loop_lens.model.init import init_weights
from loop_lens.zoo import task

HERE = Path(__file__).resolve().parent


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """The fastest of `repeats` runs (seconds) and the last output."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def speed(model, repeats: int, batch: int = 1) -> dict:
    """Cached vs recompute generation of 64 tokens after 128-token prompts (`batch` of them)."""
    prompt = torch.randint(2, model.cfg.d_vocab, (batch, 128), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=64, stop_at_eos=False, verbose=False, initial_state="zeros", return_type="tokens")
    cached_s, cached = best_time(lambda: model.generate(prompt, use_past_kv_cache=True, **kw), repeats)
    recompute_s, recomputed = best_time(lambda: model.generate(prompt, use_past_kv_cache=False, **kw), repeats)
    if not torch.equal(cached, recomputed):
        raise AssertionError("cached and recomputed generation differ")
    zeros = torch.zeros(batch, 1, model.cfg.d_model)
    with torch.no_grad():  # the floor: 64 plain forwards of a single token, no cache, no attention to a past
        floor_s, _ = best_time(lambda: [model(prompt[:, :1], initial_state=zeros) for _ in range(64)], repeats)
    return {"cached_s": round(cached_s, 3), "recompute_s": round(recompute_s, 3),
            "speedup": round(recompute_s / cached_s, 2), "same_tokens": True,
            "floor_64_one_token_forwards_s": round(floor_s, 3)}


def wide_model() -> ll.HookedLoopedTransformer:
    """A random Huginn-style (2, 4 x 4, 2) model at d_model 256 (no training needed for timing)."""
    cfg = ll.LoopConfig(d_model=256, n_heads=8, n_key_value_heads=8, d_mlp=1024, d_vocab=512, n_prelude=2, n_block=4,
                        n_coda=2, default_loops=4, n_ctx=256, norm_placement="sandwich_resid", rope_style="adjacent",
                        injection="linear", initial_state="trunc_normal", init_std=0.1, norm_after_loop=True)
    return init_weights(ll.HookedLoopedTransformer(cfg), seed=0).eval()


def adaptive(model, n_prompts: int) -> dict:
    """Mean iterations per generated token and first-answer accuracy per criterion."""
    batch = task.sample(n_prompts, [1, 2, 3], torch.Generator().manual_seed(1), split="heldout")
    prompts = batch.tokens[:, : task.ANSWER_FROM[0] + 1]
    kw = dict(max_new_tokens=5, stop_at_eos=False, verbose=False, seed=0, return_type="result")
    runs = {"fixed_T6": dict(n_loops=6), "fixed_T12": dict(n_loops=12)}
    runs |= {f"{c}_{t:g}": dict(adaptive=c, threshold=t, n_loops=12)
             for c, t in [("kl", 1e-3), ("kl", 1e-2), ("entropy", 1e-2), ("argmax", 2), ("argmax", 3)]}
    out = {}
    for name, extra in runs.items():
        t0 = time.perf_counter()
        r = model.generate(prompts, **kw, **extra)
        out[name] = {
            "mean_iterations_per_token": round(r.mean_iterations, 3),
            "mean_iterations_first_answer": round(r.iterations[:, 0].float().mean().item(), 3),
            "first_answer_accuracy": round((r.generated[:, 0] == batch.answers[:, 0]).float().mean().item(), 3),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        print(f"{name:>14}: {out[name]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, wide = ll.load("zoo:khop-huginn"), wide_model()
    figures = {}
    for key, m in [("speed", model), ("speed_d256", wide)]:
        for batch in (1, 4):
            name = key if batch == 1 else f"{key}_batch4"
            figures[name] = speed(m, args.repeats, batch)
            print(f"{name}: {figures[name]}", flush=True)
    figures["adaptive"] = adaptive(model, args.prompts)
    ratios = {
        "generate_cached_vs_recompute_speedup_P128_N64_khop_huginn": figures["speed"]["speedup"],
        "generate_cached_vs_recompute_speedup_P128_N64_d256": figures["speed_d256"]["speedup"],
        "generate_cached_vs_recompute_speedup_P128_N64_khop_huginn_batch4": figures["speed_batch4"]["speedup"],
        "generate_cached_vs_recompute_speedup_P128_N64_d256_batch4": figures["speed_d256_batch4"]["speedup"],
        "generate_adaptive_kl_0.01_mean_iterations_of_12": figures["adaptive"]["kl_0.01"]["mean_iterations_per_token"],
    }
    generation = {
        "model": "zoo:khop-huginn (1, 2 x 6, 1), d_model 64; speed_d256: random (2, 4 x 4, 2), d_model 256; one "
                 "thread, torch.no_grad, greedy",
        "speed_setup": "128-token random prompts (batch 1, and batch 4 in *_batch4), 64 new tokens, the model's "
                       f"default n_loops, initial_state='zeros', best of {args.repeats}",
        "adaptive_setup": f"{args.prompts} held-out k-hop prompts (1-3 hops), 5 new tokens, at most 12 iterations, seed=0",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "measured": time.strftime("%Y-%m-%d"),
        **figures,
    }
    merge_results(args.out, {"ratios": ratios, "figures": {"generation": generation}})
    print("cached generation vs recompute (target >= 4x): " + ", ".join(
        f"{k} {v['speedup']}x" for k, v in figures.items() if k.startswith("speed")) + f"; wrote {args.out}")


if __name__ == "__main__":
    main()
