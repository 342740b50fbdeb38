"""``--engine ray``: score shard / parquet units on Ray Data, on this machine or a cluster.

The units' indices form a Ray dataset (one block per unit); ``map_batches``
sends them to a pool of scorer actors (one per GPU, else one per
``--ray-cpus-per-worker`` cores), each of which loads the checkpoint once and
scores whole units with :func:`~halo_embed.clip.shard_scoring.score_unit`
(the same batches as the streaming path, so the same numbers per key) and
writes each finished unit as its parquet part. A killed run therefore resumes
at unit granularity, like the streaming path, and the driver only sees one
small row per unit. On a cluster, the inputs, the checkpoint and the output's
folder must be at the same path on every node (a shared file system), and
halo-embed installed there.

Ray is an optional dependency (``pip install 'halo-embed[ray]'``), imported
only here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..data.shards import Unit, UnitReport
from .shard_scoring import PartStore, ScoreSettings

__all__ = ["INSTALL", "UnitScorerActor", "check_ray", "ray_session", "run_tasks", "score_units_ray"]

INSTALL = "pip install 'halo-embed[ray]'"
#: a cluster's GCS port when --ray-address gives none (ray start --head's default); ray:// clients: 10001
DEFAULT_PORTS = {"": 6379, "ray://": 10001}


def _current_cluster() -> str | None:
    """The address of a Ray cluster started on this machine (``ray start --head`` records it)."""
    import tempfile

    for root in (os.environ.get("RAY_TMPDIR"), tempfile.gettempdir(), "/tmp"):
        path = Path(root or "/nonexistent") / "ray" / "ray_current_cluster"
        if path.is_file():
            return path.read_text().strip() or None
    return None


def check_ray(address: str | None, timeout: float = 5.0) -> None:
    """Ray is installed and ``address`` (``None``: a local instance) answers; checked before any model loads.

    Raises:
        ImportError: Ray is not installed (with the install line).
        ValueError: the address is malformed, or nothing listens there within ``timeout`` seconds.
    """
    if importlib.util.find_spec("ray") is None:
        raise ImportError(f"--engine ray needs Ray, which is not installed: {INSTALL}")
    if address is None:
        return
    target = address
    if address == "auto":
        target = os.environ.get("RAY_ADDRESS") or _current_cluster()
        if not target:
            raise ValueError("--ray-address auto: no Ray cluster runs on this machine (start one with `ray start "
                             "--head`, or leave --ray-address out for a local instance)")
    scheme = "ray://" if target.startswith("ray://") else ""
    host, _, port = target[len(scheme):].rpartition(":")
    if not host:
        host, port = target[len(scheme):], str(DEFAULT_PORTS[scheme])
    if not port.isdigit():
        raise ValueError(f"--ray-address must be HOST:PORT (or ray://HOST:PORT, or auto), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ValueError(f"--ray-address {address}: nothing answers at {host}:{port} ({error or 'timed out'}); "
                         "is the cluster up (`ray start --head`)?") from None


class UnitScorerActor:
    """A Ray Data actor: loads the checkpoint once, then scores the units whose indices it is given."""

    def __init__(self, checkpoint: str, units: dict[int, Unit], settings: ScoreSettings, parts: str,
                 device: str, threads: int, cwd: str) -> None:
        import torch

        from .scorer import AlignmentScorer

        if Path(cwd).is_dir():  # relative shard paths mean what they meant to the driver (a shared file system)
            os.chdir(cwd)
        torch.set_num_threads(threads)  # Ray starts workers with one thread (OMP_NUM_THREADS=1)
        self.scorer = AlignmentScorer.from_checkpoint(checkpoint, device=device, batch_size=settings.batch_size)
        self.units, self.settings, self.store = units, settings, PartStore(parts, {})

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from .shard_scoring import score_unit

        out: dict[str, list] = {"index": [], "report": []}
        for index in batch["index"]:
            index = int(index)
            records, report = score_unit(self.scorer, self.units[index], self.settings)
            self.store.write(index, records, report, self.scorer.abstain_bias)
            out["index"].append(index)
            out["report"].append(json.dumps(vars(report)))
        return {key: np.array(values) for key, values in out.items()}


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, connected to ``address`` (``None``: a new local instance with every core), quiet
    (no dashboard, no usage report, no progress bars or execution plans: the command counts units); shut
    down at the end if it was started here."""
    import logging

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # Ray Data logs each execution's plan at INFO
    if address is not None:  # a port that answers but is no Ray head: seconds, not Ray's default 14 minutes
        # (read when ray is imported, hence here)
        os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", "5")
        os.environ.setdefault("RAY_py_gcs_connect_timeout_s", "10")
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # "local": a new instance even where RAY_ADDRESS or a `ray start` on this machine would be picked up
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.ERROR,
                 **({} if address else {"num_cpus": os.cpu_count() or 1}))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def run_tasks(function: Callable[[dict[str, Any]], Any], jobs: Iterable[dict[str, Any]], address: str | None,
              drop: Sequence[str] = (), window: int | None = None) -> Iterator[tuple[dict[str, Any], Any]]:
    """``(job, function(job))`` for each job, in the jobs' order, the calls run as Ray tasks (one CPU each);
    at most ``window`` (default: twice the cluster's CPUs) in flight, so that memory does not grow with the
    number of jobs. The keys ``drop`` stay on the driver."""
    from collections import deque

    with ray_session(address) as ray:
        remote = ray.remote(num_cpus=1)(function)
        window = window or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        flight: deque = deque()
        for job in jobs:
            flight.append((job, remote.remote({k: v for k, v in job.items() if k not in drop})))
            if len(flight) >= window:
                done, future = flight.popleft()
                yield done, ray.get(future)
        while flight:
            done, future = flight.popleft()
            yield done, ray.get(future)


def score_units_ray(checkpoint: str, todo: Sequence[tuple[int, Unit]], settings: ScoreSettings, store: PartStore,
                    address: str | None, workers: int | None, cpus_per_worker: int,
                    finished: Callable[[int, UnitReport], None]) -> None:
    """Score ``todo`` into ``store`` on Ray; ``finished(index, report)`` as each unit's row comes back."""
    if not todo:
        return
    with ray_session(address) as ray:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if workers is None:
            workers = gpus or max(1, int(resources.get("CPU", 1)) // cpus_per_worker)
        workers = min(workers, len(todo))
        device = "cuda" if gpus else "cpu"  # the actors' machines decide, not the driver's
        threads = cpus_per_worker if not gpus else max(1, int(resources.get("CPU", 1)) // max(gpus, 1))
        dataset = ray.data.from_items([{"index": index} for index, _ in todo], override_num_blocks=len(todo))
        scored = dataset.map_batches(
            # one unit in flight per actor: a unit is long work, and queueing several on the first actor that
            # starts would leave the others idle
            UnitScorerActor, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            **({"num_gpus": 1} if gpus else {"num_cpus": cpus_per_worker}),
            fn_constructor_kwargs={"checkpoint": str(Path(checkpoint).resolve()), "units": dict(todo),
                                   "settings": settings, "parts": str(store.folder.resolve()), "device": device,
                                   "threads": threads, "cwd": os.getcwd()})
        for row in scored.iter_rows():
            finished(int(row["index"]), UnitReport(**json.loads(str(row["report"]))))
