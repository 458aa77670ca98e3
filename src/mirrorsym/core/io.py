"""Durable files: one atomic-write helper, moving damaged files aside, hashing a source tree.

Every store mirrorsym keeps on disk (sweep chunks and their checksums, ``sweep.json``, an experiment's
``results.json``) is written with :func:`atomic_write`: the bytes go to a temporary file
``.<name>.<pid>.tmp`` in the same directory, which is flushed and fsynced, renamed over the target with
``os.replace`` (atomic on POSIX) and then the directory is fsynced so that the rename itself survives a
power cut. A reader therefore sees the old file or the new one, never a mix, whatever kills the writer.
Temporaries left by a killed writer carry its pid, so :func:`remove_stale_temporaries` can tell them
from those of a writer that is still running.

This module is stdlib only: it is the lowest layer and both ``sweep`` and ``report`` build on it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"
CORRUPT_SUFFIX = ".corrupt"


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory, so that renames and new names in it are durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Replace ``path`` atomically and durably by ``data``.

    ``data`` is bytes, text (written as UTF-8) or a function ``write(binary_file)``. The file and its
    directory are fsynced before this returns; on any error the temporary file is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that owns the temporary file ``.<name>.<pid>.tmp`` still runs."""
    try:
        pid = int(tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[1])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete the temporaries of :func:`atomic_write` in ``directory`` whose writer no longer runs."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for tmp in directory.glob(f".*{TMP_SUFFIX}"):
        if not _writer_alive(tmp):
            tmp.unlink(missing_ok=True)


def move_aside(path: str | os.PathLike) -> Path | None:
    """Rename a damaged file to ``<name>.corrupt`` (``<name>.corrupt.1``, … if taken) and return the new
    path, keeping it for inspection instead of deleting it; None if ``path`` is already gone (another
    process moved it first)."""
    path = Path(path)
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    i = 0
    while target.exists():
        i += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{i}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    fsync_dir(path.parent)
    return target


def source_tree_hash(root: str | os.PathLike, suffix: str = ".py") -> str:
    """sha256 (hex) over the relative path and bytes of every ``*<suffix>`` file under ``root``, in sorted
    order (``__pycache__`` skipped): any edited, added, removed or renamed source file changes it."""
    root = Path(root)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob(f"*{suffix}") if "__pycache__" not in p.parts and p.is_file())
    for p in files:
        rel = p.relative_to(root).as_posix().encode()
        body = p.read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel + len(body).to_bytes(8, "little") + body)
    return h.hexdigest()
