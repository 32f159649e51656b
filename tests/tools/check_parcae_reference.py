"""One-off check (not part of the suite): tests/parcae_reference.py against the official code.

Runs the official parcae_lm (a checkout of github.com/sandyresearch/parcae at commit dee8363,
path given as the first argument) on the random configurations the tests draw, loading the
checkpoints the tests write the way receval's ModelingParcae.from_pretrained does, and compares
its logits (fixed depths and the plain call) with the reference's.

    OMP_NUM_THREADS=1 python tests/tools/check_parcae_reference.py /path/to/parcae [n_draws]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import parcae_configs as pc  # noqa: E402
import parcae_reference as ref  # noqa: E402


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    from parcae_lm.models.config import RoPESettings
    from parcae_lm.models.parcae.config import ParcaeConfig

    torch.set_num_threads(1)
    n_draws = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    worst, ran, refused = 0.0, 0, 0
    for i in range(n_draws):
        c = pc.random_config(random.Random(i))
        sd = pc.random_state_dict(c, i)
        # skip_initialization: strategies without a "std" entry (mitchell, takase, ...) cannot build the
        # official model otherwise; it changes nothing but the (overwritten) initial weights
        kwargs = {**c, "rope_settings": RoPESettings(**c["rope_settings"]), "skip_initialization": True}
        ids = torch.randint(0, c["vocab_size"], (2, c["block_size"] - 3), generator=torch.Generator().manual_seed(i))
        if c["use_fused_head"] == "full-triton":
            c["use_fused_head"] = "pytorch"  # its head needs triton here; the transposed-head layout is our own test's
            sd = pc.random_state_dict(c, i)
            kwargs = {**c, "rope_settings": RoPESettings(**c["rope_settings"]), "skip_initialization": True}
        try:
            torch.manual_seed(0)
            model = ParcaeConfig(**kwargs).construct_model().eval()
            missing, unexpected = model.load_state_dict(sd, strict=False)
            assert not missing and not unexpected, (missing, unexpected)
            with torch.no_grad():
                outs = {}
                for t in (1, c["mean_recurrence"], None):
                    torch.manual_seed(100 + i)
                    pair = None if t is None else torch.tensor([t, 0])
                    try:
                        outs[t] = model(ids, return_logits=True, num_steps_pair=pair)["logits"]
                    except UnboundLocalError:  # a plain call whose sampled depths are all 0 (xk unbound)
                        print(f"draw {i}: the official plain call runs no recurrence and crashes; not compared")
        except (RuntimeError, AssertionError, ValueError) as err:
            official_error = f"{type(err).__name__}: {str(err)[:80]}"
            try:
                torch.manual_seed(100 + i)
                ref.forward(c, sd, ids, 1, ref.initial_state(c, (*ids.shape, c["recurrent_embedding_dimension"])))
                print(f"draw {i}: official fails ({official_error}) but the reference runs")
            except RuntimeError:
                refused += 1
                print(f"draw {i}: official and reference both fail ({official_error})")
            continue
        for t, logits in outs.items():
            torch.manual_seed(100 + i)
            x0 = ref.initial_state(c, (*ids.shape, c["recurrent_embedding_dimension"]))
            expected = ref.forward(c, sd, ids, t, x0)["logits"]
            diff = ((logits - expected).abs().max() / expected.abs().max().clamp(min=1)).item()
            worst = max(worst, diff)
        ran += 1
    print(f"{ran} draws compared, {refused} refused by both; worst max|diff| / max(1, max|logit|) = {worst:.2e}")


if __name__ == "__main__":
    main()
