"""`loop-lens`: inspect, convert and list looped models from the shell.

Heavy imports (torch, transformer_lens) happen inside the commands so `--help` stays fast.
Exit codes: 0 success, 1 a problem with the input (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Optional

DEFAULT_MODEL = "zoo:tiny-random"


def _inspect(args: argparse.Namespace) -> int:
    import loop_lens as ll

    model = ll.load(args.model, family=args.family)
    info = model.summary()
    if args.json:
        info["hook_names_iter0"] = model.loop_hook_names(0)
        print(json.dumps(info, indent=2))
        return 0
    cfg = model.cfg
    print(f"model     {args.model}")
    print(f"family    {cfg.family}")
    print(f"layout    {cfg.layout}   (prelude, block x loops, coda)")
    print(f"params    {info['n_params']:,}")
    print(f"width     d_model={cfg.d_model} n_heads={cfg.n_heads} n_kv={cfg.n_key_value_heads} d_head={cfg.d_head} d_mlp={cfg.d_mlp} d_vocab={cfg.d_vocab}")
    print(f"block     norm={cfg.norm_placement} ({cfg.normalization_type}) mlp={cfg.mlp_type} rope={cfg.rope_style if cfg.positional_embedding_type == 'rotary' else cfg.positional_embedding_type}")
    print(f"loop      injection={cfg.injection} initial_state={cfg.initial_state} iter_norm={cfg.iter_norm} norm_after_loop={cfg.norm_after_loop} exit_gate={cfg.exit_gate}")
    print(f"tokenizer {'yes' if model.tokenizer is not None else 'none'}")
    print("\nhook names of one iteration (t = 0):")
    for name in model.loop_hook_names(0):
        print(f"  {name}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    import loop_lens as ll

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()) and not args.force:
        raise ll.LoadError(f"{dst} exists and is not empty; pass --force to write into it")
    model = ll.load(args.src, family=args.family)
    model.save(dst)
    print(f"wrote {model.cfg.family} model {model.cfg.layout} to {dst}")
    return 0


def _read_prompts(spec: str) -> list[str]:
    """A prompts argument: a file (one prompt per line, or a JSON list) or the text itself."""
    from pathlib import Path

    from loop_lens.errors import LoadError

    path = Path(spec)
    looks_like_file = path.suffix in (".txt", ".json", ".jsonl") or "/" in spec
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                prompts = json.loads(text)
            except json.JSONDecodeError as err:
                raise LoadError(f"prompts file {path} is not valid JSON: {err}") from err
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise LoadError(f"prompts file {path} must hold a JSON list of strings")
        else:
            prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise LoadError(f"prompts file {path} holds no prompts")
        return prompts
    if looks_like_file:
        raise LoadError(f"prompts file {spec} does not exist")
    return [spec]


def _report(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    import loop_lens as ll
    from loop_lens.errors import LoadError
    from loop_lens.report import build_report

    out = Path(args.out)
    for target in filter(None, [out, Path(args.json) if args.json else None]):
        if target.exists() and target.is_dir():
            raise LoadError(f"cannot write {target}: it is a directory")
        parent = target.parent if str(target.parent) else Path(".")
        if not parent.is_dir():
            raise LoadError(f"cannot write {target}: directory {parent} does not exist")
        import os

        if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise LoadError(f"cannot write {target}: permission denied")
    prompts = _read_prompts(args.prompts)
    model = ll.load(args.model, family=args.family)
    if model.tokenizer is None:
        raise LoadError(f"{args.model} carries no tokenizer (tokenizer.json); the report needs text prompts it can tokenize")
    command = "loop-lens " + " ".join(shlex.quote(a) for a in args.argv)
    report = build_report(model, prompts, n_loops=args.n_loops, model_name=args.model, command=command,
                          position=args.position, seed=args.seed, progress=not args.quiet)
    report.save(out, json_path=args.json)
    print(f"wrote {out}" + (f" and {args.json}" if args.json else ""))
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from loop_lens import zoo

    cards = zoo.list()
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    for card in cards:
        print(f"zoo:{card['name']:<16} {card.get('layout', ''):<18} {card.get('description', '')}")
        acc, T = card.get("heldout_accuracy", {}), card.get("trained_loops")
        if acc and T is not None:
            cells = ", ".join(f"{k} hop{'s' * (k > 1)} {acc[f'k={k},T={T}']:.3f}" for k in card.get("train_hops", []) if f"k={k},T={T}" in acc)
            print(f"{'':<21} held-out accuracy at T={T}: {cells}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loop-lens", description="Interpretability for looped language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print a model's layout, config, size and one iteration's hook names")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"checkpoint directory or zoo:<name> (default {DEFAULT_MODEL})")
    p.add_argument("--family", default=None, help="override family detection")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("convert", help="convert any supported checkpoint to loop_lens's native format")
    p.add_argument("src", help="checkpoint directory or zoo:<name>")
    p.add_argument("dst", help="output directory")
    p.add_argument("--family", default=None, help="override family detection")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.set_defaults(func=_convert)

    p = sub.add_parser("report", help="write a standalone HTML head-stability report (opens offline)")
    p.add_argument("model", help="checkpoint directory or zoo:<name>")
    p.add_argument("--prompts", required=True, help="a prompt, or a file: one prompt per line (.txt) or a JSON list")
    p.add_argument("--n-loops", type=int, default=None, help="iterations to run (default: the model's own)")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON to this file")
    p.add_argument("--position", type=int, default=-1, help="position for the logit lens and trajectory (default: last)")
    p.add_argument("--seed", type=int, default=0, help="seed for a random initial state")
    p.add_argument("--family", default=None, help="override family detection")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_report)

    p = sub.add_parser("zoo", help="the tiny models shipped in the package")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    z = zsub.add_parser("list", help="list shipped models with their cards")
    z.add_argument("--json", action="store_true")
    z.set_defaults(func=_zoo_list)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from loop_lens.errors import ConfigError, LoadError

    try:
        return args.func(args)
    except (LoadError, ConfigError, OSError, ValueError) as err:
        print(f"loop-lens: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
