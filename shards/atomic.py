"""Write a file under a temporary name and rename it, so a killed run never
leaves a half-written file under the final name (prep, folds, ensemble, pseudo)."""
from __future__ import annotations

import os
from typing import Callable


def write_atomic(path: str, write: Callable[[str], object]) -> str:
    """Call `write(tmp)` then rename tmp to `path`; on any error remove tmp and re-raise."""
    root, ext = os.path.splitext(str(path))
    tmp = f"{root}.{os.getpid()}.tmp{ext}"  # keep the extension: np.save appends .npy otherwise
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return str(path)
