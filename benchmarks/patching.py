"""Patching benchmarks on the zoo models (CPU):

- batched activation patching of a whole `[T, L, pos]` resid_post grid (plus the prelude and
  coda layers) against a plain loop with one `run_with_hooks` forward per patch;
- attribution patching (three passes) against batched activation patching at the same T;
- how well attribution patching agrees with activation patching (Pearson correlation of the
  effects over every site) on k-hop prompt pairs, per zoo model and site;
- the same for `attribution_patch(steps=k)` (integrated gradients) on zoo:khop-huginn, T = 6,
  held-out pairs with a corrupted start letter, with its cost against batched activation patching.

    python benchmarks/patching.py            # T = 16, the loop timed on every 4th patch
    python benchmarks/patching.py --quick    # a smoke run
    python benchmarks/patching.py --only-ig --prompts 8   # only the steps=k agreement and cost

The loop is timed on an evenly spaced subset of the patches (`--loop-every`) and its time per
patch is multiplied by the number of patches; both sides are medians of `--repeats` runs taken in
turn. Results are merged into benchmarks/results.json under "patching" (other keys are kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from results_file import merge_results  # benchmarks/ is on sys.path when a script here runs

import loop_lens as ll
from loop_lens import patching as P
from loop_lens.zoo.task import TOKEN_ID, sample
from loop_lens.zoo.task import N as N_LETTERS

HERE = Path(__file__).resolve().parent


def khop_pairs(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(clean, corrupt, answer) triples: a held-out 2-hop question and the same prompt asking 1 hop."""
    batch = sample(n, [2], torch.Generator().manual_seed(seed), split="heldout")
    out = []
    for i in range(n):
        clean = batch.tokens[i : i + 1, :25]  # "<bos> pairs | x 2 ="
        corrupt = clean.clone()
        corrupt[0, 23] = TOKEN_ID["1"]
        out.append((clean, corrupt, int(batch.answers[i, 0])))
    return out


def letter_pairs(model, n: int, T: int, seed: int = 1) -> list:
    """(clean, corrupt, metric) triples for issue 26's setting: a held-out "x 2 =" question and the
    same prompt asking about another start letter; metric: the clean run's answer logit minus the
    corrupted run's answer (the same pairs as tests/test_patching.py's khop_letter_pairs)."""
    g = torch.Generator().manual_seed(seed)
    batch = sample(n, [2], g, split="heldout")
    out = []
    for i in range(n):
        clean = batch.tokens[i : i + 1, :25]
        corrupt = clean.clone()
        x = int(clean[0, 22]) - TOKEN_ID["a"]
        corrupt[0, 22] = TOKEN_ID["a"] + (x + 1 + int(torch.randint(0, N_LETTERS - 1, (1,), generator=g))) % N_LETTERS
        with torch.no_grad():
            a, b = (int(model(p, n_loops=T, seed=0)[0, -1].argmax()) for p in (clean, corrupt))
        out.append((clean, corrupt, lambda logits, a=a, b=b: (logits[:, -1, a] - logits[:, -1, b]).mean()))
    return out


def _label(k: int, rule: str, restart: bool, path: str = "input") -> str:
    if path == "hook":
        return f"hook_path_steps_{k}_{rule}"
    return f"steps_{k}" + ("" if k == 1 and rule == "left" else f"_{rule}") + ("" if restart else "_no_restart")


def integrated_gradients(args) -> dict:
    """Pearson correlation with activation patching and the cost ratio (activation / attribution
    seconds, same pair, medians over pairs) of attribution_patch(steps=k, rule=...) on
    zoo:khop-huginn, T = 6, held-out letter-corrupted pairs, per site, k and rule; `_no_restart`
    rows: restart=False (every gradient from the path's own rows, the plain EAP-IG path);
    `hook_path_` rows: path="hook" (each hook point on its own straight line, Gauss-Legendre)."""
    model, T = ll.load("zoo:khop-huginn"), 6
    pairs = letter_pairs(model, args.prompts, T)
    variants = [(1, "left", True, "input")]
    variants += [(k, rule, restart, "input") for rule in args.rules for k in args.steps if k > 1 or rule != "left"
                 for restart in (True, False)]
    variants += [(k, "gauss", True, "hook") for k in args.hook_steps]
    out: dict = {}
    for site in ("resid_post", "head", "state"):
        rows = {_label(*v): {"corr": [], "ratio": []} for v in variants}
        for clean, corrupt, metric in pairs:
            t0 = time.perf_counter()
            act = P.activation_patch(model, clean, corrupt, metric, site=site, n_loops=T, seed=0, batch_size=args.batch_size)
            t_act = time.perf_counter() - t0
            for k, rule, restart, path in variants:
                t0 = time.perf_counter()
                att = P.attribution_patch(model, clean, corrupt, metric, site=site, n_loops=T, seed=0, steps=k, rule=rule,
                                          restart=restart, path=path)
                t_att = time.perf_counter() - t0
                row = rows[_label(k, rule, restart, path)]
                row["corr"].append(round(correlation(act, att), 4))
                row["ratio"].append(round(t_act / t_att, 2))
        out[site] = {name: {"median": statistics.median(r["corr"]), "min": min(r["corr"]), "max": max(r["corr"]),
                            "per_pair": r["corr"], "activation_over_attribution_s_median": statistics.median(r["ratio"])}
                     for name, r in rows.items()}
        for name, r in out[site].items():
            print(f"{site:10s} {name:30s} corr median {r['median']:6.3f} (min {r['min']:6.3f})  "
                  f"activation / attribution time {r['activation_over_attribution_s_median']:5.2f}x", flush=True)
    return {"model": "zoo:khop-huginn", "n_loops": T, "pairs": args.prompts,
            "pairs_how": "held-out 2-hop 'x 2 =' vs another start letter; metric logit(clean answer) - logit(corrupt answer)",
            "sites": out}


def metric_for(model, clean, corrupt, answer, T):
    """Logit difference at the last position: the 2-hop answer minus the corrupted run's top token."""
    with torch.no_grad():
        other = int(model(corrupt, n_loops=T, seed=0)[0, -1].argmax())
    if other == answer:  # the corrupted run answers the 2-hop question anyway: compare with its runner-up
        other = int(model(corrupt, n_loops=T, seed=0)[0, -1].topk(2).indices[1])
    return lambda logits: (logits[:, -1, answer] - logits[:, -1, other]).mean()


def loop_patching(model, clean, corrupt, metric, T, every):
    """One forward per patch (every `every`-th patch of the resid_post sweep); returns (seconds, patches run)."""
    _, cache = model.run_with_cache(clean, n_loops=T, seed=0, names_filter=lambda n: n.endswith("hook_resid_post"))
    names = [f"prelude.{l}.hook_resid_post" for l in range(model.cfg.n_prelude)]
    names += [f"iter.{t}.blocks.{l}.hook_resid_post" for t in range(T) for l in range(model.cfg.n_block)]
    names += [f"coda.{l}.hook_resid_post" for l in range(model.cfg.n_coda)]
    patches = [(n, p) for n in names for p in range(clean.shape[1])][::every]
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, p in patches:
            def put(act, hook, name=name, p=p):
                act = act.clone()
                act[:, p] = cache[name][:, p]
                return act

            metric(model.run_with_hooks(corrupt, n_loops=T, seed=0, fwd_hooks=[(name, put)]))
    return time.perf_counter() - t0, len(patches)


def correlation(a: P.PatchingResult, b: P.PatchingResult) -> float:
    def effects(r):
        parts = [r.effect().flatten()] + [(x - r.corrupt_metric).flatten() for x in (r.prelude, r.coda) if x is not None]
        return torch.cat(parts)

    return float(torch.corrcoef(torch.stack([effects(a), effects(b)]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-loops", type=int, default=16)
    parser.add_argument("--loop-every", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16], help="attribution_patch steps= to compare")
    parser.add_argument("--hook-steps", type=int, nargs="+", default=[1, 2, 4], help="path='hook' steps= to compare")
    parser.add_argument("--rules", nargs="+", default=["midpoint", "left"], help="attribution_patch rule= to compare")
    parser.add_argument("--only-ig", action="store_true", help="only the integrated-gradients agreement and cost")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only_ig:
        ig = integrated_gradients(args)
        merge_results(args.out, {"patching": {"attribution_quadrature": ig}})
        return
    if args.quick:
        args.n_loops, args.loop_every, args.repeats, args.prompts = 4, 8, 1, 2
    T = args.n_loops
    huginn = ll.load("zoo:khop-huginn")
    clean, corrupt, answer = khop_pairs(1)[0]
    metric = metric_for(huginn, clean, corrupt, answer, T)
    n_patches = (huginn.cfg.n_prelude + T * huginn.cfg.n_block + huginn.cfg.n_coda) * clean.shape[1]

    def attribution_kept():
        """Attribution patching with every iteration's hook points already made (kept alive by a
        permanent no-op hook), to separate hook-point creation from the three passes."""
        for t in range(T):
            huginn.add_hook(f"iter.{t}.hook_state_pre", lambda act, hook: None, is_permanent=True)
        try:
            t0 = time.perf_counter()
            P.attribution_patch(huginn, clean, corrupt, metric, site="resid_post", n_loops=T, seed=0)
            return time.perf_counter() - t0
        finally:
            huginn.reset_hooks(including_permanent=True)

    batched, attribution, loop_per_patch, kept = [], [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        P.activation_patch(huginn, clean, corrupt, metric, site="resid_post", n_loops=T, seed=0, batch_size=args.batch_size)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        P.attribution_patch(huginn, clean, corrupt, metric, site="resid_post", n_loops=T, seed=0)
        attribution.append(time.perf_counter() - t0)
        kept.append(attribution_kept())
        seconds, n = loop_patching(huginn, clean, corrupt, metric, T, args.loop_every)
        loop_per_patch.append(seconds / n)
    t_batched, t_attr = statistics.median(batched), statistics.median(attribution)
    t_loop = statistics.median(loop_per_patch) * n_patches

    corr: dict[str, dict[str, float]] = {}
    for name in ("khop-huginn", "khop-ouro"):
        model = ll.load(f"zoo:{name}")
        Tc = 6 if name == "khop-huginn" else 4
        for site in ("resid_post", "head", "state"):
            values = []
            for c, k, a in khop_pairs(args.prompts, seed=1):
                m = metric_for(model, c, k, a, Tc)
                act = P.activation_patch(model, c, k, m, site=site, n_loops=Tc, seed=0, batch_size=args.batch_size)
                att = P.attribution_patch(model, c, k, m, site=site, n_loops=Tc, seed=0)
                values.append(correlation(act, att))
            corr.setdefault(name, {})[site] = {
                "n_loops": Tc, "median": statistics.median(values), "min": min(values), "max": max(values), "per_prompt": values,
            }

    ig = integrated_gradients(args)
    patching = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "settings": {"model": "zoo:khop-huginn", "site": "resid_post", "n_loops": T, "pos": clean.shape[1],
                     "patches": n_patches, "batch_size_rows": args.batch_size, "loop_timed_every": args.loop_every,
                     "repeats": args.repeats, "quick": args.quick, "correlation_prompts": args.prompts},
        "figures": {"batched_activation_s": t_batched, "loop_activation_s_extrapolated": t_loop,
                    "loop_s_per_patch": statistics.median(loop_per_patch), "attribution_s": t_attr,
                    "attribution_s_hook_points_premade": statistics.median(kept)},
        "ratios": {"loop_over_batched": t_loop / t_batched, "activation_over_attribution": t_batched / t_attr,
                   "activation_over_attribution_hook_points_premade": t_batched / statistics.median(kept)},
        "attribution_vs_activation_correlation": corr,
        "attribution_quadrature": ig,
    }
    merge_results(args.out, {"patching": patching})
    print(json.dumps(patching, indent=2))


if __name__ == "__main__":
    main()
