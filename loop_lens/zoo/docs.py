"""Write the zoo page from the shipped models' cards: `python -m loop_lens.zoo.docs --out docs/zoo.md`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from loop_lens import zoo

HEADER = """# The zoo: tiny looped models shipped in the package

Load offline with `ll.load("zoo:<name>")`; `ll.zoo.list()` returns the cards. All are trained on
the k-hop pointer task (`loop_lens/zoo/task.py`): a prompt lists ten `source target` pointers
forming one 10-cycle, then asks four questions `| x k =`, "where do you land after k hops from
x?". Held-out accuracy is measured on cycles that never appear in training (split by a hash of
the cycle), on the first question of 256 prompts per cell (later questions may repeat a start
letter). Training, from the repository root: `python -m loop_lens.zoo.train NAME --out
loop_lens/zoo/models/NAME` (CPU, deterministic for a seed and thread count; each shipped model was
trained on one thread of a 2-core machine, at most two runs at a time, so each had a core to
itself); `--evaluate` re-measures saved weights. This page: `python -m loop_lens.zoo.docs --out
docs/zoo.md`.
"""


def table(card: dict) -> str:
    """The held-out accuracy table of a card (hops by loops), or "" when it has none."""
    acc = card.get("heldout_accuracy", {})
    if not acc:
        return ""
    hops, loops = zoo.accuracy_axes(acc)
    lines = ["| hops k, n_loops T → | " + " | ".join(str(t) for t in loops) + " |", "|---" * (len(loops) + 1) + "|"]
    for k in hops:
        trained = " (trained)" if k in card.get("train_hops", []) else ""
        lines.append(f"| {k}{trained} | " + " | ".join(f"{acc[f'k={k},T={t}']:.3f}" for t in loops) + " |")
    return "\n".join(lines)


def render() -> str:
    """The whole page, from the cards of the shipped models."""
    parts = [HEADER]
    for card in zoo.list():
        parts.append(f"## zoo:{card['name']}\n")
        parts.append(f"{card.get('description', '')}\n")
        rows = [("layout", card.get("layout")), ("trained", card.get("trained")), ("command", f"`{card.get('command')}`"),
                ("seed", card.get("seed")), ("steps", card.get("steps")), ("batch", card.get("batch")), ("lr", card.get("lr")),
                ("wall time", f"{card['wall_time_s']} s (CPU time {card.get('cpu_time_s')} s)" if "wall_time_s" in card else None), ("machine", card.get("machine")),
                ("parameters", card.get("n_params")), ("trained hops", card.get("train_hops")), ("loops per batch", card.get("train_loops")),
                ("curriculum", card.get("curriculum")), ("curriculum stages entered (step, stage)", card.get("curriculum_stages"))]
        parts.append("\n".join(f"- {k}: {v}" for k, v in rows if v is not None) + "\n")
        t = table(card)
        if t:
            parts.append("Held-out accuracy:\n\n" + t + "\n")
        lands = card.get("untrained_hops_land_on")
        if lands:
            cells = []
            for k, shares in lands.items():
                j, share = max(shares.items(), key=lambda kv: kv[1])
                cells.append(f"{k}: {share:.2f} on {j}")
            parts.append(f"On hop counts it was not trained on (T = {card.get('trained_loops', '?')}), the largest share of first "
                         "answers landing on the letter j hops from the start (`untrained_hops_land_on` in the card): "
                         + "; ".join(cells) + ".\n")
        if card.get("notes"):
            parts.append(card["notes"] + "\n")
    return "\n".join(parts)


def main(argv: Optional[list[str]] = None) -> Path:
    """Write the page to `--out` (the repository keeps it at docs/zoo.md); never into the package."""
    parser = argparse.ArgumentParser(description="Write the zoo page (Markdown) from the shipped models' cards.")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown file to write, e.g. docs/zoo.md")
    out = parser.parse_args(argv).out
    out.write_text(render())
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
