"""Memory of very long runs: peak resident memory of a plain forward (no hooks, no cache) at
T = 100,000 iterations against T = 4, on a zoo model, each in a fresh process.

    python benchmarks/long_run.py                  # T = 4 and 100,000 (a few minutes on one core)
    python benchmarks/long_run.py --loops 4 20000

Hook points cost nothing for an iteration unless something is hooked or cached there, so the
peak should not grow with T. Figures and the ratio are merged into benchmarks/results.json under
"long_run".
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from results_file import merge_results  # benchmarks/ is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent

SNIPPET = r"""
import json, resource, sys, time, torch
import loop_lens as ll
torch.set_num_threads(1)
T = int(sys.argv[1])
model = ll.load("zoo:khop-huginn")
tokens = model.to_tokens("b f e j i c f a j i h d a e c g d b g h | f 2 =")
PAGE = 4096
def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
with torch.no_grad():
    model(tokens, n_loops=2, seed=0)
    before = rss_now()
    t0 = time.perf_counter()
    model(tokens, n_loops=T, seed=0)
    seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss_bytes": peak, "rss_before_bytes": before, "seconds": seconds, "hook_modules": len(model.iter)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", type=int, nargs=2, default=[4, 100_000], metavar=("SHORT", "LONG"))
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    args = p.parse_args()
    figures = {}
    for T in args.loops:
        out = subprocess.run([sys.executable, "-c", SNIPPET, str(T)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        figures[f"T{T}"] = {"peak_rss_MiB": round(r["peak_rss_bytes"] / 2**20, 1),
                            "growth_over_forward_MiB": round((r["peak_rss_bytes"] - r["rss_before_bytes"]) / 2**20, 1),
                            "seconds": round(r["seconds"], 2), "iteration_hook_modules_after": r["hook_modules"]}
        print(f"T={T:>7}: {figures[f'T{T}']}", flush=True)
    short, long = (f"T{T}" for T in args.loops)
    ratio = figures[long]["peak_rss_MiB"] / figures[short]["peak_rss_MiB"]
    long_run = {
        "model": "zoo:khop-huginn, 25 tokens, one thread, torch.no_grad, no hooks",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "measured": time.strftime("%Y-%m-%d"),
        **figures,
    }
    merge_results(args.out, {"ratios": {f"peak_rss_{long}_vs_{short}_no_cache": round(ratio, 3)}, "figures": {"long_run": long_run}})
    print(f"peak RSS {long} / {short} = {ratio:.3f} (target <= 1.1); wrote {args.out}")


if __name__ == "__main__":
    main()
