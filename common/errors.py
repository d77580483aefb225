"""One error policy for every command line: bad input is one line and exit 2.

`BadInput` is the one type for input a person got wrong (a file, a row, a
key, an argument); its message names where and what, and says what to do.
Every package's own error type (ConfigError, MetadataError, StoreError,
ManifestError, InferError, PngError) derives from it, so one handler serves
all CLIs. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterable

EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    """Input a user can fix; the message names the file, row or key and what is wrong.

    A ValueError so that library callers catching ValueError keep working; the
    CLIs catch only BadInput, never ValueError, so a real bug is not hidden."""


def run_cli(main: Callable[[], object]) -> object:
    """Call `main()`; a BadInput becomes `error: <message>` on stderr and exit 2."""
    try:
        return main()
    except BadInput as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def one_line(message: str) -> str:
    return " ".join(message.split())


def refuse_to_replace(paths: Iterable[str], what: str = "output") -> None:
    """Nothing a user has is overwritten: a BadInput naming the first of `paths` that exists
    (and how many more), unless the caller was given --overwrite and skips this check."""
    existing = [str(p) for p in paths if os.path.lexists(str(p))]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise BadInput(f"{existing[0]}{more}: {what} exists; give --overwrite to replace it, "
                       "or choose another output")
