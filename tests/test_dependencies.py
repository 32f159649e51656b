"""The test-dependency rule: a missing test dependency fails the suite in CI and is a skip, with
its reason, elsewhere; an installed module that is itself broken is never taken for a missing one."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import require

MISSING = "loop_lens_no_such_test_dependency"


def test_present_dependency_is_imported():
    assert require("json") is json


@pytest.mark.parametrize("ci", [None, "", "0", "false"])
def test_missing_dependency_is_a_skip_outside_ci(ci, monkeypatch):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING}.*not installed"):
        require(MISSING)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_dependency_fails_in_ci(ci, monkeypatch):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING}.*missing in CI"):
        require(MISSING)


def test_broken_dependency_raises_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "broken_dependency.py").write_text(f"import {MISSING}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_dependency", raising=False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(ModuleNotFoundError, match=MISSING):
        require("broken_dependency")
