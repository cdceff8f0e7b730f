"""Files read from a checkpoint or bundle stay inside it; output folders are written aside and
renamed into place only when complete, and `--force` replaces only a folder this tool wrote."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from step3_edge.errors import Step3EdgeError

MAX_JSON_BYTES = 256 << 20       # config, index, manifest and tokenizer_config.json files
HUB_REPO_PREFIX = ("models--", "datasets--", "spaces--")


def link_root(folder: str | Path, hub: bool = True) -> Path:
    """The folder files of `folder` may resolve into: `folder` itself, or (`hub`) for a
    Hugging Face hub snapshot (`.../models--ORG--NAME/snapshots/<rev>/`, whose files link to
    `../../blobs/`) its repo cache folder `models--ORG--NAME`."""
    real = Path(folder).resolve()
    if hub and real.parent.name == "snapshots" and \
            real.parent.parent.name.startswith(HUB_REPO_PREFIX):
        return real.parent.parent
    return real


def confined(folder: str | Path, name: str, error: type[Step3EdgeError] = Step3EdgeError, *,
             hub: bool = True, what: str = "file") -> Path:
    """`folder/name` resolved (symbolic links followed), refusing a name that is not a plain
    relative path and a file that resolves outside `link_root(folder, hub)`."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or \
            Path(name).is_absolute() or ".." in Path(name).parts:
        raise error(f"{what} name {name!r} in {folder} points outside the folder (not a plain "
                    "relative path)",
                    "a file list (index or manifest) may only name files inside its folder, "
                    "without '..' or absolute paths; re-create the folder")
    try:
        root = link_root(folder, hub)
        full = (folder / name).resolve()
    except (OSError, RuntimeError) as e:        # a link loop, a name too long
        raise error(f"cannot resolve {what} {name!r} in {folder}: {e}",
                    "remove the broken symbolic link or re-create the folder") from e
    if full != root and root not in full.parents:
        where = "its folder or its Hugging Face hub repo cache" if hub else "its folder"
        raise error(f"{what} {name!r} of {folder} resolves to {full}, outside {where} ({root})",
                    "replace the symbolic link by the file itself, or copy the file into the "
                    "folder; links may only point inside the folder"
                    + (" (or, in a hub snapshot, into its models--ORG--NAME folder)" if hub
                       else ""))
    return full


def read_json(path: Path, error: type[Step3EdgeError], remedy: str,
              limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON content of `path`; any unreadable, oversized, non-UTF-8, malformed or absurdly
    nested file is `error` naming the file."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(f"{path} is {size:,} bytes, over the {limit:,} bytes a JSON file of "
                        "this kind may have", remedy)
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path} is not valid JSON: {type(e).__name__}: {e}", remedy) from e


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def files_under(folder: Path) -> list[str]:
    """Paths (relative, '/'-separated) of every file and link under `folder`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath).relative_to(folder)
        out += [(base / n).as_posix() for n in filenames]
        out += [(base / n).as_posix() for n in dirnames if (Path(dirpath) / n).is_symlink()]
    return sorted(out)


def _refuse_replace(out: Path, why: str) -> Step3EdgeError:
    return Step3EdgeError(f"--force will not replace {out}: {why}",
                          "choose another --out (a new folder, or a folder this tool wrote)")


def check_replaceable(out: Path, owned: Callable[[Path], str | None] | None,
                      sources: Sequence[Path] = ()) -> None:
    """Raise unless existing `out` may be replaced: a real folder (not a link, a file, the
    current folder or one above it, nor a source of this run or a folder holding one) that
    `owned` recognises (it returns None, or why the folder is not this tool's)."""
    if out.is_symlink() or not out.is_dir():
        raise _refuse_replace(out, "it is a file or a symbolic link, not a folder this tool "
                                   "wrote")
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise _refuse_replace(out, "it is the current folder or holds it")
    for src in sources:
        s = Path(src).resolve()
        if real == s or real in s.parents:
            raise _refuse_replace(out, f"it is (or holds) {src}, the input of this run")
    why = owned(out) if owned is not None else (
        None if not any(out.iterdir()) else "it is not empty")
    if why is not None:
        raise _refuse_replace(out, why)


@contextmanager
def staged_dir(out: str | Path, overwrite: bool = False,
               owned: Callable[[Path], str | None] | None = None,
               sources: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success rename it to `out`.

    A staging folder left by an interrupted run is removed first (the run starts clean), so a
    folder named `out` only ever exists complete. On error the staging folder is removed. An
    existing `out` is replaced only with `overwrite` and only when `check_replaceable` allows
    it (`owned` recognises what this tool wrote; `sources` are the run's inputs).
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise Step3EdgeError(f"output folder {out} already exists",
                                 "choose another --out, or pass --force to replace it")
        check_replaceable(out, owned, sources)
    tmp = partial_dir(out)
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    elif tmp.exists():
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
