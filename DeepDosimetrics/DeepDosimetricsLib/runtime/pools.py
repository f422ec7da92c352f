"""Worker pools: the one way cohort jobs run tasks in parallel.

Three backends behind one interface, chosen by a :class:`PoolSpec` (the CLI's ``--jobs``/``--scheduler``):

- **in-process** (``jobs=1``, no scheduler): tasks run one after the other in this process;
- **local processes** (``--jobs N``): a ``ProcessPoolExecutor`` of N workers, forked on Linux (workers
  start at once with the modules imported), spawned elsewhere or when asked (``start_method="spawn"``);
- **Dask distributed** (``--scheduler ADDRESS`` for a running cluster, ``--scheduler local:N`` for a
  ``LocalCluster`` of N single-threaded worker processes started and closed by the job). A task whose
  worker dies is re-run elsewhere by the scheduler; a task that raises is retried ``retries`` times.

Every worker limits BLAS/OpenMP and ITK threads to one (threadpoolctl): the pool is the parallelism, and
OpenBLAS threads of several workers otherwise fight for the same cores. When a local pool breaks (workers
cannot start, or one dies) or a Dask task is lost for good (``KilledWorker``), the tasks without a result
run in this process, with a warning: a cohort job finishes whenever this process can do the work.

    spec = PoolSpec(jobs=2)                        # or PoolSpec(scheduler="tcp://host:8786")
    with open_pool(spec, tasks=len(args)) as pool:
        for index, result in pool.map(function, args):   # (index into args, result) as they finish
            ...

``function`` and its arguments must pickle (a module-level function; on a Dask cluster the library must
be installed on the workers and the paths must be on a file system they share).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple, Union

from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

#: ``--scheduler local:N``: a LocalCluster of N worker processes
LOCAL_PREFIX = "local"


@dataclass(frozen=True)
class PoolSpec:
    """How a job runs its tasks.

    Args:
        jobs: local worker processes (1: in this process); ignored when ``scheduler`` is given.
        scheduler: a Dask scheduler address (``tcp://host:8786``, ``host:8786``), a scheduler file
            (``*.json``, as ``dask scheduler --scheduler-file`` writes), or ``local:N``.
        retries: Dask retries of a task that raised (a lost worker's tasks are re-run anyway).
        start_method: ``fork`` or ``spawn`` for local processes (default: fork on Linux, else spawn).
    """

    jobs: int = 1
    scheduler: Optional[str] = None
    retries: int = 2
    start_method: Optional[str] = None

    def __post_init__(self) -> None:
        if int(self.jobs) < 1:
            raise InputError(f"--jobs must be at least 1, got {self.jobs}")
        if self.scheduler is not None:
            parse_scheduler(self.scheduler)

    @property
    def parallel(self) -> bool:
        """Whether tasks may leave this process."""
        return self.scheduler is not None or self.jobs > 1

    def describe(self) -> str:
        if self.scheduler:
            return f"dask scheduler {self.scheduler}"
        return f"{self.jobs} local process(es)" if self.jobs > 1 else "in-process"


def as_pool(jobs: Union[int, PoolSpec, None]) -> PoolSpec:
    """A PoolSpec from an int (local processes), a PoolSpec (itself) or None (in-process)."""
    if isinstance(jobs, PoolSpec):
        return jobs
    return PoolSpec(jobs=int(jobs or 1))


def parse_scheduler(text: str) -> Tuple[str, Union[int, str]]:
    """``("local", N)`` for ``local:N`` (``local`` alone: the usable cores), ``("file", path)`` for a
    scheduler file, else ``("address", text)``. InputError for an empty text or a bad ``local:N``."""
    text = (text or "").strip()
    if not text:
        raise InputError("--scheduler needs an address (tcp://host:8786), a scheduler file or local:N")
    if text == LOCAL_PREFIX or text.startswith(LOCAL_PREFIX + ":"):
        count = text[len(LOCAL_PREFIX) + 1:]
        if not count:
            return LOCAL_PREFIX, usable_cores()
        try:
            workers = int(count)
        except ValueError:
            raise InputError(f"--scheduler {text}: expected local:N with N a number of workers") from None
        if workers < 1:
            raise InputError(f"--scheduler {text}: at least one worker")
        return LOCAL_PREFIX, workers
    if text.endswith(".json"):
        return "file", text
    return "address", text


def usable_cores() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------- worker set-up
_LIMITED = False


def limit_worker_threads(threads: int = 1) -> None:
    """``threads`` BLAS/OpenMP (threadpoolctl) and ITK threads in this worker process (once per process)."""
    global _LIMITED
    if _LIMITED:
        return
    _LIMITED = True
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=max(1, threads))
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
    except ImportError:  # pragma: no cover - SimpleITK is a dependency
        pass
    try:  # torch keeps its own intra-op pool
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(max(1, threads))
    except Exception:  # pragma: no cover
        pass


def _call_in_worker(function: Callable, args: tuple) -> Any:
    """A Dask task: the function in a worker whose threads are limited."""
    limit_worker_threads(1)
    return function(*args)


def group_by_key(keys: Sequence[Hashable], workers: int) -> List[List[int]]:
    """Indices grouped into tasks: one task per key (e.g. per patient, loaded by one worker only) when
    there are at least twice as many keys as workers, else one task per index (a few large patients
    still spread over the workers)."""
    by_key: Dict[Hashable, List[int]] = {}
    for index, key in enumerate(keys):
        by_key.setdefault(key, []).append(index)
    if len(by_key) >= 2 * max(1, workers):
        return list(by_key.values())
    return [[index] for index in range(len(keys))]


# ---------------------------------------------------------------------------------- pools
class Pool:
    """An open pool; use :func:`open_pool`. ``workers`` is how many tasks run at once."""

    workers: int = 1
    kind: str = "in-process"

    def map(self, function: Callable, args: Sequence[tuple]) -> Iterator[Tuple[int, Any]]:
        """Submit ``function(*a)`` for every ``a`` of ``args`` at once; iterate ``(index, result)`` as they
        finish. Exceptions raised by a task propagate (tasks report their own failures as results)."""
        return ((index, function(*a)) for index, a in enumerate(args))

    def close(self) -> None:
        pass

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ProcessPool(Pool):
    kind = "processes"

    def __init__(self, jobs: int, start_method: Optional[str]) -> None:
        self.workers = jobs
        self.start_method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
        self.executor = None

    def map(self, function: Callable, args: Sequence[tuple]) -> Iterator[Tuple[int, Any]]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        if self.executor is None:
            self.executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context(self.start_method),
                initializer=limit_worker_threads, initargs=(1,),
            )
        # submit everything now: forked workers start at the first submit, before the caller's progress
        # bar starts its thread (ITK's thread pool and OpenBLAS handle fork; a live monitor thread may not)
        futures: Dict[Any, int] = {}
        for index, a in enumerate(args):
            try:
                futures[self.executor.submit(function, *a)] = index
            except BrokenProcessPool:  # a worker died already: the rest runs in this process
                break
        return self._results(function, args, futures)

    def _results(self, function, args, futures) -> Iterator[Tuple[int, Any]]:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        finished = set()
        broken = len(futures) < len(args)
        try:
            for future in as_completed(futures):
                try:
                    result = future.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                finished.add(futures[future])
                yield futures[future], result
        except BaseException:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
            raise
        if broken:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
            yield from _in_process(function, args, finished, "the process pool broke")

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


class _DaskPool(Pool):
    kind = "dask"

    def __init__(self, scheduler: str, retries: int) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise InputError("--scheduler needs dask distributed: pip install 'dask[distributed]'") from None
        kind, value = parse_scheduler(scheduler)
        self.retries = retries
        self.cluster = None
        self.scheduler = scheduler
        try:
            if kind == LOCAL_PREFIX:
                self.cluster = LocalCluster(n_workers=int(value), threads_per_worker=1, processes=True,
                                            dashboard_address=None, silence_logs=logging.ERROR)
                self.client = Client(self.cluster)
            elif kind == "file":
                self.client = Client(scheduler_file=str(value), timeout="30s")
            else:
                self.client = Client(str(value), timeout="30s")
        except (OSError, TimeoutError, ValueError) as error:
            if self.cluster is not None:
                self.cluster.close()
            raise InputError(f"cannot reach the Dask scheduler {scheduler}: {error}") from None
        info = self.client.scheduler_info(n_workers=-1) if _accepts_n_workers(self.client) else \
            self.client.scheduler_info()
        self.workers = max(1, sum(int(w.get("nthreads", 1)) for w in info.get("workers", {}).values()))
        log.info("dask: %s, %d worker thread(s)", scheduler, self.workers)

    def map(self, function: Callable, args: Sequence[tuple]) -> Iterator[Tuple[int, Any]]:
        futures = {self.client.submit(_call_in_worker, function, tuple(a), pure=False, retries=self.retries):
                   index for index, a in enumerate(args)}
        return self._results(function, args, futures)

    def _results(self, function, args, futures) -> Iterator[Tuple[int, Any]]:
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        finished, lost = set(), []
        try:
            for future in as_completed(list(futures)):
                index = futures[future]
                try:
                    result = future.result()
                except KilledWorker as error:  # its workers died too often: try it here
                    lost.append(str(error))
                    continue
                finished.add(index)
                future.release()
                yield index, result
        except BaseException:
            self.client.cancel(list(futures))
            raise
        if lost:
            yield from _in_process(function, args, finished, f"dask lost {len(lost)} task(s) ({lost[0]})")

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def _accepts_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _in_process(function, args, finished: set, why: str) -> Iterator[Tuple[int, Any]]:
    missing = [index for index in range(len(args)) if index not in finished]
    if missing:
        log.warning("%s; running %d task(s) in this process", why, len(missing))
    for index in missing:
        yield index, function(*args[index])


def open_pool(spec: Union[PoolSpec, int, None], tasks: Optional[int] = None) -> Pool:
    """A pool for ``spec`` (use it as a context manager). ``tasks``: how many tasks will run (no more
    local processes are started than that; one task runs in this process)."""
    spec = as_pool(spec)
    if spec.scheduler:
        return _DaskPool(spec.scheduler, spec.retries)
    jobs = spec.jobs if tasks is None else min(spec.jobs, tasks)
    if jobs > 1:
        return _ProcessPool(jobs, spec.start_method)
    return Pool()


def run_tasks(function: Callable, args: Sequence[tuple], spec: Union[PoolSpec, int, None] = None,
              on_result: Optional[Callable[[int, Any], None]] = None) -> List[Any]:
    """``[function(*a) for a in args]`` on the pool of ``spec``, in order; ``on_result(index, result)`` is
    called in this process as each one finishes (progress)."""
    results: List[Any] = [None] * len(args)
    if not args:  # no cluster started for nothing
        return results
    with open_pool(spec, tasks=len(args)) as pool:
        for index, result in pool.map(function, args):
            results[index] = result
            if on_result is not None:
                on_result(index, result)
    return results
