"""Does one tuned-lens translator per block layer, shared across iterations, predict as well as one
per (iteration, layer)? On the zoo's k-hop models, KL(final || lens) per (iteration, layer) on
held-out prompts for: the tuned lens with shared translators, the tuned lens per iteration, the
logit lens and the coda lens (models with a coda).

    python benchmarks/tuned_lens.py            # both zoo models, about a minute of CPU each

Both lenses are fitted on prompts of the task's training split (the trained hop counts), with the
model's own start-state seed, and read prompts of the held-out split (cycles never trained on).
KL is averaged over every real position ("all") and over the positions whose next token is an
answer ("answers", where the k-hop computation happens). The shared lens is also read at twice
the fitted iteration count, which a per-iteration lens cannot do. Figures are merged into
benchmarks/results.json under "tuned_lens" (other keys are kept; the file is replaced atomically).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from results_file import merge_results  # benchmarks/ is on sys.path when a script here runs

import loop_lens as ll
from loop_lens.analysis import TunedLens, logit_lens
from loop_lens.zoo import task

HERE = Path(__file__).resolve().parent
MODELS = {  # name: (n_loops, trained hops, run kwargs of the model's runs)
    "zoo:khop-huginn": (6, [1, 2], {"seed": 0}),
    "zoo:khop-ouro": (4, [1, 2, 3], {}),
}


def kl_tables(model, tokens, T, run_kwargs, lenses) -> dict[str, dict[str, list[list[float]]]]:
    """Mean KL(final || lens) per (iteration, layer) over all positions and the answer positions."""
    _, cache = model.run_with_cache(tokens, n_loops=T, **run_kwargs)
    out = {"all": {}, "answers": {}}
    for name, lens in lenses.items():
        kl = logit_lens(model, cache, lens=lens).kl_to_final  # [T, L, B, S]
        out["all"][name] = kl.mean((2, 3)).tolist()
        out["answers"][name] = kl[:, :, :, task.ANSWER_FROM].mean((2, 3)).tolist()
    return out


def print_table(title: str, table: dict[str, list[list[float]]]) -> None:
    names = list(table)
    print(f"\n{title}\n" + "t  l  " + "".join(f"{n:>20}" for n in names))
    T, L = len(table[names[0]]), len(table[names[0]][0])
    for t in range(T):
        for layer in range(L):
            print(f"{t:<2} {layer:<2} " + "".join(f"{table[n][t][layer]:20.4f}" for n in names))
    print("mean  " + "".join(f"{_mean(table[n]):20.4f}" for n in names))


def _mean(grid: list[list[float]]) -> float:
    values = [v for row in grid for v in row]
    return sum(values) / len(values)


def run_model(name: str, n_train: int, n_heldout: int, steps: int) -> dict:
    T, hops, run_kwargs = MODELS[name]
    model = ll.load(name)
    g = torch.Generator().manual_seed(0)
    train = task.sample(n_train, hops, g, "train").tokens
    held = task.sample(n_heldout, hops, g, "heldout").tokens
    held_kwargs = {"seed": 1} if run_kwargs else {}  # other start states than the fit's
    fitted, seconds = {}, {}
    for label, share in (("tuned_shared", True), ("tuned_per_iteration", False)):
        start = time.perf_counter()
        fitted[label] = TunedLens.fit(model, train, n_loops=T, share_iterations=share, steps=steps, **run_kwargs)
        seconds[label] = round(time.perf_counter() - start, 2)
    lenses = {**fitted, "logit": "logit"}
    if model.cfg.n_coda:
        lenses["coda"] = "coda"
    tables = kl_tables(model, held, T, held_kwargs, lenses)
    longer = {"tuned_shared": fitted["tuned_shared"], "logit": "logit"}
    if model.cfg.n_coda:
        longer["coda"] = "coda"
    beyond = kl_tables(model, held, 2 * T, held_kwargs, longer)
    for kind in ("all", "answers"):
        print_table(f"{name}, T = {T}: KL(final || lens), held-out, {kind} positions", tables[kind])
    print_table(f"{name}, read at T = {2 * T} (fitted at T = {T}): answers", beyond["answers"])
    return {
        "n_loops": T, "hops": hops, "train_prompts": n_train, "heldout_prompts": n_heldout, "steps": steps,
        "train_positions": fitted["tuned_shared"].fit_info["n_positions"], "fit_seconds": seconds,
        "kl_all": tables["all"], "kl_answers": tables["answers"],
        "mean_all": {k: round(_mean(v), 4) for k, v in tables["all"].items()},
        "mean_answers": {k: round(_mean(v), 4) for k, v in tables["answers"].items()},
        "at_twice_the_loops": {"n_loops": 2 * T, "mean_all": {k: round(_mean(v), 4) for k, v in beyond["all"].items()},
                               "mean_answers": {k: round(_mean(v), 4) for k, v in beyond["answers"].items()}},
        "coda": "n/a: the model has no coda" if not model.cfg.n_coda else "the rest of the network from each layer output",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--train", type=int, default=256, help="training prompts (40 tokens each)")
    parser.add_argument("--heldout", type=int, default=128, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entry = {
        "command": "python benchmarks/tuned_lens.py" + (f" --models {' '.join(args.models)}" if args.models != list(MODELS) else ""),
        "machine": f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
        "metric": "mean KL(final || lens) in nats over held-out prompts, per (iteration, layer); 'answers' = positions before an answer",
        "models": {name: run_model(name, args.train, args.heldout, args.steps) for name in args.models},
    }
    merge_results(args.out, {"tuned_lens": entry})  # key by key: a run on one model keeps the other's figures
    print(json.dumps({k: {"mean_all": v["mean_all"], "mean_answers": v["mean_answers"]} for k, v in entry["models"].items()}, indent=2))


if __name__ == "__main__":
    main()
