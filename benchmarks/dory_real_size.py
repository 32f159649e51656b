"""Dory at real size: a random checkpoint with Dory1.0-4B's shapes, in bf16, on this CPU.

    python benchmarks/dory_real_size.py                          # Dory1.0-4B's shapes: (8, 20 x 2, 8)
    python benchmarks/dory_real_size.py --layers 2 4 2           # real widths, fewer layers
    python benchmarks/dory_real_size.py --skip-report --repeats 3

1. Writes a random checkpoint with transformers' `DoryConfig` defaults (Dory1.0-4B: d_model 2560,
   16 heads / 4 KV heads of 256, d_mlp 7168, vocab 131072, untied, sliding window 1024 with every
   fourth layer full attention, `n_recurrent_loops` 2), `--layers` input / recurrent / output
   layers (default 8 20 8, the real ones), in `save_pretrained`'s layout (`backbone.*`,
   `self_attn.g_proj`; `config.json` with the two-block `layer_types` DoryConfig writes) as bf16
   safetensors shards with an index, into a temporary directory under `--tmp` (default /tmp).
   Weights ~ N(0, 0.0177); every nGPT scale (`sqk`, `s_gate`, `suv_*`, `lambda_*`, `logit_scale`)
   moved off its init, so each is read. A word-level `tokenizer.json` ("w0".."w131071") lets the
   report take a text prompt.
2. Loading, each in a fresh process: `ll.load(dtype=bfloat16)` and transformers'
   `DoryForCausalLM.from_pretrained(dtype=bfloat16)`: the load, then the load plus reading every
   weight once, the process's peak RSS (`VmHWM`, imports included) against the bf16 weights.
3. Forward, in one fresh process holding both models (bf16, `torch.no_grad`, `--threads`
   torch threads, one prompt of `--seq` tokens, the checkpoint's 2 loops): the logits are
   checked against transformers' first (bf16 on both sides: the max |difference| relative to the
   largest |logit| must stay under `--rtol`; the top-1 agreement is reported, not required: random
   weights over 131072 tokens leave near-ties that bf16 rounding flips), then `--repeats` interleaved rounds (order rotated), medians.
4. `loop-lens report DIR --prompts <seq words> --n-loops 4 --quiet` in a fresh process: time, peak
   RSS, page size.

Figures go into benchmarks/results.json under `figures.dory_real_size_*` and `ratios.dory_*`
(merged; other keys are kept). With `--layers` other than 8 20 8 the figures say so and the
extrapolation to the real depth is printed and stored next to them (weights scale with the layer
count; the forward ratio is per layer work, so it is not extrapolated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from real_size import gib, run, word_prompt, write_word_tokenizer  # benchmarks/ is on sys.path here
from results_file import merge_results

HERE = Path(__file__).resolve().parent
REAL_LAYERS = (8, 20, 8)
TARGETS = {"load_peak_rss_vs_weights": 1.2, "forward_vs_transformers": 1.10}


def dory_shapes(layers: tuple[int, int, int]) -> dict:
    """DoryConfig's defaults (Dory1.0-4B) with `layers` input / recurrent / output layers."""
    from transformers import DoryConfig

    p, k, c = layers
    default = DoryConfig()
    n = p + k + c
    return dict(hidden_size=default.hidden_size, intermediate_size=default.intermediate_size,
                num_attention_heads=default.num_attention_heads, num_key_value_heads=default.num_key_value_heads,
                head_dim=default.head_dim, vocab_size=default.vocab_size, sliding_window=default.sliding_window,
                n_recurrent_loops=default.n_recurrent_loops, tie_word_embeddings=default.tie_word_embeddings,
                initializer_range=default.initializer_range, ngpt_alpha_init=default.ngpt_alpha_init,
                num_hidden_layers=n, n_input_layers=p, n_recurrent_layers=k, n_output_layers=c,
                layer_types=["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n)])


def tensor_specs(shapes: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name in save_pretrained's layout, shape, kind) of every tensor; kind: matrix, or the nGPT scale's init."""
    D, M, V = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    H, K, hd = shapes["num_attention_heads"], shapes["num_key_value_heads"], shapes["head_dim"]
    specs = [("backbone.embeddings.weight", (V, D), "matrix")]
    for i in range(shapes["num_hidden_layers"]):
        a, m = f"backbone.layers.{i}.self_attn.", f"backbone.layers.{i}.mlp."
        specs += [(a + "q_proj.weight", (H * hd, D), "matrix"), (a + "k_proj.weight", (K * hd, D), "matrix"),
                  (a + "v_proj.weight", (K * hd, D), "matrix"), (a + "o_proj.weight", (D, H * hd), "matrix"),
                  (a + "g_proj.weight", (H * hd, D), "matrix"), (a + "sqk", (H * hd,), "init"), (a + "s_gate", (H * hd,), "init"),
                  (m + "gate_proj.weight", (M, D), "matrix"), (m + "up_proj.weight", (M, D), "matrix"),
                  (m + "down_proj.weight", (D, M), "matrix"), (m + "suv_gate", (M,), "one"), (m + "suv_up", (M,), "one"),
                  (f"backbone.layers.{i}.lambda_1", (D,), "init"), (f"backbone.layers.{i}.lambda_2", (D,), "init")]
    if not shapes["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (V, D), "matrix"))
    specs.append(("lm_head.logit_scale", (V,), "init"))
    return specs


def write_checkpoint(directory: Path, shapes: dict, shard_bytes: int) -> int:
    """The random bf16 Dory checkpoint (config.json as `DoryConfig.save_pretrained` writes it,
    shards, index, word tokenizer); returns the number of parameters."""
    import torch
    from safetensors.torch import save_file
    from transformers import DoryConfig

    init = shapes["initializer_range"]
    specs = tensor_specs(shapes)
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        n = 2 * int(torch.Size(spec[1]).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape, kind in shard:
            if kind == "matrix":
                t = torch.empty(shape, dtype=torch.bfloat16)
                for row in range(0, shape[0], 8192):  # in slices: no fp32 copy of a whole matrix
                    t[row : row + 8192] = torch.randn((min(8192, shape[0] - row), *shape[1:]), generator=gen) * init
            else:  # an nGPT scale, moved off its init by up to 50% (lambdas partly negative), so each is read
                base = init if kind == "init" else 1.0
                t = (base * (1 + 0.5 * (2 * torch.rand(shape, generator=gen) - 1))).to(torch.bfloat16)
                if name.endswith(("lambda_1", "lambda_2")):
                    t[::7] = -t[::7]
            tensors[name] = t
            weight_map[name] = file
            total += t.numel()
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}))
    config = DoryConfig(**shapes, max_position_embeddings=8192, dtype="bfloat16")
    config.architectures = ["DoryForCausalLM"]
    config.save_pretrained(directory)
    write_word_tokenizer(directory / "tokenizer.json", shapes["vocab_size"])
    return total


LOAD = r"""
import json, sys, time, warnings, torch
which, path = sys.argv[1], sys.argv[2]
warnings.filterwarnings("ignore")
if which == "ours":
    import loop_lens as ll
    load = lambda: ll.load(path, dtype=torch.bfloat16)
else:
    from transformers import DoryForCausalLM
    load = lambda: DoryForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
base = rss()
t0 = time.perf_counter()
model = load()
t_load = time.perf_counter() - t0
peak_load = rss("VmHWM")
with torch.no_grad():
    for p in model.parameters():  # read every weight once, in slices (no whole-tensor temporaries)
        flat = p.detach().reshape(-1)
        for i in range(0, flat.numel(), 1 << 20):
            flat[i : i + (1 << 20)].sum(dtype=torch.float32)
t_touch = time.perf_counter() - t0
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"load_s": t_load, "load_and_read_s": t_touch, "peak_rss_after_load": peak_load, "peak_rss": rss("VmHWM"),
                  "rss_after_imports": base, "params": sum(p.numel() for p in model.parameters()), "weights_bytes": size,
                  "dtype": str(next(model.parameters()).dtype)}))
"""

FORWARD = r"""
import json, statistics, sys, time, warnings, torch
import loop_lens as ll
from transformers import DoryForCausalLM
path, seq, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
warnings.filterwarnings("ignore")
hf = DoryForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
ours = ll.load(path, dtype=torch.bfloat16).eval()
rss_both = rss()
tokens = torch.randint(1, hf.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    want = hf(tokens, use_cache=False).logits.float()
    got = ours(tokens).float()
    diff = (got - want).abs().max().item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    fns = {"transformers_forward": lambda: hf(tokens, use_cache=False).logits, "ours_forward": lambda: ours(tokens)}
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % 2:] + names[:r % 2]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
print(json.dumps({"max_abs_logit_diff": diff, "max_abs_logit": want.abs().max().item(), "top1_agreement": top1,
                  "times": times, "rss_both_models": rss_both, "peak_rss": rss("VmHWM"),
                  "attention": hf.config._attn_implementation, "n_loops": ours.cfg.default_loops}))
"""

REPORT = r"""
import json, sys, time
from loop_lens.cli import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_bytes": rss("VmHWM"), "exit_code": code}))
"""


def available_gib() -> float:
    """MemAvailable of the machine, GiB."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs=3, default=list(REAL_LAYERS), metavar=("INPUT", "RECURRENT", "OUTPUT"),
                   help="input / recurrent / output layers (default 8 20 8, Dory1.0-4B's)")
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest shard, in GB (default 2)")
    p.add_argument("--seq", type=int, default=256, help="prompt tokens for the forward and the report (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward rounds; medians count (default 5)")
    p.add_argument("--load-repeats", type=int, default=1, help="loads per loader; the fastest counts (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the forward (default 1, see hrm_forward.py)")
    p.add_argument("--rtol", type=float, default=0.05,
                   help="largest |logit difference| / largest |logit| accepted in bf16 before timing (default 0.05; at the real depth the two bf16 forwards differ by 0.028: transformers rotates in bf16, we in fp32)")
    p.add_argument("--report-loops", type=int, default=4)
    p.add_argument("--skip-loading", action="store_true")
    p.add_argument("--skip-forward", action="store_true")
    p.add_argument("--skip-report", action="store_true")
    p.add_argument("--tmp", type=Path, default=Path("/tmp"), help="where the temporary checkpoint goes (never the repository)")
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    args = p.parse_args()

    layers = tuple(args.layers)
    shapes = dory_shapes(layers)
    real = layers == REAL_LAYERS
    tag = "" if real else f"_layers_{'_'.join(map(str, layers))}"
    machine = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
               "memory_GiB": gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "measured": time.strftime("%Y-%m-%d")}
    described = (f"random, Dory1.0-4B's shapes (transformers DoryConfig defaults: d_model 2560, 16 heads / 4 KV heads of 256, "
                 f"d_mlp 7168, vocab 131072, untied, window 1024, every fourth layer full), layers {layers}"
                 + ("" if real else f" instead of {REAL_LAYERS}") + ", bf16")
    ratios: dict = {}
    figures: dict = {}

    def save() -> None:
        merge_results(args.out, {"ratios": ratios, "figures": figures})

    with tempfile.TemporaryDirectory(prefix="loop_lens_dory_real_size_", dir=args.tmp) as tmp:
        directory = Path(tmp) / "checkpoint"  # the report goes beside it (the CLI refuses to write inside a checkpoint)
        directory.mkdir()
        t0 = time.perf_counter()
        n_params = write_checkpoint(directory, shapes, int(args.shard_gb * 1e9))
        n_shards = len(list(directory.glob("model-*.safetensors")))
        print(f"wrote {n_params:,} parameters ({gib(2 * n_params)} GiB bf16) in {n_shards} shards in "
              f"{time.perf_counter() - t0:.0f} s; {available_gib():.1f} GiB available", flush=True)
        checkpoint = f"{described}; {n_params:,} parameters in {n_shards} safetensors shards with an index (save_pretrained's names)"
        if not args.skip_loading:
            loads = {}
            for key, which in (("transformers_bf16", "hf"), ("ours_bf16", "ours")):
                runs = [run(LOAD, which, str(directory)) for _ in range(args.load_repeats)]
                best = min(runs, key=lambda r: r["load_and_read_s"])
                loads[key] = {"load_s": round(min(r["load_s"] for r in runs), 3), "load_and_read_s": round(best["load_and_read_s"], 3),
                              "peak_rss_GiB": gib(max(r["peak_rss"] for r in runs)),
                              "peak_rss_after_load_GiB": gib(max(r["peak_rss_after_load"] for r in runs)),
                              "rss_after_imports_GiB": gib(best["rss_after_imports"]), "weights_GiB": gib(best["weights_bytes"]),
                              "params": best["params"], "dtype": best["dtype"]}
                print(f"{key}: {loads[key]}", flush=True)
            ours, hf = loads["ours_bf16"], loads["transformers_bf16"]
            ratios[f"dory_load_peak_rss_vs_weights_bf16{tag}"] = round(ours["peak_rss_GiB"] / ours["weights_GiB"], 3)
            ratios[f"dory_transformers_load_peak_rss_vs_weights_bf16{tag}"] = round(hf["peak_rss_GiB"] / hf["weights_GiB"], 3)
            ratios[f"dory_load_time_vs_transformers{tag}"] = round(ours["load_and_read_s"] / hf["load_and_read_s"], 3)
            figures[f"dory_real_size_load{tag}"] = {"checkpoint": checkpoint, **machine, **loads,
                                                    "target_peak_rss_vs_weights": TARGETS["load_peak_rss_vs_weights"]}
            if not real:
                full = sum(2 * math.prod(s) for _, s, _ in tensor_specs(dory_shapes(REAL_LAYERS)))
                overhead = ours["peak_rss_GiB"] - ours["weights_GiB"]
                figures[f"dory_real_size_load{tag}"]["extrapolated_to_real_depth"] = {
                    "weights_GiB": gib(full), "peak_rss_GiB": round(gib(full) + overhead, 3),
                    "peak_rss_vs_weights": round((gib(full) + overhead) / gib(full), 3),
                    "how": "the measured peak RSS minus the weights (imports and loader overhead) added to the real weights"}
            print({k: v for k, v in ratios.items() if "load" in k}, flush=True)
            save()
        if not args.skip_forward:
            r = run(FORWARD, str(directory), str(args.seq), str(args.repeats), str(args.threads))
            rel = r["max_abs_logit_diff"] / r["max_abs_logit"]
            print(f"logits: max |ours - transformers| = {r['max_abs_logit_diff']:.3g} of max |logit| {r['max_abs_logit']:.3g} "
                  f"({rel:.3g}), top-1 agreement {r['top1_agreement']:.4f}", flush=True)
            if rel > args.rtol:
                raise SystemExit(f"the logits differ from transformers' ({rel:.3g} > --rtol {args.rtol}): not timing different computations")
            med = {k: statistics.median(v) for k, v in r["times"].items()}
            per_round = [o / t for o, t in zip(r["times"]["ours_forward"], r["times"]["transformers_forward"])]
            ratios[f"dory_forward_vs_transformers_bf16{tag}"] = round(med["ours_forward"] / med["transformers_forward"], 3)
            figures[f"dory_real_size_forward{tag}"] = {
                "checkpoint": checkpoint, "setup": f"tokens [1, {args.seq}], n_loops {r['n_loops']} (the checkpoint's), bf16, "
                f"torch.no_grad, {args.threads} torch threads, transformers use_cache=False, attention {r['attention']}, one "
                f"warm-up each, median of {args.repeats} interleaved rounds",
                "max_abs_logit_diff": float(f"{r['max_abs_logit_diff']:.3g}"), "max_abs_logit": float(f"{r['max_abs_logit']:.3g}"),
                "top1_agreement": round(r["top1_agreement"], 4), "median_s": {k: round(v, 3) for k, v in med.items()},
                "paired_ratio": {"median": round(statistics.median(per_round), 3), "min": round(min(per_round), 3),
                                 "max": round(max(per_round), 3)},
                "rss_both_models_GiB": gib(r["rss_both_models"]), "peak_rss_GiB": gib(r["peak_rss"]),
                "target_forward_ratio": TARGETS["forward_vs_transformers"], **machine}
            print(f"forward: {figures[f'dory_real_size_forward{tag}']['median_s']}, ratio "
                  f"{ratios[f'dory_forward_vs_transformers_bf16{tag}']}", flush=True)
            save()
        if not args.skip_report:
            html = Path(tmp) / "report.html"
            r = run(REPORT, "report", str(directory), "--prompts", word_prompt(args.seq, shapes["vocab_size"]),
                    "--n-loops", str(args.report_loops), "--out", str(html), "--quiet")
            if r["exit_code"] not in (0, None):
                raise SystemExit(f"loop-lens report exited with {r['exit_code']}")
            figures[f"dory_real_size_report_cpu_seq{args.seq}{tag}"] = {
                "command": f"loop-lens report <checkpoint> --prompts <{args.seq} words> --n-loops {args.report_loops} --quiet",
                "checkpoint": checkpoint, "seconds": round(r["seconds"], 1), "peak_rss_GiB": gib(r["peak_bytes"]),
                "html_MiB": round(html.stat().st_size / 2**20, 2), **machine}
            print(f"report: {figures[f'dory_real_size_report_cpu_seq{args.seq}{tag}']}", flush=True)
            save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
