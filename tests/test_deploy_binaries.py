"""The deployment tests' guard (tests/deploy_harness.py): a missing Flower binary skips them
on a developer's machine and fails them in CI; one only elsewhere on PATH fails everywhere."""

from __future__ import annotations

import shutil

import pytest

import deploy_harness
from deploy_harness import DEPLOYMENT_BINARIES, require_deployment_binaries


def _bin(tmp_path, names):
    for name in names:
        (tmp_path / name).write_text("#!/bin/sh\n")
    return tmp_path


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_in_ci_a_missing_binary_fails(tmp_path, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="CI: needs Flower's flower-superlink"):
        require_deployment_binaries(_bin(tmp_path, ["flwr", "flower-supernode"]))


@pytest.mark.parametrize("ci", [None, "", "0", "false"])
def test_elsewhere_a_missing_binary_skips(tmp_path, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="flower-superlink, flower-supernode, flwr"):
        require_deployment_binaries(tmp_path)


def test_a_binary_found_only_on_path_fails_even_outside_ci(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: f"/opt/elsewhere/{name}" if name == "flower-superlink" else None)
    with pytest.raises(pytest.fail.Exception, match="/opt/elsewhere/flower-superlink but not in"):
        require_deployment_binaries(_bin(tmp_path, ["flwr", "flower-supernode"]))


def test_all_binaries_present_passes_and_this_environment_has_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require_deployment_binaries(_bin(tmp_path, DEPLOYMENT_BINARIES)) is None
    # The project's own environment (pip install -e ".[test]") puts them next to its Python.
    assert all((deploy_harness.BIN / name).exists() for name in DEPLOYMENT_BINARIES)
