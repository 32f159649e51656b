"""loop_lens benchmarks: figures and ratios measured side by side in one run.

    python benchmarks/run.py                   # CPU fp32 at d_model 512, 8 heads, seq 256, batch 4
    python benchmarks/run.py --quick           # small sizes, a smoke run
    python benchmarks/run.py --device cuda --dtype bfloat16 --d-model 2048 --seq 1024

Timings are medians of `--repeats` runs with the measured callables interleaved, so load from
elsewhere on the machine hits them alike. Peak memory of the analyses is measured in a fresh
subprocess per (mode, T) from the growth of the resident set over the analysis (CPU) or torch's peak allocation
(CUDA), sampled every 2 ms. Merges into benchmarks/results.json (ours / theirs ratios: lower is better;
other benchmarks' keys are kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_file import merge_results  # benchmarks/ is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per callable, calling them in turn `repeats` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def llama(n_layers: int, args, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=int(args.d_model * 2.6875),
                      num_hidden_layers=n_layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def repeat_layers(block_model, n_loops: int, args):
    """A transformers Llama whose layers are block_model's layers written out n_loops times."""
    k = block_model.config.num_hidden_layers
    big = llama(k * n_loops, args)
    big.load_state_dict(block_model.state_dict(), strict=False)
    for i, layer in enumerate(big.model.layers):
        layer.load_state_dict(block_model.model.layers[i % k].state_dict())
    return big


def speed(args) -> tuple[dict, dict]:
    import loop_lens as ll

    dev, dtype = args.device, getattr(torch, args.dtype)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(dev)
    figures, ratios = {}, {}
    with torch.no_grad():
        # T = 1: the whole 8-layer stack as one pass
        hf8 = llama(args.layers, args).to(dev, dtype)
        ours1 = ll.loop(hf8, block=(0, args.layers), n_loops=1, device=dev, dtype=dtype)
        t = interleaved({"hf": lambda: hf8(tokens), "ours": lambda: ours1(tokens)}, args.repeats, dev)
        figures["forward_T1_s"] = {"ours": t["ours"], "hf_llama": t["hf"]}
        ratios["forward_vs_hf_llama_T1"] = t["ours"] / t["hf"]

        # T = 8 of a 4-layer block against the same weights written out 32 layers deep
        hf4 = llama(args.block, args, seed=1)
        hf_unrolled = repeat_layers(hf4, args.loops, args).to(dev, dtype)
        ours8 = ll.loop(hf4, block=(0, args.block), n_loops=args.loops, device=dev, dtype=dtype)
        one_kind = lambda n: n.endswith("hook_resid_post")  # noqa: E731
        t = interleaved({
            "hf": lambda: hf_unrolled(tokens),
            "ours": lambda: ours8(tokens),
            "cache_one": lambda: ours8.run_with_cache(tokens, names_filter=one_kind),
            "cache_all": lambda: ours8.run_with_cache(tokens),
        }, args.repeats, dev)
        figures[f"forward_T{args.loops}_s"] = {"ours": t["ours"], "hf_llama_unrolled": t["hf"]}
        figures["run_with_cache_s"] = {"one_kind": t["cache_one"], "everything": t["cache_all"], "forward": t["ours"]}
        ratios[f"forward_vs_hf_llama_T{args.loops}"] = t["ours"] / t["hf"]
        ratios["cache_one_kind_vs_forward"] = t["cache_one"] / t["ours"]
        ratios["cache_all_vs_forward"] = t["cache_all"] / t["ours"]
        hf_unrolled = None  # free the unrolled copy before the bridge run  # noqa: F841

        # run_with_cache against TransformerLens 4's TransformerBridge on the same 8-layer Llama
        bridge = make_bridge(hf8, args)
        if bridge is not None:
            t = interleaved({"bridge": lambda: bridge.run_with_cache(tokens), "ours": lambda: ours1.run_with_cache(tokens)},
                            args.repeats, dev)
            figures["run_with_cache_vs_bridge_s"] = {"ours": t["ours"], "bridge": t["bridge"]}
            ratios["cache_vs_bridge"] = t["ours"] / t["bridge"]
    return figures, ratios


def make_bridge(hf_model, args):
    """TransformerBridge.boot_transformers over the given model (offline: a local dir + tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    tmp = Path(tempfile.mkdtemp(prefix="ll-bench-"))
    hf_model.config.save_pretrained(tmp)
    vocab = {f"w{i}": i for i in range(args.vocab)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w1", eos_token="w2", pad_token="w0", unk_token="w0")
    fast.save_pretrained(tmp)
    fast = PreTrainedTokenizerFast.from_pretrained(str(tmp))
    bridge = TransformerBridge.boot_transformers(str(tmp), hf_model=hf_model, tokenizer=fast, device=args.device,
                                                 dtype=getattr(torch, args.dtype))
    bridge.eval()
    return bridge


RSS_SAMPLER = r"""
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
peak_rss, running = [0], [True]
def sample():
    while running[0]:
        peak_rss[0] = max(peak_rss[0], rss()); time.sleep(0.002)
"""
"""Resident-set sampling for a snippet run in its own process: `rss()`, and `sample()` keeping the
peak in `peak_rss[0]` every 2 ms while `running[0]` (start it in a thread)."""

MEMORY_SNIPPET = r"""
import json, os, sys, threading, time, torch
import loop_lens as ll
from loop_lens.analysis.streaming import stream_analyses
from loop_lens.analysis.fixed_points import step_sizes
from loop_lens.analysis.attention import attention_stability
from loop_lens.model.init import init_weights
mode, T, d, block, seq, batch, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
cfg = ll.LoopConfig(d_model=d, n_heads=max(1, d // 64), d_vocab=512, n_block=block, default_loops=T, n_ctx=seq, injection="linear", initial_state="zeros", norm_placement="sandwich_resid")
model = init_weights(ll.HookedLoopedTransformer(cfg), std=0.02, seed=0).to(device).eval()
tokens = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
with torch.no_grad():
    model(tokens[:, :8], n_loops=2)
""" + RSS_SAMPLER + r"""if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = rss(); sampler = threading.Thread(target=sample, daemon=True); sampler.start()
with torch.no_grad():
    if mode == "stream":
        r = stream_analyses(model, tokens, n_loops=T, lens_positions=[-1])
    else:
        _, cache = model.run_with_cache(tokens, n_loops=T, names_filter=lambda n: n.endswith(("hook_resid_post", "hook_resid_pre", "attn.hook_pattern")))
        step_sizes(cache); attention_stability(model, cache, tokens)
if device.startswith("cuda"):
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    running[0] = False; sampler.join(); peak = max(peak_rss[0], rss()) - base
print(json.dumps({"peak_bytes": peak}))
"""


def memory(args) -> tuple[dict, dict]:
    figures = {}
    for mode in ("stream", "cache"):
        for T in args.mem_loops:
            cmd = [sys.executable, "-c", MEMORY_SNIPPET, mode, str(T), str(args.mem_d_model), str(args.block),
                   str(args.mem_seq), str(args.mem_batch), args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            figures[f"{mode}_T{T}_MiB"] = round(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20, 2)
            print(f"  memory {mode:6s} T={T:4d}: {figures[f'{mode}_T{T}_MiB']:9.1f} MiB", flush=True)
    lo, hi = min(args.mem_loops), max(args.mem_loops)
    ratios = {
        f"stream_mem_T{hi}_vs_T{lo}": figures[f"stream_T{hi}_MiB"] / max(figures[f"stream_T{lo}_MiB"], 1e-9),
        f"cache_mem_T{hi}_vs_T{lo}": figures[f"cache_T{hi}_MiB"] / max(figures[f"cache_T{lo}_MiB"], 1e-9),
    }
    return figures, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--d-model", dest="d_model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--loops", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mem-loops", dest="mem_loops", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--mem-d-model", dest="mem_d_model", type=int, default=256)
    p.add_argument("--mem-seq", dest="mem_seq", type=int, default=128)
    p.add_argument("--mem-batch", dest="mem_batch", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.heads, args.seq, args.batch, args.vocab, args.repeats = 64, 4, 32, 2, 256, 2
        args.mem_loops, args.mem_d_model, args.mem_seq = [4, 16], 64, 32
    torch.manual_seed(0)
    print(f"loop_lens benchmarks on {args.device} {args.dtype}: d_model {args.d_model}, {args.heads} heads, seq {args.seq}, batch {args.batch}", flush=True)
    figures, ratios = speed(args)
    mem_fig, mem_ratios = memory(args)
    figures["analysis_peak_memory"] = mem_fig
    ratios.update(mem_ratios)
    machine = f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name()}"
    result = {"machine": machine, "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "ratios": {k: round(v, 3) for k, v in ratios.items()}, "figures": figures}
    merge_results(args.out, result)  # keeps the other benchmarks' ratios and figures
    print("\nratio (ours / theirs, lower is better)")
    for k, v in result["ratios"].items():
        print(f"  {k:32s} {v:7.3f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
