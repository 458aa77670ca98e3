"""Where chunks run: ``local`` (this process, one chunk after the other) or ``ray`` (tasks on a cluster).

Both hand finished chunks to the same :class:`~mirrorsym.sweep.store.ResultStore` from the driver, one
atomic, checksummed file per chunk, so a sweep's rows do not depend on the backend (same device kind,
same chunks). A chunk is trained only under its claim (:meth:`ResultStore.claim`), always taken by the
driver process: ``local`` claims each chunk just before training it, so processes sharing a directory
interleave; ``ray`` claims every chunk it can before sending any and frees each as its file is written.
Chunks claimed by another live process are skipped; both functions return the chunks they trained.

**Parallelism.** With Ray, :meth:`Sweep.run <mirrorsym.sweep.Sweep.run>` connects first
(:func:`ray_session`), counts the tasks the cluster runs at once (:func:`ray_workers`: CPUs per task,
or GPUs with ``ray_options={"num_gpus": 1}``) and cuts the sweep into at least that many chunks (none
larger than ``chunk_size``), so every worker trains a share: a 60-run sweep on 2 CPUs is 2 chunks of 30
running side by side. Each task gets ``num_cpus=1`` (Ray then gives torch one thread) unless
``ray_options`` says otherwise.

``backend="ray"`` with ``address=None`` starts a local Ray instance (``ray.init()``) and shuts it down
afterwards; ``address="auto"`` joins the cluster this machine belongs to and ``"ray://host:10001"`` a
remote one (the CLI's ``--backend ray --address ADDR`` mean exactly this). If Ray is already
initialised in this process it is used as is. Model factory, loss and metrics travel to the workers by
cloudpickle: define them at the top of an importable module (installed on the workers) or in
``__main__``. ``ray_options`` go to ``.options()`` of the task, e.g. ``{"num_gpus": 1}`` per chunk.

**Jobs.** Work that a vmapped grid of optimizer settings cannot express (task sequences, per-step unit
resets, parametrised models with their own loops) goes through :func:`map_jobs`: independent calls of one
function, in this process or as Ray tasks with the same connection rules and task options, results in
the order of the calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from .config import run_id
from .engine import Problem, train_chunk
from .store import Claim, ResultStore

Chunk = Sequence[dict]
Progress = Callable[[int], None]


def _claim(problem: Problem, chunk: Chunk, store: ResultStore) -> Claim | None:
    """This process's claim on ``chunk``, or None if another process holds it or has already stored it."""
    ids = [run_id(problem.name, c) for c in chunk]
    claim = store.claim(ids)
    if claim is not None and store.has_chunk(ids):  # its previous holder finished it just now
        claim.release()
        return None
    return claim


def _write(problem: Problem, chunk: Chunk, rows: Sequence[dict], store: ResultStore) -> None:
    """Store a trained chunk's rows, after checking they carry the ids the chunk was claimed under (the
    sweep finds its rows by these ids: a mismatch would retrain the chunk forever)."""
    expected = [run_id(problem.name, c) for c in chunk]
    got = [r.get("run_id") for r in rows]
    if got != expected:
        raise RuntimeError(f"mirrorsym.sweep: train_chunk returned rows with run ids {got}, expected {expected} "
                           "(run_id(problem.name, config) in config order); nothing was stored for this chunk")
    store.write_chunk(rows)


def run_local(problem: Problem, chunks: Sequence[Chunk], store: ResultStore, device, advance: Progress,
              on_chunk: Callable[[Chunk], None]) -> list[Chunk]:
    """Train the unclaimed chunks one by one in this process; write each when it is finished."""
    trained = []
    for chunk in chunks:
        claim = _claim(problem, chunk, store)
        if claim is None:
            continue
        try:
            _write(problem, chunk, train_chunk(problem, chunk, device, on_progress=advance), store)
        finally:
            claim.release()
        trained.append(chunk)
        on_chunk(chunk)
    return trained


def _import_ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("mirrorsym.sweep backend='ray' needs Ray: pip install 'mirrorsym[distributed]' "
                          "(or pip install 'ray[default]>=2.9')") from exc
    return ray


def _train_chunk_task(problem: Problem, chunk: Chunk, device) -> list[dict]:
    return train_chunk(problem, chunk, device)


def _task_options(ray_options: dict | None) -> dict:
    return {"num_cpus": 1, "max_retries": 0, **(ray_options or {})}


def ray_workers(ray_options: dict | None = None) -> int:
    """How many chunk tasks the connected Ray cluster runs at once: its CPUs per task's ``num_cpus``
    (and GPUs per ``num_gpus`` if the tasks ask for GPUs), at least 1."""
    ray = _import_ray()
    resources = ray.cluster_resources()
    options = _task_options(ray_options)
    counts = [resources.get(kind, 0.0) / options[key]
              for key, kind in (("num_cpus", "CPU"), ("num_gpus", "GPU")) if options.get(key)]
    return max(1, int(min(counts))) if counts else 1


@contextmanager
def ray_session(address: str | None = None, ray_options: dict | None = None) -> Iterator[int]:
    """Connect to Ray for a whole sweep (``address`` as in the module docstring; an instance already
    initialised in this process is used as is, and left running) and yield :func:`ray_workers`, which
    :func:`~mirrorsym.sweep.plan_chunks` uses to cut the sweep into at least that many chunks."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        yield ray_workers(ray_options)
    finally:
        if started:
            ray.shutdown()


def run_ray(problem: Problem, chunks: Sequence[Chunk], store: ResultStore, device, advance: Progress,
            on_chunk: Callable[[Chunk], None], address: str | None = None,
            ray_options: dict | None = None) -> list[Chunk]:
    """Send every unclaimed chunk as a Ray task; write each chunk's rows as soon as its task returns.

    On Ctrl-C (or any error) the outstanding tasks are cancelled and their claims freed; finished chunks
    are already stored.
    """
    claims = {}
    try:
        for i, chunk in enumerate(chunks):
            claim = _claim(problem, chunk, store)
            if claim is not None:
                claims[i] = claim
        if not claims:
            return []
        return _run_ray_claimed(problem, chunks, claims, store, device, advance, on_chunk, address, ray_options)
    finally:
        for claim in claims.values():
            claim.release()


def map_jobs(fn: Callable, jobs: Sequence[tuple], backend: str = "local", address: str | None = None,
             ray_options: dict | None = None) -> list:
    """``[fn(*args) for args in jobs]``, here (``backend="local"``, one after the other) or as Ray tasks
    (``"ray"``: all sent at once, one CPU each unless ``ray_options`` says otherwise). ``fn`` and its
    arguments travel by cloudpickle, so ``fn`` must be importable on the workers. On Ctrl-C or an error
    the outstanding tasks are cancelled."""
    if backend == "local":
        return [fn(*args) for args in jobs]
    if backend != "ray":
        raise ValueError(f"map_jobs: backend must be 'local' or 'ray', got {backend!r}")
    ray = _import_ray()
    with ray_session(address, ray_options):
        task = ray.remote(fn).options(**_task_options(ray_options))
        refs = [task.remote(*args) for args in jobs]
        try:
            return ray.get(refs)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise


def _run_ray_claimed(problem, chunks, claims, store, device, advance, on_chunk, address, ray_options):
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    trained = []
    try:
        task = ray.remote(_train_chunk_task).options(**_task_options(ray_options))
        problem_ref = ray.put(problem)
        pending = {task.remote(problem_ref, list(chunks[i]), device): i for i in claims}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                _write(problem, chunks[i], ray.get(done[0]), store)
                claims[i].release()
                advance(sum(c["steps"] for c in chunks[i]))
                trained.append(chunks[i])
                on_chunk(chunks[i])
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()
    return trained
