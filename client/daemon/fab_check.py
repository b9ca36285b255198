"""What a store checks about a run's FAB before its own, installed ClientApp answers (issue 14, item 2).

A store never executes code from a FAB (client/daemon/pinned_exec.py runs the storefed installed
at the store). It only reads two facts from the FAB, as data: the app's name and version
in its pyproject.toml, and the FAB's SHA-256. The name and version tell whether the
server's storefed speaks the same wire as the store's; the hash must be the one the
operator signed (run config ``run-fab-hash``), so a run started with any other app —
even one claiming the same publisher, name and version — is refused.

Pure: the FAB arrives as bytes; nothing is written or imported.
"""

from __future__ import annotations

import hashlib
import io
import re
import tomllib
import zipfile
from dataclasses import dataclass
from typing import Any, Mapping

from common.privacy.run_signature import FAB_HASH_KEY

APP_NAME = "storefed"
MAX_PYPROJECT_BYTES = 1 << 20  # a FAB's pyproject.toml larger than this is not ours


class FabRefused(Exception):
    """The run's app is not one this store answers; the message is the reason."""


@dataclass(frozen=True)
class FabIdentity:
    name: str
    version: str
    publisher: str


def fab_identity(content: bytes) -> FabIdentity:
    """Name, version and publisher from the pyproject.toml inside a FAB (a zip archive)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            info = fab.getinfo("pyproject.toml")
            if info.file_size > MAX_PYPROJECT_BYTES:
                raise FabRefused("the run's FAB has an oversized pyproject.toml")
            project = tomllib.loads(fab.read(info).decode("utf-8"))
    except FabRefused:
        raise
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError):
        raise FabRefused("the run's FAB is not a Flower app archive with a readable pyproject.toml") from None
    meta = project.get("project", {}) if isinstance(project.get("project"), dict) else {}
    tool = project.get("tool", {}).get("flwr", {}).get("app", {}) if isinstance(project.get("tool"), dict) else {}
    return FabIdentity(str(meta.get("name", "")), str(meta.get("version", "")),
                       str(tool.get("publisher", "")) if isinstance(tool, dict) else "")


def _release(version: str) -> tuple[int, ...] | None:
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(?:[.+-]?\w*)*", version.strip())
    return tuple(int(p) for p in match.groups() if p is not None) if match else None


def wire_compatible(server: str, store: str) -> bool:
    """Same wire: equal major and minor version (0.1.0 and 0.1.3 speak the same; 0.1 and 0.2 don't).

    A change of what a store sends or accepts (common/exchange/wire.py, the run-config keys,
    the model's shape) bumps the minor version at least."""
    a, b = _release(server), _release(store)
    return a is not None and b is not None and a[:2] == b[:2]


def check_fab(fab_hash: str, content: bytes, run_config: Mapping[str, Any], installed_version: str) -> FabIdentity:
    """Raise FabRefused unless the FAB is storefed at a wire-compatible version and is the FAB
    the run's signature names; returns what the FAB claims to be."""
    actual = hashlib.sha256(content).hexdigest()
    if actual != fab_hash:
        raise FabRefused(f"the run's FAB does not match its own hash ({fab_hash[:12]} announced, {actual[:12]} received)")
    ident = fab_identity(content)
    if ident.name != APP_NAME:
        raise FabRefused(f"the run's app is '{ident.name}', not {APP_NAME}; this store answers only {APP_NAME}")
    if not wire_compatible(ident.version, installed_version):
        raise FabRefused(f"the server runs {APP_NAME} {ident.version or '(no version)'} and this store runs "
                         f"{APP_NAME} {installed_version}: their wire formats differ; update the older side")
    signed = run_config.get(FAB_HASH_KEY, "")
    if not isinstance(signed, str) or not signed:
        raise FabRefused("the run is not signed (no run-fab-hash in its run config); start runs with 'storefed train'")
    if signed != actual:
        raise FabRefused(f"the run's app (FAB {actual[:12]}) is not the app the operator signed (FAB {signed[:12]}); "
                         "this store runs only its own installed storefed, for the signed app")
    return ident
