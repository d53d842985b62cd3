"""The driver: run a planned grid as Ray Tune trials, with no barrier between stages.

A custom Tune Searcher hands out attack cells, releases each attack's defense cells the moment
that attack finishes, and each defense cell's analysis cells the moment that defense finishes (a
transfer analysis, which crafts on the sibling defenses, once every defense of its attack cell has
finished). A cell whose parent failed or was skipped is skipped in turn. Finished cells are known from their own atomic markers (never from
Tune's snapshot), so a re-run after a crash or Ctrl-C only runs what is missing. The driver alone
turns markers into Parquet rows and MLflow runs; large grids run as several Tuner shards so the
driver's memory stays bounded.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ray import tune
from ray.tune.search import Searcher

from sweep import failpoints
from sweep.execute import ATTACK_FAILED, DEFENSE_NOT_DONE, UPSTREAM_REASONS, skipped_marker
from sweep.layout import SweepLayout

log = logging.getLogger("bdsweep")


DEFAULT_EXECUTOR = "sweep.execute:run_cell"


def resolve_executor(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def cell_trainable(config: dict) -> None:
    """The Tune function trainable: one cell, its marker written before it reports."""
    if config.get("failpoints"):  # chaos tests: Ray workers do not inherit the driver's environment
        os.environ[failpoints.ENV] = config["failpoints"]
    execute = resolve_executor(config.get("executor", DEFAULT_EXECUTOR))
    marker = execute(config["cell"], config["out"], config["sweep"], config.get("device", "auto"),
                     **config.get("executor_args", {}))
    tune.report({"cell_status": marker["row"]["status"]})


def cell_resources(config: dict) -> tune.PlacementGroupFactory:
    res = config["cell"]["resources"]
    bundle = {"CPU": float(res["cpu"])}
    if res["gpu"]:
        bundle["GPU"] = float(res["gpu"])
    return tune.PlacementGroupFactory([bundle])


@dataclass
class RunOptions:
    out: Path
    address: str | None = None
    mlflow_uri: str | None = None
    max_concurrent: int | None = None
    retry_failed: bool = False
    device: str = "auto"
    shard_size: int = 2000  # cells per Tuner run: Tune's driver memory grows with its trials
    progress: bool = True
    executor: str = DEFAULT_EXECUTOR  # "module:function" running one cell (benchmarks swap in a no-op)
    executor_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the executor
    tracking_wait: float = 60.0  # seconds to wait for another process's lock on the MLflow store
    resource_wait_warning: float = 60.0  # seconds a handed-out trial waits for resources before the progress line says so
    keep_stale: bool = False  # keep finished cells whose code changed (default: recompute them)
    rerun: str | None = None  # a --where expression: recompute the finished cells it selects
    grid_text: str | None = None  # the grid file, recorded with the run (DIR/grids/)


def cell_payload(cell, kind: str, attack_spec=None, defense=None, surrogates: list[str] | None = None) -> dict[str, Any]:
    """A planned cell as the plain dict a trial's config carries. A defense cell carries its attack
    cell's spec too (it names the artifact to repair); an analysis cell its defense cell's, and the
    ids of the sibling defense cells when it crafts on surrogates. `parent_cell_id`: the cell whose
    failure skips this one; `requires`: every cell that must finish before it runs."""
    payload = {
        "kind": kind,
        "cell_id": cell.cell_id,
        "attack_cell_id": cell.cell_id if kind == "attack" else cell.attack_cell_id,
        "retries": cell.retries,
        "resources": {"cpu": cell.resources.cpu, "gpu": cell.resources.gpu},
        "code": cell.code,
    }
    if kind == "attack":
        payload.update(spec=cell.spec.model_dump(), requires=[])
    elif kind == "defense":
        payload.update(spec=attack_spec.model_dump(), label=cell.label, defense=cell.spec.model_dump(),
                       parent_cell_id=cell.attack_cell_id, requires=[cell.attack_cell_id])
    else:
        payload.update(spec=attack_spec.model_dump(), label=defense.label, defense=defense.spec.model_dump(),
                       analysis=cell.spec.model_dump(), parent_cell_id=cell.defense_cell_id,
                       surrogates=list(surrogates or []), requires=[cell.defense_cell_id, *(surrogates or [])])
    return payload


class Progress:
    """One status line: cells done / running / failed / skipped / total, an ETA, and the trials
    handed to Ray that have waited more than `wait_warning` s for resources (what they ask, what
    is free: `free` returns Ray's available resources), since Ray's own warning never shows."""

    def __init__(self, total: int, already: int, enabled: bool, wait_warning: float = 60.0,
                 free: Callable[[], dict] | None = None):
        self.total, self.already, self.enabled = total, already, enabled
        self.counts = {"done": 0, "failed": 0, "skipped": 0}
        self.running = 0
        self.started = time.monotonic()
        self.last_print = 0.0
        self.tty = sys.stderr.isatty()
        self.wait_warning, self.free = wait_warning, free
        self.handed: dict[str, tuple[float, dict]] = {}  # trial id -> (handed out at, resources) until it starts
        self.shown_waiting = 0
        self.began = False

    def handed_out(self, trial_id: str, resources: dict) -> None:
        self.handed[trial_id] = (time.monotonic(), resources)
        self.began = True

    def trial_started(self, trial_id: str) -> None:
        self.handed.pop(trial_id, None)

    def waiting(self, now: float | None = None) -> list[dict]:
        """The resource requests of the trials waiting longer than `wait_warning`, oldest first."""
        now = time.monotonic() if now is None else now
        return [res for since, res in self.handed.values() if now - since > self.wait_warning]

    def finished(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        self.began = True
        self.show()

    def tick(self) -> None:
        """Each step of Tune's loop: redraw at once when trials start or stop waiting (nothing else
        would: no cell finishes while they wait), else as show() does, a terminal once a second."""
        if not self.enabled:
            return
        now = time.monotonic()
        if len(self.waiting(now)) != self.shown_waiting:
            self.show(force=True)
        elif now - self.last_print >= 1:
            self.show()

    def show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not (force or self.tty or now - self.last_print >= 5):
            return
        self.last_print = now
        new = sum(self.counts.values())
        finished = self.already + new
        remaining = self.total - finished
        eta = "-" if not new else _duration((now - self.started) / new * remaining)
        waiting = self.waiting(now)
        self.shown_waiting = len(waiting)
        line = (f"[bdsweep] {finished}/{self.total} cells finished ({self.counts['done']} done now, "
                f"{self.counts['failed']} failed, {self.counts['skipped']} skipped), "
                f"{max(0, self.running - len(waiting))} running, "
                f"{self.waiting_text(waiting) + ', ' if waiting else ''}"
                f"elapsed {_duration(now - self.started)}, ETA {eta}")
        print(("\r" + line + "\x1b[K") if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def waiting_text(self, waiting: list[dict]) -> str:
        """"2 waiting for resources (gpu 0.5 asked; free: cpu 2, gpu 0)": the asked amounts that
        exceed what is free (all nonzero ones when none does: the free share is on another node)."""
        try:
            raw = self.free() if self.free else None
        except Exception:  # the progress line never stops a sweep
            raw = None
        free = None if raw is None else {"cpu": float(raw.get("CPU", 0)), "gpu": float(raw.get("GPU", 0))}
        asked = []
        for request in waiting:
            short = [k for k in ("cpu", "gpu") if free is not None and float(request[k]) > free[k]]
            text = ", ".join(f"{k} {float(request[k]):g}" for k in (short or [k for k in ("cpu", "gpu") if request[k]]))
            if text not in asked:
                asked.append(text)
        free_text = "unknown" if free is None else ", ".join(f"{k} {v:g}" for k, v in free.items())
        return f"{len(waiting)} waiting for resources ({' / '.join(asked)} asked; free: {free_text})"

    def close(self) -> None:
        if self.enabled and self.began:  # a run refused before any trial has no progress to report
            self.show(force=True)
            if self.tty:
                print(file=sys.stderr)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


_LIBC: Any = None


def release_freed_memory() -> None:
    """Hand the heap pages the driver freed back to the OS. Tune's per-trial churn leaves them with
    glibc's allocator: RSS crept ~30 KB per cell while Python's live objects stayed flat (measured
    3,000 no-op cells in shards of 500: +89 MB without this, +26 MB with it). A no-op where there is no glibc."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class Bookkeeper:
    """Driver-side effects of a finished cell: Parquet row and MLflow run, written by one
    background thread so that Tune's event loop never waits on sqlite or Parquet I/O (and sqlite
    keeps a single writer). Markers are already on disk, so a crash before the queue drains only
    leaves work that `reconcile` redoes at the next start."""

    def __init__(self, layout: SweepLayout, tracker, progress: Progress):
        import queue
        import threading

        self.layout, self.tracker, self.progress = layout, tracker, progress
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.recorded = 0
        self.thread = threading.Thread(target=self._drain, name="bdsweep-bookkeeper", daemon=True)
        self.thread.start()

    def record(self, marker: dict) -> None:
        self.progress.finished(marker["row"]["status"])
        self.queue.put(marker)
        self.recorded += 1
        if self.recorded % 500 == 0:
            release_freed_memory()

    def _drain(self) -> None:
        from sweep.results import write_row

        while True:
            marker = self.queue.get()
            if marker is None:
                return
            try:
                write_row(self.layout.root, marker["row"])
                failpoints.failpoint("cell_recorded")
                self.tracker.log_cell(marker)
            except BaseException as exc:  # reported at close(); reconcile repairs it on the next run
                self.error = exc
                log.warning("bookkeeping of cell %s failed: %s", marker["row"]["cell_id"], exc)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            print(f"bdsweep: warning: some results were not recorded ({self.error}); the next run of the "
                  "same command repairs them from the cell markers", file=sys.stderr)


class CellSearcher(Searcher):
    """Hands out ready cells, and releases a waiting cell as soon as every cell it requires has
    finished (`waiting`: prerequisite id -> payloads; `pending`: cell id -> prerequisites left)."""

    def __init__(self, ready: list[dict], waiting: dict[str, list[dict]], pending: dict[str, set[str]], common: dict,
                 books: Bookkeeper, max_concurrent: int):
        super().__init__()
        self.ready = deque(ready)
        self.waiting = waiting
        self.pending = pending
        self.common = common
        self.books = books
        self.max_concurrent = max_concurrent
        self.in_flight: dict[str, dict] = {}

    # Tune snapshots the searcher (pickled into its experiment folder) but this engine resumes
    # from its own markers and never reads that back: leave the driver-only parts out.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "books"}

    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass

    def suggest(self, trial_id: str):
        if self.ready and len(self.in_flight) < self.max_concurrent:
            cell = self.ready.popleft()
            self.in_flight[trial_id] = cell
            self.books.progress.running = len(self.in_flight)
            self.books.progress.handed_out(trial_id, cell["resources"])  # waits for resources until it starts
            return {"cell": cell, **self.common}
        if self.ready or self.in_flight:
            return None  # nothing to hand out until a running cell finishes
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        cell = self.in_flight.pop(trial_id, None)
        self.books.progress.running = len(self.in_flight)
        self.books.progress.trial_started(trial_id)  # no longer waiting, whether it ever started or not
        if cell is None:
            return
        layout = self.books.layout
        marker = layout.read_marker(cell["cell_id"])
        if marker is None:  # the worker died before writing anything (after Tune's own retries)
            from sweep.execute import base_row, now_iso

            row = base_row(cell, self.common["sweep"])
            row.update(status="failed", finished_at=now_iso(),
                       error=f"the worker running this cell died (Ray trial {trial_id}; its logs: worker-*.err/.out "
                             f"in {ray_logs_dir()} on the node that ran it)")
            marker = {"row": row, "history": [], "traceback": None}
            layout.write_marker(cell["cell_id"], marker)
        self.books.record(marker)
        self.settle(cell["cell_id"], marker["row"]["status"])

    def settle(self, cell_id: str, status: str) -> None:
        """Release (or skip, when their parent did not finish) the cells that waited on `cell_id`."""
        layout = self.books.layout
        finished = [(cell_id, status)]
        while finished:
            done_id, done_status = finished.pop()
            released = []
            for dependent in self.waiting.pop(done_id, []):
                left = self.pending.get(dependent["cell_id"])
                if left is None:
                    continue  # already skipped
                left.discard(done_id)
                if dependent["parent_cell_id"] == done_id and done_status != "done":
                    del self.pending[dependent["cell_id"]]
                    skipped = skipped_marker(dependent, self.common["sweep"], _upstream_reason(dependent))
                    layout.write_marker(dependent["cell_id"], skipped)
                    self.books.record(skipped)
                    finished.append((dependent["cell_id"], "skipped"))
                elif not left:
                    del self.pending[dependent["cell_id"]]
                    released.append(dependent)
            # Released cells first in line: an attack's pipeline drains before new attacks start.
            self.ready.extendleft(reversed(released))


@dataclass
class SweepOutcome:
    out: Path
    mlflow_uri: str
    ran: int = 0
    already_finished: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


def _upstream_reason(payload: dict) -> str:
    return ATTACK_FAILED if payload["kind"] == "defense" else DEFENSE_NOT_DONE


def _is_final(marker: dict | None, retry_failed: bool) -> bool:
    if marker is None:
        return False
    row = marker["row"]
    if not retry_failed:
        return True
    return row["status"] == "done" or (row["status"] == "skipped" and row.get("error") not in UPSTREAM_REASONS)


def reconcile(layout: SweepLayout, tracker, markers: dict[str, dict]) -> int:
    """Give every marker its Parquet row and MLflow run (a driver killed between a worker's
    marker and its own bookkeeping left them out). Returns how many were repaired."""
    from sweep.results import load_results, write_row

    existing = load_results(layout.root, analyses="rows", scope="all")
    have_rows = set(existing["cell_id"]) if len(existing) else set()
    statuses = dict(zip(existing["cell_id"], existing["status"])) if len(existing) else {}
    repaired = 0
    for cell_id, marker in markers.items():
        if cell_id not in have_rows or statuses.get(cell_id) != marker["row"]["status"]:
            write_row(layout.root, marker["row"])
            repaired += 1
        if not tracker.is_tracked(cell_id):
            tracker.log_cell(marker)
            repaired += 1
    return repaired


def _lost_artifacts(layout: SweepLayout, markers: dict[str, dict], payloads: list[dict], retry_failed: bool) -> list[str]:
    """Finished cells whose artifact is gone, or damaged while a cell still to run needs it: their
    markers are set aside (kept under cells/invalidated/) with a warning, so they run again instead
    of their dependents failing or the table claiming a result nothing backs any more."""
    unfinished = {p["cell_id"] for p in payloads if not _is_final(markers.get(p["cell_id"]), retry_failed)}
    needed = {required for p in payloads if p["cell_id"] in unfinished for required in p["requires"]}
    lost: dict[str, str] = {}
    for cell_id, marker in markers.items():
        row = marker["row"]
        if row.get("status") != "done" or not row.get("artifact"):
            continue
        problem = _artifact_problem(Path(row["artifact"]), deep=cell_id in needed)
        if problem:
            lost[cell_id] = problem
            layout.invalidate_marker(cell_id, problem)
    if lost:
        shown = "; ".join(f"{cid}: {why}" for cid, why in list(lost.items())[:3])
        more = f" (and {len(lost) - 3} more)" if len(lost) > 3 else ""
        print(f"bdsweep: warning: {len(lost)} finished cell(s) lost their artifacts and run again: {shown}{more} "
              f"(old markers kept in {layout.cells / 'invalidated'})", file=sys.stderr)
    return list(lost)


def _artifact_problem(path: Path, deep: bool) -> str | None:
    """Why a recorded artifact cannot be used, or None. `deep`: verify every hash (only for the
    artifacts a pending cell is about to load; a resume of a finished sweep stays a stat per cell)."""
    if not path.exists():
        return f"artifact {path} is missing"
    if not deep:
        return None
    if path.is_dir():
        from bdcore.artifacts import ArtifactError, verify_artifact

        try:
            verify_artifact(path)
        except ArtifactError as exc:
            return str(exc)
        return None
    try:
        if path.stat().st_size == 0:
            return f"artifact {path} is empty"
        if path.suffix == ".json":
            json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"artifact {path} is unreadable ({exc})"
    return None


class ResourceError(Exception):
    """A stage's trials ask for more than any node of the cluster has: they would wait forever."""


def check_resources(payloads: list[dict], nodes: list[dict]) -> None:
    """Refuse, before any trial starts, a stage whose per-trial request (cpu, gpu) no single alive
    node can meet (`nodes`: ray.nodes()). Ray would keep such a trial pending without end, and its
    "insufficient resources" warning never reaches the user."""
    have = [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
            for n in nodes if n.get("Alive")]
    if not have:
        raise ResourceError("the Ray cluster has no alive node to run trials on")
    asked = dict.fromkeys((p["kind"], float(p["resources"]["cpu"]), float(p["resources"]["gpu"])) for p in payloads)
    for stage, cpu, gpu in asked:
        if any(cpu <= node_cpu and gpu <= node_gpu for node_cpu, node_gpu in have):
            continue
        shapes: dict[tuple[float, float], int] = {}
        for shape in have:
            shapes[shape] = shapes.get(shape, 0) + 1
        nodes_text = ", ".join(f"{n} x {{cpu: {c:g}, gpu: {g:g}}}" for (c, g), n in shapes.items()) or "none alive"
        # Suggest what would fit the node closest to the request (the most GPUs if it asks for one).
        best = max(have, key=lambda s: (s[1], s[0]) if gpu else (s[0], s[1]), default=(0.0, 0.0))
        fixes = [f"{stage}.{key}={limit:g}" for key, want, limit in (("cpu", cpu, best[0]), ("gpu", gpu, best[1]))
                 if want > limit]
        raise ResourceError(f"resources.{stage}: a trial asks for {{cpu: {cpu:g}, gpu: {gpu:g}}} but no node has "
                            f"that (nodes: {nodes_text}); lower it in the grid or override with "
                            f"--resources {' --resources '.join(fixes)}")


def ray_logs_dir() -> str:
    """Ray's log folder of this session (worker-*.err/.out per worker process) as the driver's node
    lays it out; a worker on another node writes to the same path there."""
    import ray

    try:
        if ray.is_initialized():
            context = ray.get_runtime_context()
            return str(Path(context.get_temp_dir()) / context.get_session_name() / "logs")
    except Exception:  # a Ray without these calls, or a client connection that lacks them
        pass
    return "/tmp/ray/session_latest/logs"


def _init_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (and should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False, "logging_level": logging.WARNING}
    ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
    return True


def run_sweep(plan, options: RunOptions) -> SweepOutcome:
    """Run every unfinished cell of `plan` into `options.out`; see the module docstring."""
    from sweep.results import compact
    from sweep.tracking import default_uri, make_tracker

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    out = Path(options.out).resolve()
    layout = SweepLayout(out)
    uri = options.mlflow_uri or default_uri(out)
    all_ids = {c.cell_id for c in plan.attacks} | {d.cell_id for d in plan.defenses} | {a.cell_id for a in plan.analyses}
    markers = {m["row"]["cell_id"]: m for m in layout.markers() if m.get("row", {}).get("cell_id") in all_ids}
    payloads = plan_payloads(plan)
    # Resources first: a request no node can meet is refused before the folder or the tracking store
    # changes at all (Ray is only started when some cell may have to run).
    started_ray = _check_resources_early(payloads, markers, options)
    out.mkdir(parents=True, exist_ok=True)
    try:
        tracker = make_tracker(uri, plan.name, out, options.tracking_wait)  # the sqlite store exists before any worker
    except BaseException:  # a locked store: the Ray this call started goes with the refusal
        if started_ray:
            import ray

            ray.shutdown()
        raise
    for cell_id in _lost_artifacts(layout, markers, payloads, options.retry_failed):
        del markers[cell_id]  # set aside: the cell runs again
    layout.write_code_records(plan.code_records)
    accepted = _recompute_changed(layout, plan, markers, payloads, options)
    layout.record_grid_run(plan.name, accepted, options.grid_text)
    reconcile(layout, tracker, markers)
    final = {cid: m["row"]["status"] for cid, m in markers.items() if _is_final(m, options.retry_failed)}

    todo, waiting, pending = _schedule(layout, tracker, plan.name, payloads, final)
    failpoints.failpoint("planning")

    outcome = SweepOutcome(out=out, mlflow_uri=uri, already_finished=plan.total_cells - len(todo))
    progress = Progress(plan.total_cells, outcome.already_finished, options.progress,
                        wait_warning=options.resource_wait_warning, free=_free_resources)
    books = Bookkeeper(layout, tracker, progress)
    if not todo:
        books.close()
        compact(out)  # a driver killed mid-compaction left rows in two files: fold them now
        if started_ray:
            import ray

            ray.shutdown()
    else:
        started_ray = _init_ray(options.address) or started_ray
        try:
            import ray

            check_resources(todo, ray.nodes())  # before any trial: an unmeetable request would hang
            capacity = int(ray.cluster_resources().get("CPU", 1))
            max_concurrent = options.max_concurrent or max(1, capacity)
            os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max_concurrent)
            for shard in _shards(todo, waiting, pending, options.shard_size):
                _run_shard(plan.name, *shard, out, options, books, max_concurrent)
                # Fold this shard's one-row files into the dataset now: reading many small files is
                # what costs memory and time, so never let more than a shard's worth pile up.
                compact(out)
                release_freed_memory()
            outcome.ran = len(todo)
        finally:
            progress.close()
            books.close()
            compact(out)
            if started_ray:
                ray.shutdown()
    tracker.finish()
    outcome.statuses = {}
    for m in layout.markers():
        if m.get("row", {}).get("cell_id") in all_ids:
            status = m["row"]["status"]
            outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
    return outcome


def _schedule(layout: SweepLayout, tracker, name: str, payloads: list[dict], final: dict[str, str]):
    """The cells to run, in order, and who waits on whom: (todo, waiting: prerequisite id -> payloads,
    pending: cell id -> prerequisites left). A cell whose parent failed or was skipped for good is
    recorded as skipped now."""
    todo, waiting, pending = [], {}, {}
    skipped: dict[str, dict] = {}
    for payload in payloads:  # every cell after the cells it requires
        if payload["cell_id"] in final:
            continue
        parent = payload.get("parent_cell_id")
        if parent in final and final[parent] != "done":  # its parent failed or was skipped for good
            skipped[payload["cell_id"]] = skipped_marker(payload, name, _upstream_reason(payload))
            layout.write_marker(payload["cell_id"], skipped[payload["cell_id"]])
            final[payload["cell_id"]] = "skipped"
            continue
        todo.append(payload)
        left = {p for p in payload["requires"] if p not in final}
        if left:
            pending[payload["cell_id"]] = left
            for prerequisite in left:
                waiting.setdefault(prerequisite, []).append(payload)
    if skipped:
        reconcile(layout, tracker, skipped)  # one read of the results table for all of them
    return todo, waiting, pending


def _check_resources_early(payloads: list[dict], markers: dict[str, dict], options: RunOptions) -> bool:
    """check_resources for the cells that may run (unfinished, stale, or any with --rerun), starting
    Ray only when there are some. Returns True when this call started Ray."""
    from sweep.freshness import stale_cells

    stale = set() if options.keep_stale else set(stale_cells({p["cell_id"]: p["code"] for p in payloads}, markers))
    may_run = payloads if options.rerun else [
        p for p in payloads if p["cell_id"] in stale or not _is_final(markers.get(p["cell_id"]), options.retry_failed)]
    if not may_run:
        return False
    import ray

    started = _init_ray(options.address)
    try:
        check_resources(may_run, ray.nodes())
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return started


def _recompute_changed(layout: SweepLayout, plan, markers: dict[str, dict], payloads: list[dict],
                       options: RunOptions) -> dict[str, str | None]:
    """Set aside the finished cells whose code changed (unless keep_stale) and those --rerun selects,
    with every cell that depends on them; they run again. Returns cell id -> the code fingerprint
    each cell of the plan is current with (a kept stale cell: its old one)."""
    from sweep.freshness import changed_files, planned_codes, select_finished, stale_cells, supersede, with_dependents

    planned = planned_codes(plan)
    stale = stale_cells(planned, markers)
    files = ", ".join(changed_files(layout, plan, stale)) if stale else ""
    by_code = set() if options.keep_stale else set(stale)
    by_rerun = select_finished(markers, planned, options.rerun) - by_code if options.rerun else set()
    reasons = {**{cid: f"code changed ({files})" for cid in by_code},
               **{cid: f"--rerun {options.rerun!r}" for cid in by_rerun}}
    if reasons:
        redo = with_dependents(payloads, set(reasons)) & set(markers)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for cell_id in redo:
            supersede(layout, markers.pop(cell_id), reasons.get(cell_id, "a cell it depends on is recomputed"), stamp)
        counts = [f"{len(ids)} {what}" for ids, what in ((by_code, "whose code changed"),
                                                         (by_rerun, "selected by --rerun")) if ids]
        print(f"bdsweep: recomputing {len(redo)} finished cell(s): {' and '.join(counts)}"
              + (f", and {len(redo) - len(reasons)} that depend on them" if len(redo) > len(reasons) else "")
              + f" (old markers in {layout.cells / 'invalidated'}, old artifacts in {layout.root / 'superseded'})",
              file=sys.stderr)
    elif stale:
        print(f"bdsweep: warning: keeping {len(stale)} finished cell(s) whose code changed (--keep-stale): "
              f"{files}", file=sys.stderr)
    kept = {cid: markers[cid]["row"].get("code") for cid in stale if cid in markers}
    return {cid: kept.get(cid, code) for cid, code in planned.items()}


def plan_payloads(plan) -> list[dict]:
    """Every cell of `plan` as a payload, each after the cells it requires."""
    from bdcore.reactivation import ANALYSES  # here, not at the top: workers import this module without torch
    attack_specs = {a.cell_id: a.spec for a in plan.attacks}
    defenses = {d.cell_id: d for d in plan.defenses}
    payloads = [cell_payload(attack, "attack") for attack in plan.attacks]
    payloads += [cell_payload(d, "defense", attack_specs[d.attack_cell_id]) for d in plan.defenses]
    for cell in plan.analyses:
        defense = defenses[cell.defense_cell_id]
        siblings = None
        if ANALYSES.get(cell.spec.analysis).needs_surrogates:
            siblings = [d.cell_id for d in plan.defenses_of(cell.attack_cell_id) if d.cell_id != defense.cell_id]
        payloads.append(cell_payload(cell, "analysis", attack_specs[cell.attack_cell_id], defense, siblings))
    return payloads


def _shards(todo: list[dict], waiting: dict[str, list[dict]], pending: dict[str, set[str]], shard_size: int):
    """Split the work into Tuner runs of at most ~shard_size cells; the cells of one attack cell
    (which are the only ones that wait on each other) always stay in the same shard. Yields
    (ready, waiting, pending, size) per shard."""
    groups: dict[str, list[dict]] = {}
    for payload in todo:
        groups.setdefault(payload["attack_cell_id"], []).append(payload)
    # Groups whose attack already finished first: their cells are ready to run now.
    ordered = sorted(groups.values(), key=lambda group: group[0]["kind"] == "attack")
    shard: list[dict] = []
    for group in ordered:
        if shard and len(shard) + len(group) > shard_size:
            yield _shard(shard, waiting, pending)
            shard = []
        shard += group
    if shard:
        yield _shard(shard, waiting, pending)


def _shard(payloads: list[dict], waiting: dict[str, list[dict]], pending: dict[str, set[str]]):
    ids = {p["cell_id"] for p in payloads}
    ready = [p for p in payloads if p["cell_id"] not in pending]
    ready.sort(key=lambda p: p["kind"] == "attack")  # finish started pipelines before new attacks
    shard_waiting = {}
    for prerequisite, dependents in waiting.items():
        mine = [d for d in dependents if d["cell_id"] in ids]
        if mine:
            shard_waiting[prerequisite] = mine
    shard_pending = {cid: set(left) for cid, left in pending.items() if cid in ids}
    return ready, shard_waiting, shard_pending, len(payloads)


def _free_resources() -> dict:
    import ray

    return ray.available_resources()


class _ProgressCallback(tune.Callback):
    """Tells the progress line when a handed-out trial got its resources and started, and redraws
    it on each step of Tune's loop (while trials wait, no finishing cell would)."""

    def __init__(self, progress: Progress):
        self.progress = progress

    # Tune pickles its run config into the experiment folder; the driver-side progress stays out.
    def __getstate__(self) -> dict:
        return {}

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.progress.trial_started(trial.trial_id)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self.progress.tick()


def _trial_name(trial) -> str:
    cell = trial.config["cell"]
    return f"{cell['kind']}-{cell['cell_id']}-{trial.trial_id}"


def _quiet_tune_logs() -> None:
    # Results live in our own store, so Tune's complaint that it has no result.json to read back
    # (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS) is noise.
    for name in ("ray.tune.analysis.experiment_analysis", "ray.tune.search.searcher", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _run_shard(name: str, ready: list[dict], waiting: dict[str, list[dict]], pending: dict[str, set[str]], size: int,
               out: Path, options: RunOptions, books: Bookkeeper, max_concurrent: int) -> None:
    _quiet_tune_logs()
    common = {"out": str(out), "sweep": name, "device": options.device, "executor": options.executor}
    if options.executor_args:
        common["executor_args"] = dict(options.executor_args)
    if failpoints.armed():
        common["failpoints"] = failpoints.armed()
    searcher = CellSearcher(ready, waiting, pending, common, books, max_concurrent)
    trainable = tune.with_resources(cell_trainable, cell_resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=size, reuse_actors=True,
                                    max_concurrent_trials=max_concurrent,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=str(out / "tune"),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),  # a crashed worker process is retried once
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[_ProgressCallback(books.progress)],
        ),
    )
    tuner.fit()
