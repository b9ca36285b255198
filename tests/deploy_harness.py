"""The deployment test's process helpers: they are product code now (simulations/deploy/processes.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from simulations.deploy.processes import BIN, Processes, alive, descendants, free_port, start_time, wait_for  # noqa: F401

DEPLOYMENT_BINARIES = ("flower-superlink", "flower-supernode", "flwr")


def in_ci() -> bool:
    """CI sets CI=true (any value but empty, 0 or false counts)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_deployment_binaries(bin_dir: Path = BIN) -> None:
    """Skip (on a developer's machine) or fail (in CI) when Flower's binaries are missing.

    storefed starts them from ``bin_dir`` (next to this Python, simulations/deploy/processes.py); one
    found only elsewhere on PATH (shutil.which) would not be the one started, which is a
    failure wherever it happens, not a reason to skip the only tests of `train`,
    `store-exec` and the attacks.
    """
    missing = [name for name in DEPLOYMENT_BINARIES if not (Path(bin_dir) / name).exists()]
    if not missing:
        return
    elsewhere = {name: shutil.which(name) for name in missing}
    found = {name: path for name, path in elsewhere.items() if path}
    if found:
        pytest.fail(f"{', '.join(found)} found at {', '.join(found.values())} but not in {bin_dir}, where "
                    "storefed starts them: install flwr into this Python's environment", pytrace=False)
    reason = f"needs Flower's {', '.join(missing)} in {bin_dir} (pip install -e \".[test]\" installs them)"
    if in_ci():
        pytest.fail(f"CI: {reason}; the deployment tests must run in CI, not skip", pytrace=False)
    pytest.skip(reason)
