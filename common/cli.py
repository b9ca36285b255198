"""What the commands of every audience share: the --json flag, the exit code of a user
mistake, and writing key files."""

from __future__ import annotations

from typing import Annotated, Callable, TypeVar

import typer

from common.data.storefiles import DataError

# A user mistake (bad path, missing column, bad value): one line on stderr, then this code.
EXIT_USAGE = 2

# Only `--json`: typer would otherwise add a `--no-json` that the command line never had.
Json = Annotated[bool, typer.Option("--json", help="print one JSON object")]

T = TypeVar("T")


def writing(out: str, make: Callable[[], T]) -> T:
    """Run a key-writing function; a directory that cannot be written is a one-line error."""
    try:
        return make()
    except OSError as exc:
        raise DataError(f"{out}: cannot write there ({exc.strerror}); choose another --out") from None
