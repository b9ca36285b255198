"""Writing key and certificate files: atomic, with the right permissions, never over old ones."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from common.data.storefiles import DataError, atomic_write_bytes


def write_private(path: Path, data: bytes) -> None:
    """Atomic write, readable by the owner only (mkstemp's 0600 survives the rename)."""
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Atomic write, readable by everyone (a certificate or public key is no secret)."""
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def refuse_overwrite(paths: Iterable[Path]) -> None:
    """Raise DataError naming the first of ``paths`` that already exists.

    Keys are never replaced in place: a new CA or node key silently locks stores out.
    """
    for path in paths:
        if Path(path).exists():
            raise DataError(f"{path}: already exists; keys and certificates are never replaced in place. "
                            "Move the old files away (and re-issue or re-register what depended on them), "
                            "or choose another --out")


T = TypeVar("T")


def writing(out: str, make: Callable[[], T]) -> T:
    """Run a key-writing function; a directory that cannot be written is a one-line error
    (DataError) that names it."""
    try:
        return make()
    except OSError as exc:
        raise DataError(f"{out}: cannot write there ({exc.strerror}); choose another --out") from None
