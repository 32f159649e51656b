"""Sweeps: the streaming analyses over a prompt set, written as one tidy Parquet table.

`run_sweep` runs `stream_analyses` over fixed chunks of prompts and writes, under `out_dir`:

- `sweep.parquet`: one row per (prompt, iteration, block layer): the step of the layer's output
  (`step`, `relative_step`, `cosine`), the attention metrics as means over heads with the layer
  input's `resid_step`, the logit lens's answer at the prompt's last real token (`lens_top1`,
  `lens_top1_prob`, `lens_entropy`, `lens_token`), and `converged_at`, the iteration after which the
  layer's relative step stays below `tol` (-1: never within the run);
- `heads.parquet`: one row per (prompt, block layer, head): the attention-stability summary
  (stabilisation iteration, last pattern change, concentration, sink, mixing, head type);
- `summary.json`: the run's settings and aggregates over prompts. It is written last: a sweep is
  complete exactly when it exists, and a table without it is never left behind.

Launched under `torchrun --nproc-per-node N`, every rank loads the model (one GPU per rank when
there are GPUs, gloo on CPU), takes every N-th chunk, and writes each chunk as a part file with an
atomic rename; rank 0 merges the parts once every rank has passed a barrier. The chunks, their
padding and every prompt's random start state (`seed=`) do not depend on the number of ranks, so the
merged table equals the single-process one. A rank that dies makes the barrier fail (torchrun stops
the others) and no merged table is written; a rerun with the same settings skips the parts already
on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from loop_lens.adapters import load
from loop_lens.analysis.attention import HEAD_TYPES
from loop_lens.analysis.batching import encode_prompts, prompt_list
from loop_lens.analysis.result import Result
from loop_lens.analysis.streaming import ATTENTION_COLUMNS, stream_analyses
from loop_lens.checks import check_n_loops, positive_int
from loop_lens.checks import seed as check_seed
from loop_lens.errors import LoadError, SaveError
from loop_lens.files import read_json

TABLE, HEADS, SUMMARY, PARTS = "sweep.parquet", "heads.parquet", "summary.json", "parts"
FORMAT_VERSION = 1
BARRIER_TIMEOUT = timedelta(hours=24)
"""How long a rank that has finished waits for the others (a dead rank is noticed at once)."""

Prompts = Union[Sequence[str], Sequence[Sequence[int]]]


@dataclass(kw_only=True)
class SweepResult(Result):
    """A finished sweep: the merged tables, the summary, and where they are on disk."""

    table: pd.DataFrame
    heads: pd.DataFrame
    summary: dict[str, Any]
    out_dir: Path

    def to_frame(self) -> pd.DataFrame:
        """The per (prompt, iteration, layer) table."""
        return self.table

    def plot(self, value: str = "relative_step", log: bool = True):
        """One line per layer across iterations (mean over prompts) of a table column."""
        import plotly.express as px

        numeric = [c for c in self.table.columns if c not in ("prompt", "iteration", "layer", "lens_token")]
        if value not in numeric:
            raise ValueError(f"value must be one of the table's measured columns {numeric}, got {value!r}")
        frame = self.table.groupby(["iteration", "layer"], as_index=False)[value].mean()
        return px.line(frame, x="iteration", y=value, color="layer", markers=True, log_y=log,
                       title=f"{value} by iteration (mean over {self.summary['run']['n_prompts']} prompts)")


# ---------------------------------------------------------------------------- processes
def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group). Under torchrun (WORLD_SIZE > 1)
    the group is started here: NCCL with one GPU per rank (LOCAL_RANK) when CUDA is there, gloo
    otherwise. A group the caller started is used as it is."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=BARRIER_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), True


def _barrier(world: int) -> None:
    """Wait for every rank; raises (loudly) when one has died."""
    if world > 1:
        dist.barrier()


def _total(count: int, world: int) -> int:
    """The sum of `count` over every rank (itself when there is one rank)."""
    if world == 1:
        return count
    value = torch.tensor([count], device=_rank_device() or "cpu")
    dist.all_reduce(value)
    return int(value.item())


def _rank_device() -> Optional[str]:
    """The device a rank loads the model onto: its own GPU under torchrun, else None (CPU)."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


# ---------------------------------------------------------------------------- files
def _atomic_write(path: Path, write: Any) -> None:
    """`write(tmp)` then fsync and rename onto `path`, so `path` is absent or complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # directories cannot be synced on every platform
        pass


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """A frame as Parquet (pyarrow), atomically."""
    _atomic_write(path, lambda tmp: frame.to_parquet(tmp, engine="pyarrow", index=False))


def _write_json(data: dict[str, Any], path: Path) -> None:
    """A dict as JSON, atomically."""
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n"))


def _check_out_dir(out_dir: Any) -> Path:
    """`out_dir` as a Path that can be written (created when missing); SaveError otherwise."""
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise SaveError(f"out_dir must be a directory path, got {out_dir!r}")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise SaveError(f"out_dir {path} is a file, not a directory")
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        raise SaveError(f"cannot write out_dir {path}: {existing} is not writable")
    return path


# ---------------------------------------------------------------------------- identity
def _model_identity(model: Any) -> dict[str, Any]:
    """What decides the model's numbers, cheaply: its config, and every parameter's name, shape,
    dtype and first and last values."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        sample = torch.cat([flat[:8], flat[-8:]]).float().cpu().tolist() if flat.numel() else []
        digest.update(json.dumps([name, list(param.shape), str(param.dtype), sample]).encode())
    return {"config": model.cfg.to_dict(), "weights_sample_sha256": digest.hexdigest()}


def _fingerprint(settings: dict[str, Any], identity: dict[str, Any], prompts: list) -> str:
    """A hash of everything that decides the table (not the number of ranks)."""
    text = json.dumps({"settings": settings, "model": identity, "prompts": prompts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- one chunk
def _tokens_of(model: Any, ids: list[int]) -> list[Optional[str]]:
    """The string of each token id, or None for every id when the model has no tokenizer."""
    if model.tokenizer is None:
        return [None] * len(ids)
    return model.to_str_tokens(ids)


def _analyse_chunk(model: Any, chunk: list, first: int, settings: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two tables' rows for prompts `first .. first + len(chunk) - 1`."""
    tokens, mask = encode_prompts(model, chunk, first=first)
    lengths = mask.sum(1).cpu()
    last = (lengths - 1).tolist()
    positions = sorted(set(last))  # the lens reads each prompt's own last real token
    T, L, H = settings["n_loops"], model.cfg.n_block, model.cfg.n_heads
    r = stream_analyses(model, tokens, n_loops=T, attention_mask=mask, fixed_point=True, attention=True,
                        lens_positions=positions, lens=settings["lens"], seed=settings["seed"])
    B = tokens.shape[0]
    column = torch.tensor([positions.index(p) for p in last])  # [B]
    pick = column.view(1, 1, B, 1).expand(T, L, B, 1).to(r.lens_top1.device)

    def own(x: torch.Tensor) -> torch.Tensor:
        return x.gather(-1, pick)[..., 0]  # [T, L, B]

    per_layer: dict[str, torch.Tensor] = {
        "step": r.steps.norm, "relative_step": r.steps.relative, "cosine": r.steps.cosine,
        **{name: getattr(r.attention, name).mean(-1) for name in ATTENTION_COLUMNS},
        "resid_step": r.attention.resid_step,
        "lens_top1": own(r.lens_top1), "lens_top1_prob": own(r.lens_top1_prob), "lens_entropy": own(r.lens_entropy),
    }
    converged = r.steps.convergence_iteration(settings["tol"])  # [L, B]
    per_layer["converged_at"] = converged[None].expand(T, L, B)
    index = pd.MultiIndex.from_product([range(first, first + B), range(T), range(L)], names=["prompt", "iteration", "layer"])
    table = pd.DataFrame(index=index).reset_index()
    table.insert(1, "n_tokens", lengths.repeat_interleave(T * L).numpy())
    for name, values in per_layer.items():
        v = values.detach().permute(2, 0, 1).reshape(-1).cpu()  # [B, T, L] in row order
        table[name] = v.float().numpy() if v.is_floating_point() else v.long().numpy()
    vocab = sorted(set(table["lens_top1"].tolist()))
    strings = dict(zip(vocab, _tokens_of(model, vocab)))
    table["lens_token"] = table["lens_top1"].map(strings).astype(object)

    att = r.attention
    stab = att.stabilisation_iteration(settings["attention_tol"])  # [L, B, H]
    scores = torch.stack([att.head_types[k][-1] for k in HEAD_TYPES])  # [4, L, B, H]
    best = scores.argmax(0)
    per_head: dict[str, torch.Tensor] = {
        "stabilisation_iteration": stab,
        "final_change_frobenius": att.change_frobenius[-1], "final_change_js": att.change_js[-1],
        "concentration": att.concentration[-1], "sink": att.sink[-1], "mixing": att.mixing[-1],
        "head_type_score": scores.max(0).values,
        "kappa": att.kappa[:, None, :].expand(L, B, H),
    }
    index = pd.MultiIndex.from_product([range(first, first + B), range(L), range(H)], names=["prompt", "layer", "head"])
    heads = pd.DataFrame(index=index).reset_index()
    for name, values in per_head.items():
        v = values.detach().permute(1, 0, 2).reshape(-1).cpu()  # [B, L, H]
        heads[name] = v.float().numpy() if v.is_floating_point() else v.long().numpy()
    heads.insert(4, "head_type", [HEAD_TYPES[i] for i in best.permute(1, 0, 2).reshape(-1).tolist()])
    return table, heads


# ---------------------------------------------------------------------------- merging
def _clean(value: Any) -> Any:
    """A JSON-safe scalar: NaN and infinities become None, numpy scalars become Python ones."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _summarise(table: pd.DataFrame, heads: pd.DataFrame, T: int) -> dict[str, Any]:
    """Aggregates over prompts: per layer, per head, and the lens answer per iteration."""
    final = table[table["iteration"] == T - 1]
    layers = []
    for layer, rows in final.groupby("layer"):
        conv = rows["converged_at"]
        settled = conv[conv >= 0]
        layers.append({
            "layer": int(layer),
            "final_relative_step_mean": _clean(rows["relative_step"].mean()),
            "final_change_frobenius_mean": _clean(rows["change_frobenius"].mean()),
            "converged_fraction": _clean(float((conv >= 0).mean())),
            "converged_at_median": _clean(float(settled.median())) if len(settled) else None,
        })
    head_rows = []
    for (layer, head), rows in heads.groupby(["layer", "head"]):
        stab = rows["stabilisation_iteration"]
        settled = stab[stab >= 0]
        kinds = rows["head_type"].value_counts()
        head_rows.append({
            "layer": int(layer), "head": int(head),
            "stabilised_fraction": _clean(float((stab >= 0).mean())),
            "stabilisation_iteration_median": _clean(float(settled.median())) if len(settled) else None,
            "head_type": str(sorted(kinds[kinds == kinds.max()].index)[0]),
            "final_change_frobenius_mean": _clean(rows["final_change_frobenius"].mean()),
            "sink_mean": _clean(rows["sink"].mean()),
            "kappa": _clean(rows["kappa"].iloc[0]),
        })
    last_layer = table[table["layer"] == table["layer"].max()]
    answers = last_layer.pivot(index="prompt", columns="iteration", values="lens_top1")
    agree = answers.eq(answers[T - 1], axis=0).mean(0)
    return {
        "per_layer": layers,
        "per_head": head_rows,
        "lens_agrees_with_final_answer": [_clean(float(agree[t])) for t in range(T)],
    }


def _merge(out_dir: Path, part_dir: Path, chunks: list[tuple[int, int]], T: int, L: int, H: int,
           run: dict[str, Any]) -> None:
    """Rank 0: join the parts in prompt order, write both tables, then the summary (the commit)."""
    tables, heads = [], []
    for start, end in chunks:
        main, head = _part_paths(part_dir, start, end)
        if not (main.is_file() and head.is_file()):
            raise SaveError(f"part {main.name} is missing after every rank finished; rerun to compute it")
        t, h = pd.read_parquet(main, engine="pyarrow"), pd.read_parquet(head, engine="pyarrow")
        n = end - start
        if len(t) != n * T * L or len(h) != n * L * H:
            raise SaveError(f"part {main.name} has {len(t)} rows, expected {n * T * L}; delete it and rerun")
        tables.append(t)
        heads.append(h)
    table = pd.concat(tables, ignore_index=True)
    head_table = pd.concat(heads, ignore_index=True)
    _write_parquet(head_table, out_dir / HEADS)
    _write_parquet(table, out_dir / TABLE)
    summary = {"run": {**run, "n_rows": len(table), "columns": list(table.columns), "head_columns": list(head_table.columns),
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
               "results": _summarise(table, head_table, T)}
    _write_json(summary, out_dir / SUMMARY)
    shutil.rmtree(part_dir, ignore_errors=True)
    parts = out_dir / PARTS
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()


def _part_paths(part_dir: Path, start: int, end: int) -> tuple[Path, Path]:
    """The two files of the chunk of prompts [start, end)."""
    stem = f"prompts-{start:08d}-{end:08d}"
    return part_dir / f"{stem}.parquet", part_dir / f"{stem}.heads.parquet"


def written_by_sweep(path: Path, out_dir: Path) -> bool:
    """Whether `path` is a file a sweep into `out_dir` writes or deletes (its tables, summary, parts)."""
    try:
        real, out = path.resolve(), out_dir.resolve()
    except OSError:
        return False
    return real in {out / TABLE, out / HEADS, out / SUMMARY} or (out / PARTS) in real.parents


def _summary_fingerprint(path: Path) -> Optional[str]:
    """The fingerprint of a summary.json a sweep wrote, or None when the file is not one."""
    try:
        previous = read_json(path)["run"]["fingerprint"]
    except (LoadError, OSError, KeyError, TypeError):
        return None
    return previous if isinstance(previous, str) else None


def _finished(out_dir: Path, fingerprint: str, overwrite: bool) -> Optional[bool]:
    """True when `out_dir` holds this very sweep, complete; False when it holds another complete
    sweep (allowed only with `overwrite`); None when it holds none. Tables or a summary that no
    sweep wrote (a table without the summary and parts of this sweep, a summary.json that is not
    a sweep's) are refused unless `overwrite`: the sweep only replaces its own files."""
    path = out_dir / SUMMARY
    tables = [name for name in (TABLE, HEADS) if (out_dir / name).exists()]
    if not path.exists():
        ours = (out_dir / PARTS / fingerprint[:16]).is_dir()  # a crash of this sweep between tables and summary
        if tables and not ours and not overwrite:
            raise SaveError(f"{out_dir} holds {tables} but no {SUMMARY}: these are not a sweep loop_lens finished "
                            "(or one with other settings that was interrupted); pass overwrite=True (--force) to replace "
                            "them, or choose another folder")
        return None
    previous = _summary_fingerprint(path)
    if previous is None:
        if not overwrite:
            raise SaveError(f"{path} is not the summary of a loop_lens sweep (no run.fingerprint in it); the sweep "
                            "will not replace a file it did not write: pass overwrite=True (--force), or choose another folder")
        return False
    if previous != fingerprint:
        return False
    return True if (out_dir / TABLE).is_file() and (out_dir / HEADS).is_file() else None


def _lock(out_dir: Path) -> Any:
    """Hold `out_dir` for this sweep (an exclusive lock on the folder itself, released when the
    process ends); SaveError at once when another sweep holds it. Returns the descriptor to close."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no lock
        return None
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SaveError(f"another sweep is writing into {out_dir} right now (it holds the folder); wait for it to "
                        "finish, or choose another --out") from None
    return fd


def load_sweep(out_dir: Union[str, Path]) -> SweepResult:
    """A finished sweep read back from its directory; SaveError when it is missing or incomplete."""
    out_dir = Path(out_dir)
    if not (out_dir / SUMMARY).is_file():
        raise SaveError(f"{out_dir} holds no finished sweep (no {SUMMARY}; an interrupted sweep leaves none)")
    summary = read_json(out_dir / SUMMARY, "sweep summary")
    return SweepResult(table=pd.read_parquet(out_dir / TABLE, engine="pyarrow"),
                       heads=pd.read_parquet(out_dir / HEADS, engine="pyarrow"), summary=summary, out_dir=out_dir)


# ---------------------------------------------------------------------------- the sweep
def run_sweep(
    model_or_path: Any,
    prompts: Prompts,
    n_loops: Optional[int],
    out_dir: Union[str, Path],
    *,
    batch_size: int = 8,
    seed: int = 0,
    lens: str = "logit",
    tol: float = 1e-3,
    attention_tol: float = 1e-2,
    family: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SweepResult:
    """Run the streaming analyses over `prompts` and write the tables under `out_dir`.

    `model_or_path`: a loaded model, or anything `ll.load` takes (then each rank loads it onto its
    own GPU when there are GPUs). Prompts are analysed in chunks of `batch_size` (right-padded, the
    padding masked); `seed` fixes every prompt's random start state. Under torchrun the chunks are
    shared round-robin across ranks and rank 0 merges. An existing finished sweep with the same
    settings is returned as it is; a different one is refused unless `overwrite=True`.
    """
    if n_loops is not None:
        positive_int(n_loops, "n_loops")
    batch_size = positive_int(batch_size, "batch_size")
    seed = check_seed(seed)
    for name, value in (("tol", tol), ("attention_tol", attention_tol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not isinstance(lens, str) or lens not in ("logit", "coda"):
        raise ValueError(f"lens must be 'logit' or 'coda', got {lens!r}")
    items = prompt_list(prompts)
    out_dir = _check_out_dir(out_dir)

    lock = None
    rank, world, started = _distributed()
    try:
        if isinstance(model_or_path, (str, os.PathLike)):
            model_name = str(model_or_path)
            model = load(model_or_path, family=family, dtype=dtype, device=_rank_device())
        else:
            if not (hasattr(model_or_path, "cfg") and hasattr(model_or_path, "run_with_hooks")):
                raise TypeError(f"model_or_path must be a looped model or a checkpoint path, got {type(model_or_path).__name__}")
            model, model_name = model_or_path, type(model_or_path).__name__
        if isinstance(items[0], str) and model.tokenizer is None:
            raise LoadError(f"{model_name} carries no tokenizer; give the prompts as token ids")
        T = check_n_loops(n_loops, model.cfg.default_loops)
        settings = {"n_loops": T, "batch_size": batch_size, "seed": seed, "lens": lens, "tol": float(tol),
                    "attention_tol": float(attention_tol), "format": FORMAT_VERSION}
        fingerprint = _fingerprint(settings, _model_identity(model), items)
        if rank == 0:
            lock = _lock(out_dir)
        done = _finished(out_dir, fingerprint, overwrite)
        if done is False and not overwrite:
            raise SaveError(f"{out_dir} holds a finished sweep with other settings, model or prompts; "
                            "pass overwrite=True (--force) to replace it")
        if done is True:
            return load_sweep(out_dir)
        part_dir = out_dir / PARTS / fingerprint[:16]
        part_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:  # an older sweep, or tables a crash left without their summary, must go
            for name in (SUMMARY, TABLE, HEADS):
                (out_dir / name).unlink(missing_ok=True)

        chunks = [(s, min(s + batch_size, len(items))) for s in range(0, len(items), batch_size)]
        mine = [c for i, c in enumerate(chunks) if i % world == rank]
        todo = [c for c in mine if not _part_paths(part_dir, *c)[0].is_file()]
        bar = tqdm(total=sum(e - s for s, e in mine), initial=sum(e - s for s, e in mine) - sum(e - s for s, e in todo),
                   desc=f"sweep (rank {rank}/{world})", unit="prompt", disable=not progress or rank != 0)
        for start, end in todo:
            table, heads = _analyse_chunk(model, items[start:end], start, settings)
            main, head = _part_paths(part_dir, start, end)
            _write_parquet(heads, head)
            _write_parquet(table, main)  # the chunk's commit point
            bar.update(end - start)
        bar.close()
        _barrier(world)  # raises when a rank died: nothing is merged
        resumed = _total(len(mine) - len(todo), world)
        if rank == 0:
            run = {"model": model_name, "n_prompts": len(items), "world_size": world, "fingerprint": fingerprint,
                   "n_chunks": len(chunks), "resumed_chunks": resumed, **settings}
            _merge(out_dir, part_dir, chunks, T, model.cfg.n_block, model.cfg.n_heads, run)
        _barrier(world)
        return load_sweep(out_dir)
    finally:
        if lock is not None:
            os.close(lock)
        if started:
            dist.destroy_process_group()
