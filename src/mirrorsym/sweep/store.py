"""The results store: one checksummed Parquet file per finished chunk, claims, and ``sweep.json``.

Layout::

    out_dir/sweep.json                        the sweep's name, metric names, record_every (checked on
                                              rerun) and the fingerprint of its inputs (data, model
                                              factory, loss, metrics, mirrorsym version), with a sha256
                                              of its own content
    out_dir/runs/chunk-<hash>.parquet         one row per run of a finished chunk; <hash> hashes its run ids
    out_dir/runs/chunk-<hash>.parquet.sha256  the chunk's checksum: size, sha256, run ids, fingerprint id
    out_dir/runs/chunk-<hash>.claim           held (flock) by the process training that chunk right now
    out_dir/runs/*.corrupt                    damaged files moved aside (kept for inspection, never read)

**Durability.** Every file is written by :func:`mirrorsym.core.io.atomic_write` (temporary file,
fsync, ``os.replace``, fsync of the directory), so a ``kill -9`` leaves each file whole or absent. The
checksum is written *before* its chunk: a chunk file never exists without the checksum that vouches
for it unless something outside mirrorsym deleted it.

**Healing.** Every chunk is verified before its runs count as finished: its checksum file must exist
and match the chunk's size and sha256, and the Parquet table must hold the expected columns and exactly
the run ids its checksum lists. A chunk that fails (truncated, bytes changed, checksum deleted, not
Parquet) is reported by name in a warning, moved aside to ``<name>.corrupt`` and its runs are simply
not finished, so the same ``Sweep.run`` trains them again. A damaged ``sweep.json`` is reported, moved
aside and rewritten. Verification results are cached per file (size, mtime, inode), so rescanning a
large store only reads new or changed files.

**Concurrency.** A process trains a chunk only while it holds the chunk's claim: an exclusive
``flock`` on ``chunk-<hash>.claim`` (created if needed, holding the owner's pid and host for messages).
The kernel drops the lock when its process dies, ``kill -9`` included, so a claim left behind by a dead
process is simply taken over and pid reuse cannot keep it alive. Two processes on one directory thus
split the chunks between them; see :meth:`ResultStore.claim`. Without ``fcntl`` (not POSIX) a claim is a
file created with ``O_CREAT | O_EXCL`` holding the pid, taken over when that pid no longer runs.

**Where.** ``out_dir`` is a local path, a ``file://`` URL (the same local store), or any other URL that
pyarrow (``s3://``, ``gs://``, ``hdfs://``, …) or fsspec (``memory://``, ``gcs://``, ``abfs://``, …, if
installed) opens: a *remote* store. It keeps the layout, the checksums and the healing above; each file
is written to a temporary name and then moved into place (on object stores the final object appears
whole or not at all). What it cannot keep: ``flock`` claims and fsync. So one process at a time should
run a sweep into a remote store; a second one duplicates work rather than corrupting anything (the
chunks are deterministic, and a mismatched chunk/checksum pair is detected and retrained).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import posixpath
import socket
import urllib.parse
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeAlias, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.io import CORRUPT_SUFFIX, TMP_SUFFIX, atomic_write, move_aside, remove_stale_temporaries
from .config import STANDARD

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    HAVE_FCNTL = False
else:
    HAVE_FCNTL = True

META = "sweep.json"
RUNS = "runs"
CHUNK_SUFFIX = ".parquet"
SUM_SUFFIX = ".sha256"
CLAIM_SUFFIX = ".claim"
FORMAT = 1
BASE_COLUMNS = ("run_id", "status", "diverged_step", "history_step", *STANDARD)


def chunk_name(run_ids: Iterable[str]) -> str:
    """``chunk-<16 hex>``: sha256 of the sorted run ids, so every process names a chunk alike."""
    return "chunk-" + hashlib.sha256(",".join(sorted(run_ids)).encode()).hexdigest()[:16]


def _content_sha(meta: Mapping) -> str:
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ChunkInfo:
    """What a verified chunk's checksum file says about it."""

    path: StorePath
    run_ids: tuple[str, ...]
    fingerprint: str | None


class DamagedFile(Exception):
    """A store file failed verification; the message says why."""


class Claim:
    """A held chunk claim; :meth:`release` (or process death) frees it. ``fd == -1``: a claim that holds
    nothing (file locking unavailable)."""

    def __init__(self, path: StorePath, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd < 0:
            return
        path = _local(self.path)  # a claim that holds a lock is a local file
        # unlink while still locked: whoever opened the old file sees that it is gone and retries
        try:
            if os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1


class RemotePath:
    """A file or folder on a ``pyarrow.fs`` filesystem with the few ``pathlib.Path`` methods the store
    uses; ``str()`` gives its URL (for messages)."""

    def __init__(self, fs, path: str, url: str):
        self.fs, self.path, self.url = fs, path.rstrip("/") or "/", url.rstrip("/")

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.fs, posixpath.join(self.path, name), f"{self.url}/{name}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, posixpath.dirname(self.path), self.url.rsplit("/", 1)[0])

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.create_dir(self.path, recursive=parents)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def glob(self, pattern: str) -> list[RemotePath]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((self / posixpath.basename(i.path) for i in infos
                       if i.type == pafs.FileType.File and fnmatch.fnmatchcase(posixpath.basename(i.path), pattern)),
                      key=str)

    def iterdir(self) -> list[RemotePath]:
        return self.glob("*")

    def stat_key(self) -> tuple | None:
        """(size, mtime) if the filesystem reports an mtime, else None (then nothing is cached)."""
        info = self._info()
        if info.size is None:
            raise FileNotFoundError(self.url)
        return None if info.mtime_ns is None else (info.size, info.mtime_ns)

    def replace_with(self, data: bytes) -> None:
        """Write ``data`` to a temporary name beside this file, then move it into place."""
        tmp = self.with_name(f".{self.name}.{os.getpid()}{TMP_SUFFIX}")
        tmp.write_bytes(data)
        self.fs.move(tmp.path, self.path)

    def move_aside(self) -> RemotePath | None:
        """:func:`mirrorsym.core.io.move_aside` for a remote file."""
        target = self.with_name(self.name + CORRUPT_SUFFIX)
        i = 0
        while target.exists():
            i += 1
            target = self.with_name(f"{self.name}{CORRUPT_SUFFIX}.{i}")
        try:
            self.fs.move(self.path, target.path)
        except FileNotFoundError:
            return None
        return target


StorePath: TypeAlias = "Path | RemotePath"
"""Where the store keeps a file or folder: a local path, or one on a remote filesystem."""

_RenamableT = TypeVar("_RenamableT", bound="_Renamable")


class _Renamable(Protocol):
    """A path that names a sibling of the same kind: ``pathlib.Path`` and :class:`RemotePath`."""

    @property
    def name(self) -> str: ...

    def with_name(self: _RenamableT, name: str) -> _RenamableT: ...


def _local(path: StorePath) -> Path:
    """``path`` of a local store (the callers check ``ResultStore.remote`` first)."""
    if isinstance(path, RemotePath):
        raise TypeError(f"mirrorsym.sweep: {path} is on a remote filesystem; this step needs a local store")
    return path


def store_location(out_dir: str | os.PathLike) -> StorePath:
    """A local ``Path`` for a path or ``file://`` URL, else a :class:`RemotePath` opened with pyarrow, or
    with fsspec for schemes pyarrow does not know."""
    if not isinstance(out_dir, str) or "://" not in out_dir:
        return Path(out_dir)
    parsed = urllib.parse.urlparse(out_dir)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"mirrorsym.sweep: {out_dir!r} names a file on another host; use a path on this "
                             "machine (file:///path) or a remote filesystem URL")
        return Path(urllib.parse.unquote(parsed.path))
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(out_dir)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as arrow_error:
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"mirrorsym.sweep: pyarrow cannot open {out_dir!r} ({arrow_error}); for other "
                             "filesystems install fsspec and its backend (pip install fsspec s3fs ...)") from None
        try:
            fs_fsspec, path = fsspec.core.url_to_fs(out_dir)
        except Exception as exc:
            raise ValueError(f"mirrorsym.sweep: cannot open the store {out_dir!r}: pyarrow says {arrow_error}; "
                             f"fsspec says {exc}") from exc
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs_fsspec))
    return RemotePath(fs, path, out_dir)


def _write(path: StorePath, data: bytes | str) -> None:
    if isinstance(path, RemotePath):
        path.replace_with(data.encode() if isinstance(data, str) else data)
    else:
        atomic_write(path, data)


def _move_aside(path: StorePath) -> StorePath | None:
    return path.move_aside() if isinstance(path, RemotePath) else move_aside(path)


class ResultStore:
    """Append-only, self-verifying store of finished runs in ``out_dir`` (see the module docstring): a
    local path, a ``file://`` URL or a pyarrow/fsspec filesystem URL."""

    def __init__(self, out_dir: str | os.PathLike):
        self.root: StorePath = store_location(out_dir)
        self.remote = isinstance(self.root, RemotePath)
        self.runs = self.root / RUNS
        self.meta: dict | None = None
        self._stored_meta: dict | None = None
        self._verified: dict[StorePath, tuple[tuple | None, ChunkInfo]] = {}
        self._warned_no_locks = False

    # ------------------------------------------------------------------ sweep.json
    def read_meta(self, heal: bool = True) -> dict | None:
        """The stored ``sweep.json`` (None if there is none). A damaged one (not JSON, or its sha256 does
        not match) is reported and moved aside when ``heal``, else raises ``ValueError``."""
        path = self.root / META
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict):
                raise DamagedFile("it is not a JSON object")
            if "sha256" in meta and meta["sha256"] != _content_sha(meta):
                raise DamagedFile("its content does not match its sha256")
        except (ValueError, DamagedFile) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = f"{exc}" if isinstance(exc, DamagedFile) else f"not valid JSON: {exc}"
            if not heal:
                raise ValueError(f"mirrorsym.sweep: {path} is damaged ({reason}); rerun the sweep to rebuild "
                                 "it (its verified chunks are kept)") from exc
            moved = _move_aside(path)
            warnings.warn(f"mirrorsym.sweep: {path} is damaged ({reason}); moved it aside to {moved} and "
                          "writing a new one (the chunks keep their own checksums and are reused)",
                          stacklevel=3)
            return None
        return meta

    def open(self, meta: Mapping, write: bool = True) -> dict | None:
        """Create the directories, tidy what killed processes left, check that an existing store belongs
        to the same sweep, and record ``meta`` (``write=False``: only in memory until
        :meth:`write_meta`, e.g. once a trial step has shown that these inputs work). Returns the
        previous ``sweep.json`` (None if new/damaged).

        ``meta["fingerprint"]["id"]`` (if given) is written into every chunk's checksum, so that
        :func:`load_results` returns the rows of the inputs the store was last run with. Keys other than
        ``fingerprint`` must equal the stored ones (else ``ValueError``: another sweep's directory).
        """
        self.runs.mkdir(parents=True, exist_ok=True)
        if not self.remote:  # remote: no pids to check and no claims to tidy (see the module docstring)
            remove_stale_temporaries(_local(self.root))
            remove_stale_temporaries(_local(self.runs))
            self._tidy_claims_and_checksums()
        old = self.read_meta()
        ident = {k: v for k, v in meta.items() if k != "fingerprint"}
        if old is not None:
            old_ident = {k: v for k, v in old.items() if k not in ("fingerprint", "sha256")}
            if old_ident != ident:
                raise ValueError(
                    f"mirrorsym.sweep: {self.root} holds results of a different sweep ({old_ident}); this sweep "
                    f"is {ident}. Use another out_dir, or the same name/metrics/record_every to resume"
                )
        new = dict(meta)
        new["sha256"] = _content_sha(new)
        self.meta, self._stored_meta = new, old
        if write:
            self.write_meta()
        return old

    def write_meta(self) -> None:
        """Write the ``meta`` given to :meth:`open` to ``sweep.json`` (if it differs from the file)."""
        if self.meta is not None and self.meta != self._stored_meta:
            _write(self.root / META, json.dumps(self.meta, indent=1, sort_keys=True))
            self._stored_meta = self.meta

    @property
    def fingerprint(self) -> str | None:
        return ((self.meta or {}).get("fingerprint") or {}).get("id")

    def _tidy_claims_and_checksums(self) -> None:
        """Remove claims of dead processes and checksum files whose chunk was never renamed into place
        (the writer died in between), each only once its claim is free (no live writer)."""
        for stale in self.runs.glob(f"chunk-*{CLAIM_SUFFIX}"):
            claim = self._claim_path(stale)
            if claim is not None:
                claim.release()
        for orphan in self.runs.glob(f"chunk-*{CHUNK_SUFFIX}{SUM_SUFFIX}"):
            chunk = orphan.with_name(orphan.name[: -len(SUM_SUFFIX)])
            if chunk.exists():
                continue
            claim = self._claim_path(self.runs / (chunk.name[: -len(CHUNK_SUFFIX)] + CLAIM_SUFFIX))
            if claim is not None:
                try:
                    if not chunk.exists():
                        orphan.unlink(missing_ok=True)
                finally:
                    claim.release()

    # ------------------------------------------------------------------ claims
    def claim(self, run_ids: Iterable[str]) -> Claim | None:
        """Claim the chunk of ``run_ids`` for this process: a :class:`Claim` to release when its file is
        written, or None if a live process holds it. The caller must then check :meth:`has_chunk`: the
        previous holder may have finished it just before."""
        return self._claim_path(self.runs / (chunk_name(run_ids) + CLAIM_SUFFIX))

    def _claim_path(self, store_path: StorePath) -> Claim | None:
        if self.remote:  # no locks on remote filesystems: a claim that holds nothing
            return Claim(store_path, -1)
        path = _local(store_path)
        if not HAVE_FCNTL:  # pragma: no cover - not POSIX
            return self._claim_exclusive(path)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as exc:  # a file system without locks (some network or FUSE mounts)
                os.close(fd)
                path.unlink(missing_ok=True)
                if not self._warned_no_locks:
                    self._warned_no_locks = True
                    warnings.warn(f"mirrorsym.sweep: cannot lock files in {self.runs} ({exc}); chunk claims are "
                                  "off, so do not run two processes on this directory at once", stacklevel=4)
                return Claim(path, -1)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its previous holder had already removed: open the current one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return Claim(path, fd)

    def _claim_exclusive(self, path: Path) -> Claim | None:  # pragma: no cover - not POSIX
        for _ in range(2):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = claim_owner(path)
                if owner is None or _pid_alive(owner[0]):
                    return None
                path.unlink(missing_ok=True)  # the owner died: take the claim over
                continue
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            return Claim(path, fd)
        return None

    def claim_owners(self, run_ids_of_chunks: Iterable[Iterable[str]]) -> list[str]:
        """``"pid P on HOST"`` for each chunk claim that exists (for waiting messages)."""
        owners: list[str] = []
        if self.remote:
            return owners
        for ids in run_ids_of_chunks:
            owner = claim_owner(_local(self.runs) / (chunk_name(ids) + CLAIM_SUFFIX))
            if owner is not None:
                owners.append(f"pid {owner[0]} on {owner[1]}")
        return sorted(set(owners))

    # ------------------------------------------------------------------ chunks
    def chunk_path(self, run_ids: Iterable[str]) -> StorePath:
        return self.runs / (chunk_name(run_ids) + CHUNK_SUFFIX)

    def has_chunk(self, run_ids: Iterable[str]) -> bool:
        return self.chunk_path(run_ids).exists()

    def chunk_files(self) -> list[StorePath]:
        if not self.runs.is_dir():
            return []
        return sorted(self.runs.glob(f"chunk-*{CHUNK_SUFFIX}"))

    def write_chunk(self, rows: Sequence[Mapping]) -> StorePath:
        """Write the rows of one finished chunk: its checksum file first, then the chunk, each atomically."""
        ids = sorted(r["run_id"] for r in rows)
        path = self.chunk_path(ids)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([dict(r) for r in rows]), buf)
        data = buf.getvalue()
        checksum = {"format": FORMAT, "file": path.name, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "run_ids": ids, "fingerprint": self.fingerprint}
        _write(_sum_path(path), json.dumps(checksum, indent=1))
        _write(path, data)
        return path

    def _verify(self, path: StorePath) -> ChunkInfo:
        """Check one chunk against its checksum file and the expected schema; raise DamagedFile."""
        sum_path = _sum_path(path)
        try:
            checksum = json.loads(sum_path.read_text())
            ids = tuple(checksum["run_ids"])
            size, sha = int(checksum["bytes"]), str(checksum["sha256"])
        except FileNotFoundError as exc:
            raise DamagedFile(f"its checksum file {sum_path.name} is missing") from exc
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise DamagedFile(f"its checksum file {sum_path.name} is damaged ({exc!r})") from exc
        data = path.read_bytes()
        if len(data) != size:
            raise DamagedFile(f"it has {len(data)} bytes, its checksum file says {size} (truncated?)")
        if hashlib.sha256(data).hexdigest() != sha:
            raise DamagedFile("its sha256 does not match its checksum file (bytes changed)")
        if chunk_name(ids) + CHUNK_SUFFIX != path.name:
            raise DamagedFile("its name does not hash the run ids its checksum file lists")
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as exc:  # pyarrow raises several types for bad Parquet
            raise DamagedFile(f"it is not readable Parquet ({exc})") from exc
        metrics = (self.meta or {}).get("metrics", [])
        expected = [*BASE_COLUMNS, *metrics, *(f"history_{m}" for m in metrics)]
        if (self.meta or {}).get("keep_params"):
            expected.append("final_params")
        missing = [c for c in expected if c not in table.column_names]
        if missing:
            raise DamagedFile(f"it lacks the columns {missing}")
        if not pa.types.is_string(table.schema.field("run_id").type) and \
                not pa.types.is_large_string(table.schema.field("run_id").type):
            raise DamagedFile(f"its run_id column has type {table.schema.field('run_id').type}, not string")
        if sorted(table.column("run_id").to_pylist()) != sorted(ids):
            raise DamagedFile("its run ids differ from those its checksum file lists")
        return ChunkInfo(path, ids, checksum.get("fingerprint"))

    def scan(self) -> list[ChunkInfo]:
        """Every verified chunk. Damaged ones are reported (warning naming the file and why), moved aside
        to ``<name>.corrupt`` with their checksum file, and left out, so their runs count as not done."""
        good: list[ChunkInfo] = []
        seen: set[StorePath] = set()
        for path in self.chunk_files():
            seen.add(path)
            try:
                key = _stat_key(path)
                cached = self._verified.get(path)
                if cached is not None and key is not None and cached[0] == key:
                    good.append(cached[1])
                    continue
                info = self._verify(path)
            except FileNotFoundError:  # moved aside or replaced by another process meanwhile
                continue
            except DamagedFile as exc:
                self._move_aside(path, str(exc))
                continue
            self._verified[path] = (key, info)
            good.append(info)
        for gone in set(self._verified) - seen:
            del self._verified[gone]
        return good

    def _move_aside(self, path: StorePath, reason: str) -> None:
        moved = _move_aside(path)
        if moved is None:
            return  # another process got there first and reported it
        sum_path = _sum_path(path)
        moved_sum = _move_aside(sum_path) if sum_path.exists() else None
        also = f" (and its checksum file to {moved_sum.name})" if moved_sum else ""
        warnings.warn(f"mirrorsym.sweep: chunk file {path} is damaged ({reason}); moved it aside to {moved.name}"
                      f"{also}; its runs will be trained again", stacklevel=4)
        self._verified.pop(path, None)

    def finished_ids(self) -> set[str]:
        """Run ids of every verified chunk (whatever fingerprint: ids already hash it)."""
        return {rid for info in self.scan() for rid in info.run_ids}

    def load(self, fingerprint: str | None = None, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Rows of the verified chunks, sorted by ``run_id``; only those written under ``fingerprint``
        and/or holding one of ``run_ids`` if given."""
        wanted = None if run_ids is None else set(run_ids)
        tables = []
        for info in self.scan():
            if fingerprint is not None and info.fingerprint != fingerprint:
                continue
            if wanted is not None and wanted.isdisjoint(info.run_ids):
                continue
            try:
                source = pa.BufferReader(info.path.read_bytes()) if self.remote else info.path
                tables.append(pq.read_table(source).to_pandas())
            except FileNotFoundError:
                continue  # moved aside by another process since the scan; its runs get retrained
        if not tables:
            return pd.DataFrame()
        df = pd.concat(tables, ignore_index=True)
        dup = df["run_id"].duplicated()
        if dup.any():
            warnings.warn(f"mirrorsym.sweep: {int(dup.sum())} duplicated run ids in {self.root} "
                          "(two writers with different chunk sizes?); keeping the first of each", stacklevel=2)
            df = df[~dup]
        return df.sort_values("run_id", kind="stable").reset_index(drop=True)


def _sum_path(chunk: _RenamableT) -> _RenamableT:
    return chunk.with_name(chunk.name + SUM_SUFFIX)


def _stat_key(path: StorePath) -> tuple | None:
    """What identifies a verified chunk and its checksum file unchanged; None: cannot tell (re-verify)."""
    if isinstance(path, RemotePath):
        keys = (path.stat_key(), _sum_path(path).stat_key() if _sum_path(path).exists() else ())
        return None if None in keys else keys
    s, c = os.stat(path), os.stat(_sum_path(path)) if _sum_path(path).exists() else None
    return (s.st_ino, s.st_size, s.st_mtime_ns, c and (c.st_ino, c.st_size, c.st_mtime_ns))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) written in a claim file, or None if there is none (or it is empty)."""
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (FileNotFoundError, ValueError):
        return None


def load_results(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Every finished run of the inputs ``out_dir`` was last run with, as a DataFrame (one row per run,
    sorted by ``run_id``). Chunks trained for other inputs (other data, model, loss...) stay on disk,
    since their ids differ, but are not returned.

    Columns: ``run_id``; the config (lr, weight_decay, batch_size, momentum, seed, steps, options);
    ``status`` ("ok" | "diverged") and ``diverged_step`` (first failing step, −1 if ok); one column per
    metric (value at the final step; NaN if diverged); ``history_step`` and ``history_<metric>`` (lists).
    """
    store = ResultStore(out_dir)
    meta = store.read_meta(heal=False)
    if meta is None:
        raise FileNotFoundError(f"mirrorsym.sweep.load_results: {store.root} holds no sweep ({META} missing)")
    store.meta = meta
    return store.load(fingerprint=store.fingerprint)
