"""Bit-identity check for refactors: record logits, every cached activation, the unrolled cache's
accumulated residual, stop_at_layer outputs, generation (cached, recomputed, adaptive) and exits on the
golden fixtures and the zoo models, then compare two recordings with torch.equal (NaN = NaN).

    python tests/tools/snapshot_outputs.py record before.pt      # on the old code
    python tests/tools/snapshot_outputs.py record after.pt       # on the new code
    python tests/tools/snapshot_outputs.py compare before.pt after.pt
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

import loop_lens as ll

fp = importlib.import_module("loop_lens.analysis.fixed_points")
torch.set_num_threads(1)


def record(path: str) -> None:
    out = {}
    GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden"
    models = {f"golden:{n}": str(GOLDEN / n) for n in ("ouro-tiny", "huginn-tiny", "retro-llama-tiny")}
    models.update({f"zoo:{n}": f"zoo:{n}" for n in ("khop-huginn", "khop-ouro", "khop-ff", "khop-hrm", "tiny-random")})
    for key, source in models.items():
        try:
            m = ll.load(source)
        except Exception as e:
            print("skip", key, e)
            continue
        V = m.cfg.d_vocab
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, V, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        seedkw = {"seed": 3}
        for T in (1, 3):
            with torch.no_grad():
                try:
                    out[f"{key}/logits/T{T}"] = m(ids, n_loops=T, **seedkw)
                except Exception:
                    seedkw = {}
                    out[f"{key}/logits/T{T}"] = m(ids, n_loops=T)
                out[f"{key}/logits_mask/T{T}"] = m(ids, n_loops=T, attention_mask=mask, **seedkw)
                _, cache = m.run_with_cache(ids, n_loops=T, **seedkw)
                for k, v in cache.items():
                    out[f"{key}/cache/T{T}/{k}"] = v
                un = cache.unrolled()
                out[f"{key}/accum/T{T}"] = un.accumulated_resid(apply_ln=True)
                depth = cache.depth
                for d in range(0, depth + 1, max(1, depth // 3)):
                    out[f"{key}/stop/T{T}/{d}"] = m(ids, n_loops=T, stop_at_layer=d, **seedkw)
        with torch.no_grad():
            try:
                out[f"{key}/gen"] = m.generate(ids, max_new_tokens=4, n_loops=2, return_type="tokens", verbose=False, seed=1, stop_at_eos=False)
            except Exception as e:
                print("gen fail", key, e)
            try:
                out[f"{key}/gen_nokv"] = m.generate(ids, max_new_tokens=3, n_loops=2, return_type="tokens", verbose=False, seed=1, use_past_kv_cache=False, stop_at_eos=False)
            except Exception as e:
                print("gen fail", key, e)
            for ad in ("kl", "argmax", "gate"):
                try:
                    r = m.generate(ids, max_new_tokens=3, n_loops=5, return_type="result", verbose=False, seed=1, adaptive=ad, stop_at_eos=False)
                    out[f"{key}/gen_{ad}"] = r.tokens
                    out[f"{key}/gen_{ad}_its"] = r.iterations
                except Exception as e:
                    print("adaptive", ad, key, type(e).__name__)
            for ex in ("weighted", "threshold", 0):
                try:
                    out[f"{key}/exit_{ex}"] = m(ids, n_loops=4, exit=ex, **seedkw)
                except Exception:
                    pass
        try:
            _, cache = m.run_with_cache(ids, n_loops=6, **seedkw)
            r = fp.step_sizes(cache)
            out.update({f"{key}/steps/{a}": v for a, v in vars(r).items() if isinstance(v, torch.Tensor)})
        except Exception as e:
            print("steps", key, type(e).__name__, e)
    torch.save(out, path)
    print(len(out), "tensors")


def compare(before: str, after: str) -> int:
    a, b = torch.load(before), torch.load(after)
    bad = 0
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            print("missing", k, k in a, k in b)
            bad += 1
            continue
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype or not (torch.equal(x, y) or (x.is_floating_point() and bool(((x == y) | (x.isnan() & y.isnan())).all()))):
            print("DIFF", k, tuple(x.shape), tuple(y.shape), (x.float() - y.float()).abs().max().item() if x.shape == y.shape else "")
            bad += 1
    print("compared", len(a), "bad", bad)

    return bad


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"]:
        record(sys.argv[2])
    elif sys.argv[1:2] == ["compare"]:
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
    else:
        sys.exit(__doc__)
