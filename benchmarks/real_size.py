"""Real sizes: loading and analysing a random checkpoint with Ouro-1.4B's shapes on one machine.

    python benchmarks/real_size.py                         # loading, then analyses at T = 4 16 64
    python benchmarks/real_size.py --loops 4 16 --seq 64   # scaled down for a small CPU
    python benchmarks/real_size.py --skip-analyses         # loading only (and the report)

1. Writes a random checkpoint in the transformers Ouro layout (24 layers, d_model 2048, 16 heads,
   d_mlp 5632, vocab 49152; bf16 safetensors in shards with an index) into a temporary directory,
   plus a Llama config beside links to the same shards.
2. Loading, each in a fresh process: `ll.load(dtype=bfloat16)`, `ll.load(dtype=float32)` and
   transformers' `LlamaForCausalLM.from_pretrained(dtype=bfloat16)` of the same shapes: wall time of
   the load alone, then of the load plus reading every weight once (a memory-mapped load defers the
   reading, so only the second is a fair race), and the process's peak resident memory against the
   size of the weights in the requested dtype (the whole process, imports included).
3. Analyses (bf16 unless --dtype, CPU unless --device cuda): a forward, `run_with_cache` with a names filter (one
   hook kind) and `stream_analyses` at each T on one prompt of `--seq` tokens: time and peak memory.
4. The report command (`loop-lens report --n-loops 16`) on a `--seq`-word prompt (the checkpoint
   carries a word-level tokenizer "w0".."w49151"): time, peak RSS against the 24 GiB budget, size.

Figures and ratios are merged into benchmarks/results.json (other keys are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import merge_results  # benchmarks/ is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent

OURO_1_4B = dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=5632, vocab_size=49152)


def write_checkpoint(directory: Path, shapes: dict, shard_bytes: int) -> int:
    """A random bf16 Ouro checkpoint (and a Llama view of it); returns the number of parameters."""
    import torch
    from safetensors.torch import save_file

    L, d, f, V = shapes["num_hidden_layers"], shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, d))]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [(p + f"self_attn.{x}_proj.weight", (d, d)) for x in "qkvo"]
        specs += [(p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)), (p + "mlp.down_proj.weight", (d, f))]
        specs += [(p + n, (d,)) for n in ("input_layernorm.weight", "input_layernorm_2.weight",
                                           "post_attention_layernorm.weight", "post_attention_layernorm_2.weight")]
    specs += [("model.norm.weight", (d,)), ("model.early_exit_gate.weight", (1, d)), ("model.early_exit_gate.bias", (1,)),
              ("lm_head.weight", (V, d))]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        n = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            t = torch.ones(shape) if name.endswith("layernorm.weight") or name.endswith("layernorm_2.weight") or name == "model.norm.weight" \
                else torch.randn(shape, generator=gen) * 0.02
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = file
            total += t.numel()
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    write_word_tokenizer(directory / "tokenizer.json", V)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}))
    common = dict(shapes, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
                  hidden_act="silu", torch_dtype="bfloat16", rope_scaling=None)
    (directory / "config.json").write_text(json.dumps(dict(common, architectures=["OuroForCausalLM"], model_type="ouro",
                                                           total_ut_steps=4, early_exit_threshold=1.0,
                                                           use_sliding_window=False, sliding_window=None), indent=2))
    llama = directory / "llama"
    llama.mkdir()
    for item in directory.iterdir():
        if item.suffix == ".safetensors" or item.name.endswith(".index.json"):
            (llama / item.name).symlink_to(item)
    (llama / "config.json").write_text(json.dumps(dict(common, architectures=["LlamaForCausalLM"], model_type="llama",
                                                       attention_bias=False, mlp_bias=False), indent=2))
    return total


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json whose words are "w0" .. "w{vocab_size-1}", so that the report
    command can take text prompts on the random checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def word_prompt(n_words: int, vocab_size: int, seed: int = 0) -> str:
    """A prompt of `n_words` random words of `write_word_tokenizer`'s vocabulary."""
    import random

    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(1, vocab_size)}" for _ in range(n_words))


RSS = r"""
def rss(field="VmRSS"):  # VmHWM: this process's peak (ru_maxrss can carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
"""

LOAD = r"""
import json, sys, time, warnings, torch
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
warnings.filterwarnings("ignore")
if which == "ours":
    import loop_lens as ll
    load = lambda: ll.load(path, dtype=dtype)
else:
    from transformers import LlamaForCausalLM
    load = lambda: LlamaForCausalLM.from_pretrained(path, dtype=dtype)
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
n = sum(p.numel() for p in model.parameters())
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"load_s": t_load, "load_and_read_s": t_touch, "peak_rss_after_load": peak_load,
                  "peak_rss": rss("VmHWM"), "rss_after_imports": base,
                  "params": n, "weights_bytes": size, "dtype": str(next(model.parameters()).dtype)}))
"""

REPORT = r"""
import json, sys, time
from loop_lens.cli import main
argv = sys.argv[1:]
t0 = time.perf_counter()
code = main(argv)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_bytes": rss("VmHWM"), "exit_code": code}))  # weights included
"""

ANALYSE = r"""
import json, sys, time, torch
import loop_lens as ll
from loop_lens.analysis.streaming import stream_analyses
path, device, seq, T, what, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
model = ll.load(path, dtype=getattr(torch, dtype), device=None if device == "cpu" else device)
tokens = torch.randint(0, model.cfg.d_vocab, (1, seq), generator=torch.Generator().manual_seed(0)).to(model.device)
def peak():
    if device != "cpu":
        return torch.cuda.max_memory_allocated()
    return rss("VmHWM")
with torch.no_grad():
    model(tokens[:, :8], n_loops=1)  # warm-up, and every weight read once
    if device != "cpu":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    else:  # restart VmHWM here, so the load's own peak does not hide the analysis's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    before = peak()
    t0 = time.perf_counter()
    if what == "forward":
        model(tokens, n_loops=T)
    elif what == "cache":
        model.run_with_cache(tokens, n_loops=T, names_filter=lambda n: n.endswith("hook_resid_post"))
    else:
        stream_analyses(model, tokens, n_loops=T, lens_positions=(-1,), seed=0)
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_bytes": peak(), "peak_before_bytes": before}))
"""


def run(snippet: str, *args: str, threads: int | None = None) -> dict:
    """A snippet in a fresh process, after `RSS` (the `rss(field)` reader); its last line of
    output as JSON."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", RSS + snippet, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark process failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n: float) -> float:
    """Bytes as GiB, 3 decimals."""
    return round(n / 2**30, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard-gb", type=float, default=1.0, help="largest shard, in GB (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="loads per loader; the fastest counts (default 2)")
    p.add_argument("--loops", type=int, nargs="+", default=[4, 16, 64], help="iteration counts for the analyses")
    p.add_argument("--seq", type=int, default=256, help="prompt length for the analyses (default 256)")
    p.add_argument("--device", default="cpu", help="device for the analyses (cpu or cuda)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype for the analyses (default bfloat16; CPUs without bf16 matrix units are far faster in float32)")
    p.add_argument("--modes", nargs="+", default=["forward", "cache", "stream"], choices=("forward", "cache", "stream"),
                   help="analyses to time (default all three)")
    p.add_argument("--skip-analyses", action="store_true")
    p.add_argument("--report-loops", type=int, default=16, help="--n-loops of the report command (default 16)")
    p.add_argument("--skip-report", action="store_true")
    p.add_argument("--skip-loading", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    args = p.parse_args()

    ratios: dict = {}
    figures: dict = {}
    machine = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
               "memory_GiB": gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "measured": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="loop_lens_real_size_") as tmp:
        directory = Path(tmp)
        t0 = time.perf_counter()
        n_params = write_checkpoint(directory, OURO_1_4B, int(args.shard_gb * 1e9))
        n_shards = len(list(directory.glob("model-*.safetensors")))
        print(f"wrote {n_params:,} parameters in {n_shards} bf16 shards in {time.perf_counter() - t0:.0f} s", flush=True)
        if not args.skip_loading:
            loads: dict[str, dict] = {}
            for key, which, path, dtype in (("transformers_llama_bf16", "hf", directory / "llama", "bfloat16"),
                                            ("ours_bf16", "ours", directory, "bfloat16"),
                                            ("ours_fp32", "ours", directory, "float32")):
                runs = [run(LOAD, which, str(path), dtype) for _ in range(args.repeats)]
                best = min(runs, key=lambda r: r["load_and_read_s"])
                loads[key] = {"load_s": round(min(r["load_s"] for r in runs), 3),
                              "load_and_read_s": round(best["load_and_read_s"], 3),
                              "peak_rss_GiB": gib(max(r["peak_rss"] for r in runs)),
                              "peak_rss_after_load_GiB": gib(max(r["peak_rss_after_load"] for r in runs)),
                              "rss_after_imports_GiB": gib(best["rss_after_imports"]),
                              "weights_GiB": gib(best["weights_bytes"]), "params": best["params"], "dtype": best["dtype"]}
                print(f"{key}: {loads[key]}", flush=True)
            ours, fp32, hf = loads["ours_bf16"], loads["ours_fp32"], loads["transformers_llama_bf16"]
            ratios["load_peak_rss_vs_weights_bf16"] = round(ours["peak_rss_GiB"] / ours["weights_GiB"], 3)
            ratios["load_peak_rss_vs_weights_fp32"] = round(fp32["peak_rss_GiB"] / fp32["weights_GiB"], 3)
            ratios["load_time_vs_transformers"] = round(ours["load_and_read_s"] / hf["load_and_read_s"], 3)
            ratios["load_only_time_vs_transformers"] = round(ours["load_s"] / hf["load_s"], 3)
            ratios["transformers_peak_rss_vs_weights_bf16"] = round(hf["peak_rss_GiB"] / hf["weights_GiB"], 3)
            figures["real_size_load"] = {"checkpoint": f"random, Ouro-1.4B shapes {OURO_1_4B}, bf16, {n_shards} shards "
                                                       f"of <= {args.shard_gb} GB with an index",
                                         **machine, **loads}
            print({k: v for k, v in ratios.items() if k.startswith(("load", "transformers"))}, flush=True)
            merge_results(args.out, {"ratios": ratios, "figures": figures})
        if not args.skip_analyses:
            per_t: dict[str, dict] = {}
            for T in args.loops:
                for what in args.modes:
                    r = run(ANALYSE, str(directory), args.device, str(args.seq), str(T), what, args.dtype)
                    per_t.setdefault(f"T{T}", {})[what] = {"seconds": round(r["seconds"], 2), "peak_GiB": gib(r["peak_bytes"]),
                                                           "growth_over_model_GiB": gib(r["peak_bytes"] - r["peak_before_bytes"])}
                    print(f"T={T} {what}: {per_t[f'T{T}'][what]}", flush=True)
                    figures[f"real_size_analyses_{args.device}_{args.dtype}_seq{args.seq}"] = {
                        "model": f"random Ouro-1.4B shapes, {args.dtype}", "prompt_tokens": args.seq, "device": args.device,
                        "peak": "process peak RSS from just before the analysis (weights included)" if args.device == "cpu"
                                else "torch.cuda.max_memory_allocated (weights included)",
                        "cache_names_filter": "hook_resid_post only", **machine, **per_t}
                    merge_results(args.out, {"ratios": ratios, "figures": figures})
        if not args.skip_report:
            html = directory.parent / f"{directory.name}-report.html"  # beside the checkpoint: loop-lens refuses outputs inside one
            prompt = word_prompt(args.seq, OURO_1_4B["vocab_size"])
            r = run(REPORT, "report", str(directory), "--prompts", prompt, "--n-loops", str(args.report_loops),
                    "--out", str(html), "--quiet")
            figures[f"real_size_report_cpu_seq{args.seq}"] = {
                "command": f"loop-lens report <checkpoint> --prompts <{args.seq} words> --n-loops {args.report_loops} --quiet",
                "model": "random Ouro-1.4B shapes, bf16 (the checkpoint's dtype)", "seconds": round(r["seconds"], 1),
                "peak_rss_GiB": gib(r["peak_bytes"]), "html_MiB": round(html.stat().st_size / 2**20, 2),
                "fits_24_GiB": r["peak_bytes"] <= 24 * 2**30, **machine}
            print(f"report: {figures[f'real_size_report_cpu_seq{args.seq}']}", flush=True)
            merge_results(args.out, {"ratios": ratios, "figures": figures})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
