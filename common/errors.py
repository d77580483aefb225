"""One error policy for every command line: bad input is one line and exit 2.

`BadInput` is the one type for input a person got wrong (a file, a row, a
key, an argument); its message names where and what, and says what to do.
Every package's own error type (ConfigError, MetadataError, StoreError,
ManifestError, InferError, PngError) derives from it, so one handler serves
all CLIs. Faults of the machine are one line too: a full disk or a read-only
or forbidden output (OSError ENOSPC, EDQUOT, EROFS, EACCES, EPERM) exits 2
naming the path, and Ctrl-C exits 130 in one line (every file is written
atomically, so what was finished is whole and a re-run resumes). Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Iterable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130   # the shell's code for a process ended by SIGINT
_MACHINE_FAULTS = {
    errno.ENOSPC: "free space on that disk (or write elsewhere) and run it again; what was "
                  "finished is kept and the run resumes",
    errno.EDQUOT: "free space within your quota (or write elsewhere) and run it again",
    errno.EROFS: "it is on a read-only file system; choose a writable output",
    errno.EACCES: "check its permissions, or choose an output you may write",
    errno.EPERM: "check its permissions, or choose an output you may write",
}


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
    except OSError as e:
        if e.errno not in _MACHINE_FAULTS:
            raise
        where = e.filename if e.filename is not None else "an output file"
        print(f"error: cannot write {where}: {e.strerror or os.strerror(e.errno)}; "
              f"{_MACHINE_FAULTS[e.errno]}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); files already written are whole, run the same "
              "command again to continue", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


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
