"""Tiny looped models shipped inside the package, loadable offline as `ll.load("zoo:<name>")`."""

from __future__ import annotations

import json
from pathlib import Path

from loop_lens.errors import LoadError

MODELS_DIR = Path(__file__).parent / "models"


def accuracy_axes(acc: dict[str, float]) -> tuple[list[int], list[int]]:
    """The hop counts and loop counts of a card's `heldout_accuracy` (keys like "k=3,T=4")."""
    cells = [tuple(int(part.split("=")[1]) for part in key.split(",")) for key in acc]
    return sorted({k for k, _ in cells}), sorted({t for _, t in cells})


def names() -> list[str]:
    """Names of the shipped models."""
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "loop_config.json").is_file())


def zoo_path(name: str) -> Path:
    """Directory of a shipped model; raises LoadError naming the known models."""
    path = MODELS_DIR / name
    if not (path / "loop_config.json").is_file():
        raise LoadError(f"no zoo model {name!r}; shipped models: {names()}")
    return path


def card(name: str) -> dict:
    """The model card (`card.json`) of a shipped model."""
    path = zoo_path(name) / "card.json"
    return json.loads(path.read_text()) if path.is_file() else {"name": name}


def list() -> list[dict]:  # noqa: A001 - the contract's name: ll.zoo.list()
    """Every shipped model with its card."""
    return [card(n) for n in names()]
