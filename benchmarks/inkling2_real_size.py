"""Inkling 2 Mini at real width on one CPU: NVFP4 experts kept packed (`ll.load(path, packed_experts=True)`).

    python benchmarks/inkling2_real_size.py                 # layer stacks (1, 1, 1) and (2, 1, 2)
    python benchmarks/inkling2_real_size.py --experts 64    # if the real expert count does not fit

1. For each `--stacks` entry (prelude, loop, coda layers) writes a random checkpoint with the real
   per-layer shapes of transformers' `Inkling2LoopTextConfig` defaults (d_model 2304, 24 heads / 8
   KV heads of 128, 128 experts of width 1152, top-8, vocab 201024, untied) in the release's layout
   (`model.llm.*`, names and shapes from transformers' own `revert_weight_conversion` of a meta
   model), under `--tmp` (default /tmp). Every expert tensor is NVFP4 as the release stores it
   (`w13_weight` / `w2_weight` two E2M1 codes per byte, a float8 `_scale` per 16 values, a
   per-expert `_amax` and a scalar `_outer_scale_denominator`); every other tensor is bf16. Fewer
   layers than the release's 6 + 12 + 6 means one attention-residual block per layer
   (`n_layers_per_attn_res_block` 1 instead of 6): a few d_model vectors more per layer, no change
   in the layers' own shapes.
2. In a fresh process: `ll.load(path, packed_experts=True, dtype=bfloat16)`: wall time and the
   process's peak RSS (VmHWM, imports included) against the checkpoint's bytes on disk.
3. In another fresh process: the load, then a forward of `--seq` (64) random tokens at the
   checkpoint's default pass count (3), bf16, `torch.no_grad`: time and peak RSS.
4. Extrapolation to the release's 6 + 12 + 6 layers at 3 passes: per layer = the difference between
   the two stacks (2 layers more, 2 layer visits more), then the small stack plus that per layer
   times the missing layers (load RSS, file bytes) or layer visits (forward time; the forward's RSS
   grows with the weights). The bf16 GPU footprint is arithmetic: the release's parameter count
   (a meta model of the default config, counted exactly) times 2 bytes, no activations.

Figures go into benchmarks/results.json under "inkling2_real_size" (merged; other keys are kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from real_size import gib, run  # benchmarks/ is on sys.path when a script here runs
from results_file import merge_results

HERE = Path(__file__).resolve().parent
RELEASE_LAYERS = (6, 12, 6)

LOAD = r"""
import json, sys, time, warnings, torch
import loop_lens as ll
torch.set_num_threads(int(sys.argv[3]))
path, what, seq = sys.argv[1], sys.argv[2], int(sys.argv[4])
warnings.filterwarnings("ignore")
base = rss()
t0 = time.perf_counter()
model = ll.load(path, packed_experts=True, dtype=torch.bfloat16)
t_load = time.perf_counter() - t0
out = {"load_s": t_load, "peak_rss_after_load": rss("VmHWM"), "rss_after_imports": base,
       "packed_modules": sum(type(m).__name__ == "PackedExperts" for m in model.modules())}
if what == "forward":
    tokens = torch.randint(0, model.cfg.d_vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(tokens)
        out["forward_s"] = time.perf_counter() - t0
    out["finite"] = bool(torch.isfinite(logits).all())
    out["logits_shape"] = list(logits.shape)
out["peak_rss"] = rss("VmHWM")
print(json.dumps(out))
"""


def config(layers: tuple[int, int, int], experts: int | None):
    """transformers' Inkling2LoopTextConfig defaults (Inkling 2 Mini) with `layers` prelude / loop / coda layers."""
    from transformers import Inkling2LoopTextConfig

    default = Inkling2LoopTextConfig()
    p, k, c = layers
    if layers == RELEASE_LAYERS:
        kw = {}
    else:  # one attention-residual block per layer, so any stack divides into blocks
        types = default.layer_types
        picked = types[:p] + types[6:6 + k] + types[18:18 + c]  # the release's own types at those places
        kw = dict(num_hidden_layers=p + k + c, loop_layer_index_start=p, loop_layer_index_end=p + k,
                  n_layers_per_attn_res_block=1, layer_types=picked)
    if experts:
        kw["n_routed_experts"] = experts
    return Inkling2LoopTextConfig(**kw)


def release_tensors(cfg) -> dict:
    """{name in the release layout: meta tensor}: transformers' own save-time renaming of a meta model."""
    import torch
    from transformers import Inkling2LoopForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = Inkling2LoopForCausalLM(cfg)
    return revert_weight_conversion(model, dict(model.state_dict()))


def nvfp4_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of an NVFP4 expert tensor [E, rows, cols]: codes, float8 scales, amax (fp32) per expert."""
    E, rows, cols = shape
    return E * rows * cols // 2 + E * rows * cols // 16 + 4 * E


def file_bytes(tensors: dict) -> int:
    """Tensor bytes of the checkpoint as written (experts NVFP4, the rest bf16; headers not counted)."""
    return sum(nvfp4_bytes(tuple(t.shape)) + 4 if name.endswith(("w13_weight", "w2_weight")) else 2 * t.numel()
               for name, t in tensors.items())


def random_value(name: str, shape: tuple[int, ...], gen):
    """A random bf16 tensor for a non-expert weight, in the spirit of tests/test_inkling2.py's `randomise`."""
    import torch

    noise = torch.randn(shape, generator=gen)
    if "quer" in name:  # depth-mix and cross-pass queries (zero-initialised in transformers)
        t = noise
    elif name.endswith(("norm.weight", ".scale")):
        t = 1.0 + 0.2 * noise
    elif "sconv" in name and not name.endswith("weight_proj"):
        t = 0.5 * noise
    elif name.endswith("rel_logits_proj.proj"):
        t = noise
    elif name.endswith("mlp.gate.bias"):
        t = 0.1 * noise
    else:
        t = noise / math.sqrt(shape[-1])
    return t.to(torch.bfloat16)


def nvfp4(shape: tuple[int, ...], gen) -> dict:
    """Random NVFP4 tensors for one expert tensor [E, rows, cols]: codes, scales, amax, denominator.
    The amax puts the dequantized weights near 1 / sqrt(cols) (E2M1 codes have RMS ~2.9)."""
    import torch

    E, rows, cols = shape
    codes = torch.empty(E, rows, cols // 2, dtype=torch.uint8)
    for e in range(E):  # one expert at a time: no int64 temporary of the whole tensor
        codes[e] = torch.randint(0, 256, (rows, cols // 2), generator=gen, dtype=torch.int16).to(torch.uint8)
    scale = (torch.rand(E, rows, cols // 16, generator=gen) * 0.5 + 0.5).to(torch.float8_e4m3fn)
    den = 6.0 * 448.0
    amax = (den / (2.9 * 0.75 * math.sqrt(cols))) * (0.75 + 0.5 * torch.rand(E, generator=gen))
    return {"": codes, "_scale": scale, "_amax": amax, "_outer_scale_denominator": torch.tensor(den)}


def write_checkpoint(directory: Path, cfg) -> int:
    """The random checkpoint, one safetensors shard per layer (plus one for the rest) with an index;
    returns the bytes on disk of the shards."""
    import torch
    from safetensors.torch import save_file

    tensors = release_tensors(cfg)
    groups: dict[str, list[str]] = {}
    for name in tensors:
        parts = name.split(".")
        key = f"layer{parts[3]}" if parts[2] == "layers" else "rest"
        groups.setdefault(key, []).append(name)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, (_group, names) in enumerate(sorted(groups.items())):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            shape = tuple(tensors[name].shape)
            if name.endswith(("w13_weight", "w2_weight")):
                for suffix, t in nvfp4(shape, gen).items():
                    shard[name + suffix] = t
            else:
                shard[name] = random_value(name, shape, gen)
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
        total += (directory / file).stat().st_size
        del shard
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    conf = cfg.to_dict()
    conf.update(architectures=["Inkling2LoopForCausalLM"], dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(conf, indent=2))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stacks", nargs=2, default=["1,1,1", "2,1,2"],
                   help="two (prelude,loop,coda) layer stacks, the second with more layers (default 1,1,1 2,1,2)")
    p.add_argument("--experts", type=int, default=None, help="routed experts (default the release's 128)")
    p.add_argument("--seq", type=int, default=64, help="forward prompt length (default 64)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoints are written (default /tmp)")
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    args = p.parse_args()
    stacks = [tuple(int(x) for x in s.split(",")) for s in args.stacks]
    if any(len(s) != 3 for s in stacks):
        p.error("--stacks: each entry is prelude,loop,coda (three integers)")

    release = config(RELEASE_LAYERS, args.experts)
    full = release_tensors(release)
    release_params = sum(t.numel() for t in full.values())
    expert_params = sum(t.numel() for n, t in full.items() if n.endswith(("w13_weight", "w2_weight")))
    passes = release.loop_num_passes
    machine = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
               "memory_GiB": gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "measured": time.strftime("%Y-%m-%d"),
               "torch_threads": args.threads}
    measured: dict[str, dict] = {}
    for stack in stacks:
        cfg = config(stack, args.experts)
        key = "layers_{}_{}_{}".format(*stack)
        directory = Path(tempfile.mkdtemp(prefix="loop_lens_inkling2_", dir=args.tmp))
        try:
            t0 = time.perf_counter()
            size = write_checkpoint(directory, cfg)
            print(f"{key}: wrote {gib(size)} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
            load = run(LOAD, str(directory), "load", str(args.threads), str(args.seq), threads=args.threads)
            fwd = run(LOAD, str(directory), "forward", str(args.threads), str(args.seq), threads=args.threads)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if not fwd["finite"]:
            raise RuntimeError(f"{key}: the forward gave non-finite logits")
        p_, k_, c_ = stack
        measured[key] = {"prelude_loop_coda": list(stack), "layer_visits": p_ + passes * k_ + c_,
                         "file_GiB": gib(size), "load_s": round(load["load_s"], 2),
                         "load_peak_rss_GiB": gib(load["peak_rss"]), "rss_after_imports_GiB": gib(load["rss_after_imports"]),
                         "load_peak_rss_vs_file": round(load["peak_rss"] / size, 3),
                         "packed_expert_modules": load["packed_modules"],
                         "forward_seq": args.seq, "forward_passes": passes, "forward_s": round(fwd["forward_s"], 2),
                         "forward_peak_rss_GiB": gib(fwd["peak_rss"]), "_bytes": size,
                         "_load_rss": load["peak_rss"], "_fwd_rss": fwd["peak_rss"], "_fwd_s": fwd["forward_s"]}
        print(f"{key}: " + json.dumps({k: v for k, v in measured[key].items() if not k.startswith("_")}), flush=True)

    small, big = (measured["layers_{}_{}_{}".format(*s)] for s in stacks)
    d_layers = sum(stacks[1]) - sum(stacks[0])
    d_visits = big["layer_visits"] - small["layer_visits"]
    if d_layers <= 0 or d_visits <= 0:
        raise SystemExit("--stacks: the second stack needs more layers (and more layer visits) than the first")
    per_layer = {k: (big[k] - small[k]) / d_layers for k in ("_bytes", "_load_rss", "_fwd_rss")}
    per_visit_s = (big["_fwd_s"] - small["_fwd_s"]) / d_visits
    more_layers = sum(RELEASE_LAYERS) - sum(stacks[0])
    more_visits = RELEASE_LAYERS[0] + passes * RELEASE_LAYERS[1] + RELEASE_LAYERS[2] - small["layer_visits"]
    extrapolated = {
        "prelude_loop_coda": list(RELEASE_LAYERS), "passes": passes, "forward_seq": args.seq,
        "layer_visits": RELEASE_LAYERS[0] + passes * RELEASE_LAYERS[1] + RELEASE_LAYERS[2],
        "file_GiB": gib(small["_bytes"] + more_layers * per_layer["_bytes"]),
        "file_GiB_by_arithmetic": gib(file_bytes(full)),
        "load_peak_rss_GiB": gib(small["_load_rss"] + more_layers * per_layer["_load_rss"]),
        "forward_peak_rss_GiB": gib(small["_fwd_rss"] + more_layers * per_layer["_fwd_rss"]),
        "forward_s": round(small["_fwd_s"] + more_visits * per_visit_s, 1),
        "per_layer_file_GiB": gib(per_layer["_bytes"]), "per_layer_load_rss_GiB": gib(per_layer["_load_rss"]),
        "per_layer_visit_forward_s": round(per_visit_s, 3),
        "fits_24_GiB": small["_fwd_rss"] + more_layers * per_layer["_fwd_rss"] <= 24 * 2**30,
        "how": f"small stack + per-layer difference of the two stacks x {more_layers} layers (bytes, RSS) "
               f"or x {more_visits} layer visits (forward time)",
    }
    gpu = {"how": "arithmetic, not measured: parameters x bytes per value, weights only (no activations, KV cache, "
                  "CUDA context or allocator slack)",
           "params": release_params, "expert_params": expert_params,
           "bf16_all_dequantized_GiB": gib(2 * release_params),
           "bf16_rest_with_nvfp4_experts_packed_GiB": gib(2 * (release_params - expert_params)
                                                          + sum(nvfp4_bytes(tuple(t.shape)) for n, t in full.items()
                                                                if n.endswith(("w13_weight", "w2_weight"))))}
    for m in measured.values():
        for k in [k for k in m if k.startswith("_")]:
            del m[k]
    result = {"inkling2_real_size": {
        "checkpoint": "random, transformers Inkling2LoopTextConfig defaults (Inkling 2 Mini) per-layer shapes, "
                      f"{release.n_routed_experts} experts top-{release.num_experts_per_tok}, NVFP4 experts, bf16 rest, "
                      "one attention-residual block per layer in the reduced stacks",
        "load": "ll.load(path, packed_experts=True, dtype=torch.bfloat16), fresh process; peak = VmHWM, imports included",
        "command": "python benchmarks/inkling2_real_size.py" + (f" --experts {args.experts}" if args.experts else ""),
        **machine, "measured_reduced_layers": measured, "extrapolated_release": extrapolated, "gpu_bf16_footprint": gpu}}
    print(json.dumps(result["inkling2_real_size"]["extrapolated_release"]), flush=True)
    print(json.dumps(gpu), flush=True)
    merge_results(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
