"""Output folders are written aside and renamed into place only when complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from step3_edge.errors import Step3EdgeError


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


@contextmanager
def staged_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success rename it to `out`.

    A staging folder left by an interrupted run is removed first (the run starts clean), so a
    folder named `out` only ever exists complete. On error the staging folder is removed.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise Step3EdgeError(f"output folder {out} already exists",
                             "choose another --out, or pass --force to replace it")
    tmp = partial_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
