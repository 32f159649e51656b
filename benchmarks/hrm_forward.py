"""HRM-Text: loop_lens's forward and run_with_cache against transformers' own forward, same weights.

    python benchmarks/hrm_forward.py                      # d_model 512, 2 layers per stack, H2 x L2, batch 2 x 256
    python benchmarks/hrm_forward.py --layers 4 --l-cycles 3 --batch 4
    python benchmarks/hrm_forward.py --quick              # a smoke run (small sizes, 3 repeats)
    python benchmarks/hrm_forward.py --profile            # also print torch.profiler tables of both forwards
    python benchmarks/hrm_forward.py --threads 2          # every core (default one thread)

1. Builds a random `HrmTextForCausalLM` (transformers' own model, fp32, its default SDPA attention)
   of a realistic shape: d_model 512, 8 heads of 64, SwiGLU d_mlp 1408, `--layers` per stack (H and
   L), `--h-cycles` x `--l-cycles`, vocab 8192, transformers' default initialisation
   (initializer_range 0.02, so embedding_scale 50) plus a non-zero `z_L_init`; writes it with
   `save_pretrained` into a temporary directory and loads that with `ll.load` (a
   `HookedHrmTransformer`).
2. Checks once that the logits agree (max |difference| <= `--atol`, 1e-4) and that
   `run_with_cache` returns the same logits, so that every timing below is of the same work.
3. Times, under `torch.no_grad()` with the same `--threads` for both (default 1: on a 2-core machine
   where another process is busy, two torch threads make every parallel op wait for a descheduled
   thread and timings swing by an order of magnitude or more; one thread keeps the other core and stays steady), on one token batch
   [`--batch`, `--seq`]: transformers' forward (`hf(tokens, use_cache=False).logits`: the
   config's default `use_cache=True` also fills a DynamicCache, concatenating every attention
   call's keys and values, work our forward does not do; that default is timed too, as a figure),
   our forward (`model(tokens)`), our `run_with_cache(tokens)` (every hook point, attention patterns
   included) and `run_with_cache(tokens, names_filter=...)` (only `hook_state_post`, the H and L
   states after every cycle). One warm-up call each, then `--repeats` rounds in which the callables
   run in turn (the order rotated every round, so load from elsewhere on the machine hits them
   alike); the medians count.

Ratios (ours / transformers' forward; lower is better; the target for the forward is <= 1.10):
`hrm_forward_vs_transformers`, `hrm_run_with_cache_vs_transformers_forward`,
`hrm_run_with_cache_filtered_vs_transformers_forward`. The figures ("hrm_forward") add the medians
and minima, the forward ratio taken within each round (median, min, max), the logit difference, the
machine and its load average. They are merged into benchmarks/results.json (other keys are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from results_file import merge_results  # benchmarks/ is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
TARGET = 1.10


def random_hrm(args):
    """A random transformers HrmTextForCausalLM of the requested shape (fp32, eval mode)."""
    from transformers import HrmTextConfig, HrmTextForCausalLM

    torch.manual_seed(args.seed)
    cfg = HrmTextConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads, head_dim=args.d_model // args.heads,
                        H_cycles=args.h_cycles, L_cycles=args.l_cycles, max_position_embeddings=max(2048, args.seq),
                        tie_word_embeddings=False)
    model = HrmTextForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.z_L_init.normal_()  # transformers initialises it to zeros: make the L start state matter
    return model


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of every call: one warm-up each, then `repeats` rounds calling them in turn, the
    order rotated by one every round."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def profile_tables(fns: dict, rows: int) -> None:
    """torch.profiler: the ops by self CPU time of one call of each callable (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    for name, fn in fns.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n=== {name}: {total / 1e3:.1f} ms self CPU in ops (one call) ===")
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", dest="d_model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-mlp", dest="d_mlp", type=int, default=1408)
    p.add_argument("--layers", type=int, default=2, help="layers per stack (H and L each; default 2)")
    p.add_argument("--h-cycles", dest="h_cycles", type=int, default=2)
    p.add_argument("--l-cycles", dest="l_cycles", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9); medians count")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both (default 1: on a shared machine a busy neighbour stalls multi-threaded "
                        "ops, see the module docstring)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest |logit difference| accepted (default 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="d_model 128, seq 64, 3 repeats: a smoke run")
    p.add_argument("--profile", action="store_true", help="print torch.profiler op tables of both forwards")
    p.add_argument("--profile-rows", dest="profile_rows", type=int, default=20)
    p.add_argument("--no-write", dest="write", action="store_false", help="print only, leave results.json alone")
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.heads, args.d_mlp, args.vocab, args.seq, args.repeats = 128, 4, 352, 1024, 64, 3

    import transformers

    import loop_lens as ll

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar

    threads = args.threads
    torch.set_num_threads(threads)
    machine = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "measured": time.strftime("%Y-%m-%d")}
    busy = os.getloadavg()[0]
    if busy + threads > (os.cpu_count() or 1) + 0.5:
        warnings.warn(f"load average {busy:.2f} with {threads} torch threads on {os.cpu_count()} CPUs: other processes "
                      "compete for the cores and the timings get noisy" + (" (try --threads 1)" if threads > 1 else ""), stacklevel=1)
    hf = random_hrm(args)
    with tempfile.TemporaryDirectory(prefix="loop_lens_hrm_") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp)
        model = ll.load(tmp).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"HRM-Text d_model {args.d_model}, {args.layers} layers per stack, H {args.h_cycles} x L {args.l_cycles}, "
          f"vocab {args.vocab}: {n_params / 1e6:.1f} M parameters; tokens [{args.batch}, {args.seq}]; "
          f"{threads} threads; attention {hf.config._attn_implementation}", flush=True)

    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 1))
    only_states = lambda name: name.endswith("hook_state_post")  # noqa: E731
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits
        torch.testing.assert_close(hf(tokens).logits, want, atol=0, rtol=0)
        got = model(tokens)
        cached, cache = model.run_with_cache(tokens)
        diff = (got - want).abs().max().item()
        torch.testing.assert_close(got, want, atol=args.atol, rtol=0)
        torch.testing.assert_close(cached, got, atol=args.atol, rtol=0)
        n_all = len(cache)
        n_filtered = len(model.run_with_cache(tokens, names_filter=only_states)[1])
        del cache, cached
        print(f"logits agree: max |ours - transformers| = {diff:.2e} (atol {args.atol:g}); "
              f"run_with_cache caches {n_all} activations, the filtered one {n_filtered}", flush=True)

        fns = {
            "transformers_forward": lambda: hf(tokens, use_cache=False).logits,
            "transformers_forward_use_cache_default": lambda: hf(tokens).logits,
            "ours_forward": lambda: model(tokens),
            "ours_run_with_cache": lambda: model.run_with_cache(tokens),
            "ours_run_with_cache_filtered": lambda: model.run_with_cache(tokens, names_filter=only_states),
        }
        times = interleaved(fns, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        if args.profile:
            profile_tables({k: fns[k] for k in ("transformers_forward", "ours_forward")}, args.profile_rows)

    theirs = med["transformers_forward"]
    ratios = {
        "hrm_forward_vs_transformers": round(med["ours_forward"] / theirs, 3),
        "hrm_run_with_cache_vs_transformers_forward": round(med["ours_run_with_cache"] / theirs, 3),
        "hrm_run_with_cache_filtered_vs_transformers_forward": round(med["ours_run_with_cache_filtered"] / theirs, 3),
    }
    per_round = [o / t for o, t in zip(times["ours_forward"], times["transformers_forward"])]
    paired = {"median": round(statistics.median(per_round), 3), "min": round(min(per_round), 3), "max": round(max(per_round), 3),
              "note": "ours / transformers within each round (the two calls run next to each other)"}
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    figures = {"hrm_forward": {
        "model": f"random HrmTextForCausalLM (transformers {transformers.__version__}, attention "
                 f"{hf.config._attn_implementation}), d_model {args.d_model}, {args.heads} heads of {args.d_model // args.heads}, "
                 f"d_mlp {args.d_mlp}, {args.layers} layers per stack, H_cycles {args.h_cycles}, L_cycles {args.l_cycles}, "
                 f"vocab {args.vocab}, fp32, {round(n_params / 1e6, 1)} M parameters; loaded with ll.load from save_pretrained",
        "setup": f"tokens [{args.batch}, {args.seq}], torch.no_grad, {threads} torch threads for both, transformers with "
                 "use_cache=False (transformers_forward_use_cache_default: its default use_cache=True, which also fills a "
                 "DynamicCache; not used in the ratios), one warm-up each, "
                 f"median of {args.repeats} interleaved rounds (order rotated every round)",
        "cache_filtered": "names_filter: hook_state_post only (the H and L states after every cycle)",
        "max_abs_logit_diff": float(f"{diff:.3g}"), "cached_activations": {"all": n_all, "filtered": n_filtered},
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "paired_forward_ratio": paired,
        "min_s": {k: round(min(v), 4) for k, v in times.items()},
        "target_forward_ratio": TARGET,
        **machine,
    }}
    for name, t in med.items():
        print(f"{name:>38}: median {t * 1e3:8.1f} ms  (min {min(times[name]) * 1e3:8.1f} ms)")
    for name, r in ratios.items():
        print(f"{name:>52}: {r:.3f}")
    print(f"{'forward ratio per round':>52}: median {paired['median']:.3f} (min {paired['min']:.3f}, max {paired['max']:.3f})")
    verdict = "meets" if ratios["hrm_forward_vs_transformers"] <= TARGET else "MISSES"
    print(f"forward {verdict} the target of <= {TARGET}x; load average {machine['load_average_at_start']} -> "
          f"{machine['load_average_at_end']}")
    if args.write and not args.quick:
        merge_results(args.out, {"ratios": ratios, "figures": figures})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
