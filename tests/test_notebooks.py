"""The examples run top to bottom and every check in them holds.

The notebooks are jupytext percent scripts (`examples/NN_*.py`): each is turned into a notebook and
executed by a Jupyter kernel, so a failed `assert` in any cell fails its test. The command-line
examples run as scripts, with small arguments where the full run is long. Both run torch on one
thread (`OMP_NUM_THREADS=1`): the models are tiny, and on a busy machine two threads that wait on
each other make them ten times slower.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import ROOT, require

EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("[0-9][0-9]_*.py"))
SCRIPTS = {"per_iteration_cache.py": [], "random_init_sweep.py": ["--seeds", "0", "--loops", "8"]}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def execute(path: Path, cwd: Path):
    """Execute a percent script as a notebook in `cwd`; raises CellExecutionError at the first failing cell."""
    jupytext, nbclient = require("jupytext"), require("nbclient")
    nb = jupytext.read(path, fmt="py:percent")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute(env={**os.environ, **ONE_THREAD})
    return nb


def test_every_example_is_executed_here():
    assert len(NOTEBOOKS) >= 5
    assert {p.name for p in EXAMPLES.glob("*.py")} == {p.name for p in NOTEBOOKS} | set(SCRIPTS)


# sae-lens requires transformer-lens<4: its notebook runs in the TransformerLens 3.9 environment (.ci/run builds it)
NEEDS_TL3 = {"08_sae_on_an_iteration"}
TL_MAJOR = int(version("transformer-lens").split(".")[0])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_its_asserts_hold(path, tmp_path):
    if path.stem in NEEDS_TL3 and TL_MAJOR >= 4:
        pytest.skip(f"sae-lens requires transformer-lens<4, this environment has {version('transformer-lens')}: "
                    "run it in the TransformerLens 3.9 environment (.ci/run builds .venv-tl39)")
    nb = execute(path, tmp_path)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))  # every cell ran, in order
    assert sum(cell.source.count("assert ") for cell in code) >= 3, "a notebook states its claims as asserts"
    assert any(cell.cell_type == "markdown" for cell in nb.cells)


def test_a_failed_assert_fails_the_notebook(tmp_path):
    nbclient = require("nbclient")
    source = tmp_path / "claims.py"
    source.write_text("# %% [markdown]\n# A false claim.\n\n# %%\nassert sum([0.5, 0.25]) == 1.0\n")
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="AssertionError"):
        execute(source, tmp_path)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_runs(name, tmp_path):
    command = [sys.executable, str(EXAMPLES / name), *SCRIPTS[name]]
    run = subprocess.run(command, cwd=tmp_path, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list(tmp_path.iterdir()), "an example writes nothing into the directory it runs in"
