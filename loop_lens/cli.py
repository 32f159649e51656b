"""`loop-lens`: inspect, convert, report on, generate from, sweep and list looped models from the shell.

Importing any part of loop_lens imports torch (the package's `__init__` runs first), so the
commands import loop_lens inside their functions and `--help` stays fast.
Exit codes: 0 success, 1 a problem with the input (one line on stderr), 2 bad usage, 3 a bug
(one line; LOOP_LENS_DEBUG=1 prints the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

DEFAULT_MODEL = "zoo:tiny-random"

_BIDI = {0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def terminal_text(text: Any) -> str:
    """`text` safe to print to a terminal: control characters (ESC and the rest of C0 but newline
    and tab, DEL, C1) and bidirectional overrides from token text or file names are shown as
    escapes (`\\x1b`), never sent raw, so they cannot move the cursor, retitle the window or reorder
    what is shown."""
    out = []
    for char in str(text):
        code = ord(char)
        if char in "\n\t" or not (code < 0x20 or 0x7F <= code < 0xA0 or code in _BIDI):
            out.append(char)
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


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
    import loop_lens as ll
    from loop_lens.saving import check_save_target

    dst = Path(args.dst)
    src_dir = _checkpoint_dir(args.src)
    if src_dir is not None and dst.exists() and dst.resolve() == src_dir.resolve():
        raise ll.SaveError(f"the output {dst} is the checkpoint being converted; write to another directory")
    from loop_lens.files import inside_folder

    if src_dir is not None and inside_folder(dst, src_dir):
        raise ll.SaveError(f"the output {dst} lies inside the checkpoint {args.src} being converted; write to another directory")
    if dst.exists() and not dst.is_dir():
        raise ll.SaveError(f"{dst} is a file, not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not args.force:
        raise ll.SaveError(f"{dst} exists and is not empty; pass --force to replace what is there")
    check_save_target(dst, overwrite=args.force)  # every other refusal, before the source is read
    model = ll.load(args.src, family=args.family)
    model.save(dst, overwrite=args.force)
    print(f"wrote {model.cfg.family} model {model.cfg.layout} to {dst}")
    return 0


DTYPES = ("bfloat16", "float16", "float32")


def _dtype(name: Optional[str]) -> Any:
    """A --dtype choice as a torch dtype (None: the checkpoint's own)."""
    import torch

    return None if name is None else getattr(torch, name)


def _checkpoint_dir(spec: str) -> Optional[Path]:
    """The directory a model argument reads from (a zoo model's too), or None for a hub id."""
    if spec.startswith("zoo:"):
        from loop_lens.zoo import zoo_path

        return Path(zoo_path(spec[4:]))
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def _existing(text: Optional[str], kind: str) -> bool:
    """Whether `text` names an existing file (kind "file") or directory ("dir"). Prompt text is
    not a path: one longer than the system's name limit, or holding a NUL byte, names nothing
    (where `Path.is_file` would raise)."""
    if not text:
        return False
    try:
        return Path(text).is_file() if kind == "file" else Path(text).is_dir()
    except (OSError, ValueError):
        return False


def _read_prompts(text: Optional[str], file: Optional[str]) -> list[str]:
    """Prompts from `--prompts` (the text itself, or a file when a file of that name exists) or
    `--prompts-file` (one prompt per line, or a JSON list of strings)."""
    from loop_lens.errors import LoadError

    if file is None and _existing(text, "dir"):
        raise LoadError(f"--prompts {text} is a directory; give a prompt, or a file with --prompts-file")
    if file is None and _existing(text, "file"):
        file = text
    if file is None:
        if not text or not text.strip():
            raise LoadError("--prompts is empty: give a prompt, or a file with --prompts-file")
        if Path(text).suffix in (".txt", ".json", ".jsonl"):
            print(f"loop-lens: note: there is no file {text}; using it as the prompt text (--prompts-file names a file)",
                  file=sys.stderr)
        return [text]
    path = Path(file)
    if not path.is_file():
        raise LoadError(f"prompts file {path} does not exist")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LoadError(f"prompts file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if "\x00" in content:
        raise LoadError(f"prompts file {path} is binary (it holds NUL bytes), not text")
    if path.suffix == ".json":
        from loop_lens.files import parse_json

        prompts = parse_json(content, f"prompts file {path}")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise LoadError(f"prompts file {path} must hold a JSON list of strings")
        prompts = [p for p in prompts if p.strip()]
    else:
        prompts = [line for line in content.splitlines() if line.strip()]
    if not prompts:
        raise LoadError(f"prompts file {path} holds no prompts")
    return prompts


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any compute, outputs that would overwrite each other or an input, land
    inside the checkpoint (a new file there changes what the checkpoint is), or replace a path
    that is not a regular file (a FIFO, a device, a symbolic link)."""
    from loop_lens.errors import SaveError
    from loop_lens.files import check_output_file, inside_folder

    outputs = [("--out", Path(args.out))] + ([("--json", Path(args.json))] if args.json else [])
    if len(outputs) == 2 and outputs[0][1].resolve() == outputs[1][1].resolve():
        raise SaveError(f"--out and --json both name {args.out}: give two different files")
    inputs = [Path(p) for p in (args.prompts_file, args.prompts) if _existing(p, "file")]
    model_dir = _checkpoint_dir(args.model)
    for flag, target in outputs:
        if model_dir is not None and inside_folder(target, model_dir):
            raise SaveError(f"{flag} {target} lies inside the checkpoint {args.model}: the report would overwrite its "
                            "input (a new or replaced file there changes what the checkpoint loads as). Write it elsewhere")
        check_output_file(target, flag)
        parent = target.parent if str(target.parent) else Path(".")
        if not parent.is_dir():
            raise SaveError(f"cannot write {flag} {target}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise SaveError(f"cannot write {flag} {target}: permission denied")
        for source in inputs:
            if target.resolve() == source.resolve():
                raise SaveError(f"{flag} {target} is the prompts file; the report would overwrite its input")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Every family's run keyword as `--name` (they reach the model's run; a model without it refuses)."""
    from loop_lens.families import RUN_OPTIONS

    for name, text in RUN_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, dest=name, help=text)


def _run_options(args: argparse.Namespace) -> dict[str, int]:
    """The family run keywords given on the command line, checked."""
    from loop_lens.checks import positive_int
    from loop_lens.families import RUN_OPTIONS

    return {name: positive_int(getattr(args, name), "--" + name.replace("_", "-"))
            for name in RUN_OPTIONS if getattr(args, name, None) is not None}


def _report(args: argparse.Namespace) -> int:
    import loop_lens as ll
    from loop_lens.checks import check_n_loops, finite_number, seed
    from loop_lens.errors import LoadError
    from loop_lens.report import build_report

    n_loops = check_n_loops(args.n_loops, 1)
    options = _run_options(args)
    seed(args.seed, "--seed")
    if args.threshold is not None:
        finite_number(args.threshold, "--threshold")
    _check_outputs(args)
    prompts = _read_prompts(args.prompts, args.prompts_file)
    model = ll.load(args.model, family=args.family, dtype=_dtype(args.dtype))
    if model.tokenizer is None:
        raise LoadError(f"{args.model} carries no tokenizer (tokenizer.json); the report needs text prompts it can tokenize")
    length = int(model.tokenize(prompts[:1])[1].sum())
    if not -length <= args.position < length:
        raise ValueError(f"--position {args.position} is outside the first prompt's {length} tokens "
                         f"(use 0..{length - 1}, or -1 for the last)")
    command = "loop-lens " + " ".join(shlex.quote(a) for a in args.argv)
    report = build_report(model, prompts, n_loops=n_loops if args.n_loops is not None else None, model_name=args.model,
                          command=command, position=args.position, seed=args.seed, progress=not args.quiet,
                          corrupt=args.corrupt, generate=args.generate, adaptive=args.adaptive, threshold=args.threshold,
                          **options)
    report.save(Path(args.out), json_path=args.json)
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))
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


def _sweep(args: argparse.Namespace) -> int:
    """`loop-lens sweep`: per-prompt streaming analyses into a Parquet table (sharded under torchrun)."""

    from loop_lens.checks import positive_int, seed
    from loop_lens.errors import SaveError
    from loop_lens.files import inside_folder
    from loop_lens.sweep import TABLE, run_sweep, written_by_sweep

    if args.n_loops is not None:
        positive_int(args.n_loops, "--n-loops")
    seed(args.seed, "--seed")
    if _existing(args.prompts, "file") and written_by_sweep(Path(args.prompts), Path(args.out)):
        raise SaveError(f"--prompts {args.prompts} is a file the sweep writes or deletes in --out {args.out}; "
                        "keep the prompts outside it (the sweep would destroy its input)")
    model_dir = _checkpoint_dir(args.model)
    if model_dir is not None and inside_folder(args.out, model_dir):
        raise SaveError(f"--out {args.out} lies inside the checkpoint {args.model}; write the sweep elsewhere")
    prompts = _read_prompts(None, args.prompts)
    result = run_sweep(args.model, prompts, args.n_loops, args.out, batch_size=args.batch_size, seed=args.seed,
                       lens=args.lens, family=args.family, dtype=_dtype(args.dtype), overwrite=args.force,
                       progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        run = result.summary["run"]
        print(f"wrote {Path(args.out) / TABLE}: {run['n_rows']:,} rows, {run['n_prompts']} prompts, "
              f"n_loops={run['n_loops']}, {run['world_size']} process(es)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import loop_lens as ll
    from loop_lens.checks import check_n_loops, finite_number, positive_int, seed
    from loop_lens.errors import LoadError
    from loop_lens.generation import eos_token

    n_loops = None if args.n_loops is None else check_n_loops(args.n_loops, 1)
    max_new = positive_int(args.max_new_tokens, "--max-new-tokens")
    seed(args.seed, "--seed")
    for flag, value in (("--threshold", args.threshold), ("--temperature", args.temperature), ("--top-p", args.top_p)):
        if value is not None:
            finite_number(value, flag)
    if not args.prompt.strip():
        raise LoadError("--prompt is empty: give the text to continue")
    model = ll.load(args.model, family=args.family)
    if model.tokenizer is None:
        raise LoadError(f"{args.model} carries no tokenizer (tokenizer.json); generate needs one to read --prompt")
    eos = eos_token(model, args.eos_token_id)
    threshold = args.threshold
    if args.adaptive == "argmax" and threshold is not None and float(threshold).is_integer():
        threshold = int(threshold)  # a count of iterations; argparse reads every threshold as a float
    result = model.generate(
        args.prompt, max_new_tokens=max_new, n_loops=n_loops, stop_at_eos=eos is not None, eos_token_id=eos,
        do_sample=args.do_sample, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
        use_past_kv_cache=not args.no_cache, return_type="result", seed=args.seed, initial_state=args.initial_state,
        verbose=not args.quiet, adaptive=args.adaptive, threshold=threshold,
    )
    frame = result.to_frame()
    if args.json:
        out = {"text": result.text[0], "tokens": result.generated[0].tolist(), "token_strs": frame["token_str"].tolist(),
               "iterations": result.iterations[0].tolist(), "mean_iterations": result.mean_iterations,
               "n_loops": result.n_loops, "adaptive": args.adaptive, "threshold": result.threshold}
        print(json.dumps(out, indent=2))
        return 0
    print(terminal_text(result.text[0]))
    print(f"\n{'step':>4}  {'token':<12} iterations (of {result.n_loops})")
    for row in frame.itertuples():
        print(f"{row.step:>4}  {row.token_str!r:<12} {row.iterations}")
    print(f"mean iterations per token: {result.mean_iterations:.2f}")
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
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompts", help="a prompt (or, if a file of that name exists, that file)")
    given.add_argument("--prompts-file", help="a file: one prompt per line, or a JSON list of strings (.json)")
    p.add_argument("--n-loops", type=int, default=None, help="iterations to run (default: the model's own)")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON to this file")
    p.add_argument("--position", type=int, default=-1, help="position for the logit lens and trajectory (default: last)")
    p.add_argument("--seed", type=int, default=0, help="seed for a random initial state")
    p.add_argument("--family", default=None, help="override family detection")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--corrupt", default=None, help="a corrupted version of the first prompt (same length): adds "
                   "activation patching of every (iteration, layer, position) residual")
    p.add_argument("--generate", type=int, default=0, help="generate this many tokens after the first prompt and show "
                   "the iterations each used")
    p.add_argument("--adaptive", default=None, choices=["kl", "entropy", "argmax", "gate"], help="exit criterion for --generate")
    p.add_argument("--threshold", type=float, default=None, help="threshold of the --adaptive criterion")
    _add_run_options(p)
    p.add_argument("--dtype", default=None, choices=DTYPES, help="load the weights in this dtype "
                   "(default: the checkpoint's)")
    p.set_defaults(func=_report)

    p = sub.add_parser("sweep", help="streaming analyses of every prompt of a file into one Parquet table "
                                     "(under torchrun --nproc-per-node N: sharded across ranks)")
    p.add_argument("model", help="checkpoint directory or zoo:<name>")
    p.add_argument("--prompts", required=True, help="a file: one prompt per line, or a JSON list of strings (.json)")
    p.add_argument("--n-loops", type=int, default=None, help="iterations to run (default: the model's own)")
    p.add_argument("--out", required=True, help="directory for sweep.parquet, heads.parquet and summary.json")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for random initial states (per prompt)")
    p.add_argument("--lens", choices=("logit", "coda"), default="logit", help="lens for the per-iteration answer")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="load the weights in this dtype")
    p.add_argument("--family", default=None, help="override family detection")
    p.add_argument("--force", action="store_true", help="replace what --out holds: a finished sweep with other settings, or tables loop-lens did not write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("generate", help="generate text, printing the loop iterations each token used")
    p.add_argument("model", help="checkpoint directory or zoo:<name>")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--n-loops", type=int, default=None, help="iterations per token, the most with --adaptive (default: the model's own)")
    p.add_argument("--adaptive", choices=["kl", "entropy", "argmax", "gate"], default=None, help="per-token exit criterion")
    p.add_argument("--threshold", type=float, default=None, help="the criterion's threshold (default: the reference's)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed for a random start state and sampling (default 0)")
    p.add_argument("--initial-state", choices=["zeros", "embed"], default=None, help="a deterministic start state")
    p.add_argument("--eos-token-id", type=int, default=None, help="stop at this token (default: the tokenizer's, if any)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--family", default=None, help="override family detection")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_generate)

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
    from loop_lens.errors import ConfigError, HookError, LoadError, SaveError

    try:
        from loop_lens.threads import configure

        configure()  # a sane torch thread count (docs/performance.md)
        return args.func(args)
    except (LoadError, ConfigError, SaveError, HookError, OSError, ValueError) as err:
        print(f"loop-lens: error: {terminal_text(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loop-lens: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not the user's mistake: one line unless asked for more
        if os.environ.get("LOOP_LENS_DEBUG"):
            traceback.print_exc()
        print(f"loop-lens: internal error: {type(err).__name__}: {terminal_text(err)} (a bug in loop_lens; set LOOP_LENS_DEBUG=1 "
              "for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
