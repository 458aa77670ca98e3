"""The results store: one Parquet file per finished chunk under ``<out_dir>/runs/``.

Layout::

    out_dir/sweep.json                 the sweep's name, metric names, record_every (checked on rerun)
    out_dir/runs/chunk-<hash>.parquet  one row per run of a finished chunk

A chunk file is written to a temporary name in the same directory, flushed, fsynced and renamed with
``os.replace`` (atomic on POSIX), so a ``kill -9`` leaves either the whole chunk or nothing. The
finished runs are the union of the ``run_id`` columns; a rerun trains only the others, so nothing is
lost or duplicated. Temporary files left by a killed writer are ignored and removed on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

META = "sweep.json"
RUNS = "runs"
TMP_SUFFIX = ".tmp"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that owns the temporary file ``.<name>.<pid>.tmp`` still runs."""
    try:
        pid = int(tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[1])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class ResultStore:
    """Append-only store of finished runs in ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.root = Path(out_dir)
        self.runs = self.root / RUNS

    def open(self, meta: Mapping) -> None:
        """Create the directories, or check that an existing store belongs to the same sweep."""
        self.runs.mkdir(parents=True, exist_ok=True)
        for stale in self.runs.glob(f".*{TMP_SUFFIX}"):
            if not _writer_alive(stale):
                stale.unlink(missing_ok=True)
        path = self.root / META
        if path.exists():
            old = json.loads(path.read_text())
            if old != dict(meta):
                raise ValueError(
                    f"mirrorsym.sweep: {self.root} holds results of a different sweep ({old}); this sweep is "
                    f"{dict(meta)}. Use another out_dir, or the same name/metrics/record_every to resume"
                )
        else:
            _atomic_write(path, lambda f: f.write(json.dumps(dict(meta), indent=1, sort_keys=True).encode()))

    def chunk_files(self) -> list[Path]:
        if not self.runs.is_dir():
            return []
        return sorted(self.runs.glob("chunk-*.parquet"))

    def finished_ids(self) -> set[str]:
        ids: set[str] = set()
        for f in self.chunk_files():
            ids.update(pq.read_table(f, columns=["run_id"]).column("run_id").to_pylist())
        return ids

    def write_chunk(self, rows: Sequence[Mapping]) -> Path:
        """Write the rows of one finished chunk atomically; the file name hashes its run ids."""
        ids = sorted(r["run_id"] for r in rows)
        name = hashlib.sha256(",".join(ids).encode()).hexdigest()[:16]
        path = self.runs / f"chunk-{name}.parquet"
        table = pa.Table.from_pylist([dict(r) for r in rows])
        _atomic_write(path, lambda f: pq.write_table(table, f))
        return path

    def load(self) -> pd.DataFrame:
        files = self.chunk_files()
        if not files:
            return pd.DataFrame()
        df = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
        dup = df["run_id"].duplicated()
        if dup.any():
            warnings.warn(f"mirrorsym.sweep: {int(dup.sum())} duplicated run ids in {self.root} "
                          "(two writers?); keeping the first of each", stacklevel=2)
            df = df[~dup]
        return df.sort_values("run_id", kind="stable").reset_index(drop=True)


def load_results(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Every finished run under ``out_dir`` as a DataFrame (one row per run, sorted by ``run_id``).

    Columns: ``run_id``; the config (lr, weight_decay, batch_size, momentum, seed, steps, options);
    ``status`` ("ok" | "diverged") and ``diverged_step`` (first failing step, −1 if ok); one column per
    metric (value at the final step; NaN if diverged); ``history_step`` and ``history_<metric>`` (lists).
    """
    root = Path(out_dir)
    if not (root / META).exists():
        raise FileNotFoundError(f"mirrorsym.sweep.load_results: {root} holds no sweep ({META} missing)")
    return ResultStore(root).load()
