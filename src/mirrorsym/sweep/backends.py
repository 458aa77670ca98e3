"""Where chunks run: ``local`` (this process, one chunk after the other) or ``ray`` (tasks on a cluster).

Both hand finished chunks to the same :class:`~mirrorsym.sweep.store.ResultStore` from the driver, one
atomic file per chunk, so a sweep's rows do not depend on the backend (same device kind, same chunks).

``backend="ray"`` with ``address=None`` starts a local Ray instance (``ray.init()``) and shuts it down
afterwards; ``address="auto"`` joins the cluster this machine belongs to and ``"ray://host:10001"`` a
remote one (the CLI's ``--backend ray --address ADDR`` mean exactly this). If Ray is already
initialised in this process it is used as is. Model factory, loss and metrics travel to the workers by
cloudpickle: define them at the top of an importable module (installed on the workers) or in
``__main__``. ``ray_options`` go to ``.options()`` of the task, e.g. ``{"num_gpus": 1}`` per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .engine import Problem, train_chunk
from .store import ResultStore

Chunk = Sequence[dict]
Progress = Callable[[int], None]


def run_local(problem: Problem, chunks: Sequence[Chunk], store: ResultStore, device, advance: Progress,
              on_chunk: Callable[[Chunk], None]) -> None:
    """Train the chunks one by one in this process; write each when it is finished."""
    for chunk in chunks:
        rows = train_chunk(problem, chunk, device, on_progress=advance)
        store.write_chunk(rows)
        on_chunk(chunk)


def _import_ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("mirrorsym.sweep backend='ray' needs Ray: pip install 'mirrorsym[distributed]' "
                          "(or pip install 'ray[default]>=2.9')") from exc
    return ray


def _train_chunk_task(problem: Problem, chunk: Chunk, device) -> list[dict]:
    return train_chunk(problem, chunk, device)


def run_ray(problem: Problem, chunks: Sequence[Chunk], store: ResultStore, device, advance: Progress,
            on_chunk: Callable[[Chunk], None], address: str | None = None,
            ray_options: dict | None = None) -> None:
    """Send every chunk as a Ray task; write each chunk's rows as soon as its task returns.

    On Ctrl-C (or any error) the outstanding tasks are cancelled; finished chunks are already stored.
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        options = {"num_cpus": 1, "max_retries": 0, **(ray_options or {})}
        task = ray.remote(_train_chunk_task).options(**options)
        problem_ref = ray.put(problem)
        pending = {task.remote(problem_ref, list(chunk), device): chunk for chunk in chunks}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                chunk = pending.pop(done[0])
                store.write_chunk(ray.get(done[0]))
                advance(sum(c["steps"] for c in chunk))
                on_chunk(chunk)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()
