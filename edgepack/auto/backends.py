"""Where candidate jobs run: a local process pool (default), Ray (a cluster), or inline (this process, serially).

The search hands a backend `jobs.run_job` and a job; it gets a handle back, waits on handles, and reads results.
Nothing else in the search knows which backend runs: the same code spreads over machines with `--backend ray
--address HOST:PORT` (Ray is an optional extra: `pip install 'edgepack[ray]'`). With Ray on several machines the run
folder (`--out`) must be on a filesystem every node mounts at the same path, since stage folders are written there.

>>> backend = get_backend("inline", workers=1)
>>> handle = backend.submit(len, [1, 2, 3])
>>> backend.wait([handle]) == [handle], backend.result(handle)
(True, 3)
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from edgepack.errors import BadInputError
from edgepack.registry import Registry

Job = Callable[[Any], Any]


class Backend(ABC):
    name = ""

    def __init__(self, *, workers: int, address: str | None = None) -> None:
        self.workers = workers
        self.address = address

    @abstractmethod
    def submit(self, fn: Job, job: Any) -> Any:
        """Start `fn(job)`; a handle for `wait` / `result`."""

    @abstractmethod
    def wait(self, handles: Sequence[Any]) -> list[Any]:
        """Block until at least one of `handles` is done; the done ones."""

    @abstractmethod
    def result(self, handle: Any) -> Any:
        """The return value of a done job (its exception re-raised)."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release workers (idempotent)."""

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"


BACKENDS: Registry[type[Backend]] = Registry("auto backend")


def register_backend(cls: type[Backend]) -> type[Backend]:
    BACKENDS.register(cls.name)(cls)
    return cls


def get_backend(name: str, *, workers: int, address: str | None = None) -> Backend:
    return BACKENDS.get(name)(workers=workers, address=address)


@register_backend
class InlineBackend(Backend):
    """Each job runs to completion inside `submit` (serial; for debugging and for a single worker)."""

    name = "inline"

    def submit(self, fn: Job, job: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        try:
            future.set_result(fn(job))
        except Exception as error:  # re-raised by result(), as a pool would
            future.set_exception(error)
        return future

    def wait(self, handles: Sequence[Any]) -> list[Any]:
        return list(handles)

    def result(self, handle: Any) -> Any:
        return handle.result()


@register_backend
class LocalBackend(Backend):
    """`workers` spawned processes (spawn, not fork: torch and ONNX Runtime threads do not survive a fork)."""

    name = "local"

    def __init__(self, *, workers: int, address: str | None = None) -> None:
        super().__init__(workers=workers, address=address)
        if address:
            raise BadInputError(f"--address {address} is for --backend ray; the local backend uses this machine")
        self._pool: cf.ProcessPoolExecutor | None = None

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(max_workers=self.workers,
                                                mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def submit(self, fn: Job, job: Any) -> cf.Future[Any]:
        return self._executor().submit(fn, job)

    def wait(self, handles: Sequence[Any]) -> list[Any]:
        done, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        return [h for h in handles if h in done]

    def result(self, handle: Any) -> Any:
        return handle.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@register_backend
class RayBackend(Backend):
    """Ray tasks (one CPU each) on the cluster at `address` (ray://host:10001, host:6379 or auto), or on a local
    Ray instance started here with `workers` CPUs when no address is given."""

    name = "ray"

    def __init__(self, *, workers: int, address: str | None = None) -> None:
        super().__init__(workers=workers, address=address)
        try:
            import ray
        except ImportError:
            raise BadInputError("--backend ray needs Ray: pip install 'edgepack[ray]' (or use --backend local)") \
                from None
        self._ray = ray
        self._remote: Any = None
        self._started = False

    def _task(self, fn: Job) -> Any:
        ray = self._ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": self.address} if self.address else {"num_cpus": self.workers}
            try:
                ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as error:
                raise BadInputError(f"--backend ray --address {self.address}: cannot connect to a Ray cluster "
                                    f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); start "
                                    "one with `ray start --head` or check the address") from None
            self._started = True
        if self._remote is None:
            self._remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        return self._remote

    def submit(self, fn: Job, job: Any) -> Any:
        return self._task(fn).remote(job)

    def wait(self, handles: Sequence[Any]) -> list[Any]:
        done, _ = self._ray.wait(list(handles), num_returns=1)
        return [h for h in handles if h in done]

    def result(self, handle: Any) -> Any:
        return self._ray.get(handle)

    def nodes(self) -> list[str]:
        """Node ids of the cluster that are alive (the report names how many machines ran candidates)."""
        return [n["NodeID"] for n in self._ray.nodes() if n.get("Alive")] if self._ray.is_initialized() else []

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False
        self._remote = None


__all__ = ["BACKENDS", "Backend", "get_backend", "register_backend"]
