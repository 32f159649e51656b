"""Peak memory of the streaming analyses against the run's length (issue "Faithful causal tools").

    python benchmarks/streaming_memory.py                    # d 320, 3-layer block, 2 x 96 tokens, T = 8 and 256;
                                                             # zoo:khop-huginn at T = 10,000
    python benchmarks/streaming_memory.py --loops 8 64 --zoo-loops 1000

Each figure is the growth of the resident set over one `stream_analyses` call, in a fresh process
(run.py's sampler). The streaming analyses keep one iteration's tensors per layer and, since hooks
by filter reach each iteration as the loop does, one iteration's hook points: the growth should
not depend on T. Merged into benchmarks/results.json under "streaming_memory".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from results_file import merge_results  # benchmarks/ is on sys.path when a script here runs
from run import MEMORY_SNIPPET, RSS_SAMPLER

HERE = Path(__file__).resolve().parent

ZOO_SNIPPET = r"""
import json, os, sys, threading, time, torch
import loop_lens as ll
from loop_lens.analysis.streaming import stream_analyses
torch.set_num_threads(1)
T = int(sys.argv[1])
model = ll.load("zoo:khop-huginn")
tokens = model.to_tokens("b f e j i c f a j i h d a e c g d b g h | f 2 =")
with torch.no_grad():
    stream_analyses(model, tokens, n_loops=2, seed=0)
""" + RSS_SAMPLER + r"""base = rss(); sampler = threading.Thread(target=sample, daemon=True); sampler.start()
start = time.perf_counter()
with torch.no_grad():
    stream_analyses(model, tokens, n_loops=T, seed=0)
seconds = time.perf_counter() - start
running[0] = False; sampler.join()
print(json.dumps({"peak_bytes": max(peak_rss[0], rss()) - base, "seconds": seconds}))
"""


def run(code: str, *argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", type=int, nargs="+", default=[8, 256])
    p.add_argument("--zoo-loops", dest="zoo_loops", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    args = p.parse_args()
    figures = {}
    for T in args.loops:
        got = run(MEMORY_SNIPPET, "stream", str(T), "320", "3", "96", "2", "cpu")
        figures[f"stream_d320_T{T}_MiB"] = round(got["peak_bytes"] / 2**20, 2)
        print(f"stream_analyses, d 320, 3-layer block, 2 x 96 tokens, T={T:6d}: {figures[f'stream_d320_T{T}_MiB']:8.1f} MiB",
              flush=True)
    got = run(ZOO_SNIPPET, str(args.zoo_loops))
    figures[f"stream_khop_huginn_T{args.zoo_loops}_MiB"] = round(got["peak_bytes"] / 2**20, 2)
    figures[f"stream_khop_huginn_T{args.zoo_loops}_s"] = round(got["seconds"], 1)
    print(f"stream_analyses, zoo:khop-huginn, T={args.zoo_loops}: {got['peak_bytes'] / 2**20:.1f} MiB growth, "
          f"{got['seconds']:.1f} s", flush=True)
    lo, hi = min(args.loops), max(args.loops)
    ratios = {f"stream_mem_d320_T{hi}_vs_T{lo}": round(figures[f"stream_d320_T{hi}_MiB"] / max(figures[f"stream_d320_T{lo}_MiB"], 1e-9), 3)}
    print(ratios)
    merge_results(args.out, {"streaming_memory": {"figures": figures, "ratios": ratios}, "ratios": ratios})


if __name__ == "__main__":
    main()
