"""The grid of runs: plan it, skip what results.jsonl already holds, run the rest in worker processes.

Each (method, batch size, seed) is one `train_run` in a worker process (spawned, one torch thread each).
The parent alone writes results.jsonl, one line per finished run (see `normlab.study.results`), so an
interruption at any moment — Ctrl-C, kill — loses only the runs in flight; rerunning the same command
skips every run already recorded under the same protocol.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import normlab
from normlab.registry import canonical_name
from normlab.study.data import StudyData, load_dataset
from normlab.study.progress import Progress
from normlab.study.report import write_report
from normlab.study.results import append_record, read_records, repair
from normlab.study.train import RunSpec

RESULTS_FILE = "results.jsonl"
STUDY_VERSION = 1  # bump when the network or the training protocol changes: old records stop matching

METHOD_ORDER = ("bn", "gn", "ln", "in", "sn", "wn", "cosine", "none")
DEFAULT_BATCH_SIZES = (2, 4, 8, 16, 32)


def default_methods() -> list[str]:
    """Every method in METHOD_ORDER that is registered (weight-side ones once they exist), plus none."""
    available = set(normlab.list_norms())
    return [m for m in METHOD_ORDER if m in available or m == "none"]


@dataclass
class StudyConfig:
    methods: list[str] = field(default_factory=default_methods)
    batch_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_BATCH_SIZES))
    seeds: int = 3
    epochs: int = 5
    base_lr: float = 0.1
    dataset: str = "digits"
    data_dir: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    out: str = "study-out"
    workers: int = 2
    device: str = "cpu"

    def protocol(self) -> dict:
        """Everything besides (method, batch size, seed) that determines a run's result."""
        protocol = {
            "version": STUDY_VERSION,
            "dataset": self.dataset,
            "train_size": self.train_size,
            "test_size": self.test_size,
            "epochs": self.epochs,
            "base_lr": self.base_lr,
        }
        if self.data_dir is not None:  # other files, other results
            protocol["data_dir"] = str(Path(self.data_dir).resolve())
        return protocol

    def protocol_id(self) -> str:
        text = json.dumps(self.protocol(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def specs(self) -> list[RunSpec]:
        """Every run of the grid: seed by seed (a partial study is complete for its first seeds), longest
        runs first within a seed (small batches take the most steps), which balances the workers."""
        grid = [
            RunSpec(m, b, s, self.epochs, self.base_lr)
            for s in range(self.seeds)
            for b in sorted(self.batch_sizes)
            for m in self.methods
        ]
        return sorted(grid, key=lambda r: (r.seed, r.batch_size))


# --quick: a taste of the study in well under a minute (the tests use it).
QUICK = {"methods": ["bn", "gn", "sn"], "batch_sizes": [2, 8, 32], "seeds": 1, "epochs": 1}


def study_config(quick: bool = False, **options) -> StudyConfig:
    """A StudyConfig from the defaults (or the --quick preset), overridden by every option not None."""
    config = StudyConfig(**QUICK) if quick else StudyConfig()
    for name, value in options.items():
        if value is not None:
            setattr(config, name, value)
    return config


@dataclass
class StudyOutcome:
    records: list[dict]  # the grid's records, old and new
    failures: list[tuple[RunSpec, str]]
    interrupted: bool
    skipped: int  # runs found already done
    results_path: Path
    paths: dict[str, Path] = field(default_factory=dict)  # report and figures, when written

    @property
    def complete(self) -> bool:
        return not self.failures and not self.interrupted


def run_key(record: dict) -> tuple:
    return (record.get("protocol_id"), record.get("method"), record.get("batch_size"), record.get("seed"))


def grid_records(config: StudyConfig, records: list[dict]) -> list[dict]:
    """The records of ``config``'s grid (the last one per run, should a run appear twice)."""
    wanted = {(config.protocol_id(), s.method, s.batch_size, s.seed) for s in config.specs()}
    latest = {run_key(r): r for r in records if run_key(r) in wanted}
    return list(latest.values())


def run_study(config: StudyConfig, log: TextIO | None = None) -> StudyOutcome:
    """Run every missing run of the grid, appending each to ``<out>/results.jsonl`` as it finishes."""
    log = log if log is not None else sys.stderr
    _check_config(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    cut = repair(path)
    if cut:
        print(f"{path}: removed a partial last line ({cut} bytes) left by an interruption", file=log)
    records, bad = read_records(path)
    if bad:
        print(f"{path}: ignored {bad} unreadable line(s)", file=log)
    done = {run_key(r) for r in grid_records(config, records)}
    pid = config.protocol_id()
    todo = [s for s in config.specs() if (pid, s.method, s.batch_size, s.seed) not in done]

    data = load_dataset(config.dataset, config.data_dir, config.train_size, config.test_size)
    for spec in todo:
        if spec.batch_size > len(data.y_train):
            raise ValueError(f"batch size {spec.batch_size} exceeds the {len(data.y_train)} training samples")
    print(f"data: {data.describe()}", file=log)
    print(
        f"grid: {len(config.methods)} methods x {len(config.batch_sizes)} batch sizes x {config.seeds} seeds, "
        f"{config.epochs} epochs, lr {config.base_lr} x B/32; {len(done)} runs already in {path}, "
        f"{len(todo)} to go on {config.workers} worker(s)",
        file=log,
    )
    failures: list[tuple[RunSpec, str]] = []
    interrupted = False
    if todo:
        _build_kernels_first(config.device, log)
        interrupted = _run_all(config, data, todo, path, failures, log)
    records, _ = read_records(path)
    outcome = StudyOutcome(grid_records(config, records), failures, interrupted, len(done), path)
    if outcome.records and not interrupted:
        outcome.paths = write_report(
            outcome.records,
            config.methods,
            config.batch_sizes,
            out,
            title=title(config),
            protocol_text=protocol_text(config, data),
        )
    return outcome


def title(config: StudyConfig) -> str:
    return f"normlab study: {config.dataset}, {config.epochs} epochs, {config.seeds} seed(s)"


def protocol_text(config: StudyConfig, data: StudyData) -> str:
    return (
        f"Data: {data.describe()}. Network: conv trunk down to 2 positions per side, then a two-layer MLP "
        f"head (normlab.study.model). Protocol, identical for every method: SGD with momentum 0.9, "
        f"learning rate {config.base_lr} x B/32 with cosine decay, {config.epochs} epochs at every batch "
        f"size, the same initial weights and data order per seed; test error in eval mode."
    )


def _check_config(config: StudyConfig) -> None:
    if not config.methods:
        raise ValueError("no methods to study: pass at least one, e.g. --methods bn,gn")
    config.methods = [canonical_name(m) for m in config.methods]  # raises with the list of known names
    if len(set(config.methods)) != len(config.methods):
        raise ValueError(f"methods are repeated: {config.methods}")
    if not config.batch_sizes or min(config.batch_sizes) < 2:
        raise ValueError(f"batch sizes must be at least 2 (BN needs two samples), got {config.batch_sizes}")
    for name, value in (("seeds", config.seeds), ("epochs", config.epochs), ("workers", config.workers)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not config.base_lr > 0:
        raise ValueError(f"the base learning rate must be positive, got {config.base_lr}")
    import torch

    try:
        device = torch.device(config.device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {config.device!r}: expected e.g. cpu, cuda, cuda:1") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} requested but torch sees no CUDA device; use --device cpu")


def _build_kernels_first(device: str, log) -> None:
    """Build normlab's native CPU kernels here, before any run's clock starts: in a fresh environment their
    one-time build (about a minute) would otherwise count in the wall time of each worker's first run."""
    import torch

    from normlab.kernels import native_backend

    if torch.device(device).type != "cpu" or not native_backend.needs_build():
        return
    print("building normlab's native CPU kernels (once per environment, about a minute)", file=log, flush=True)
    native_backend.library()


def _run_all(config, data: StudyData, todo: list[RunSpec], path: Path, failures: list, log) -> bool:
    """Run ``todo``; returns True when interrupted. The parent writes every record."""
    n = len(data.y_train)
    progress = Progress(len(todo), sum(s.steps_per_epoch(n) * s.epochs for s in todo), config.workers, log)
    progress.draw()
    meta = {
        "protocol_id": config.protocol_id(),
        "protocol": config.protocol(),
        "normlab_version": getattr(normlab, "__version__", None),
    }

    def finish(spec: RunSpec, result: dict | None, error: str | None) -> None:
        label = f"{spec.method} B={spec.batch_size} seed {spec.seed}"
        if error is not None:
            failures.append((spec, error))
            progress.failed(spec.steps_per_epoch(n) * spec.epochs, f"{label}: FAILED")
            print(f"\nrun {label} failed:\n{error}", file=log)
            return
        record = {**result, **meta, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        append_record(path, record)
        note = f"{label}: test error {100 * result['test_error']:.1f}% ({result['wall_s']:.1f}s)"
        progress.finished(result["steps"], result["wall_s"], note)

    previous = signal.getsignal(signal.SIGTERM)
    if _in_main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if config.workers == 1:
            _run_inline(config, data, todo, finish)
        else:
            _run_pool(config, todo, finish, tick=progress.draw)
        return False
    except KeyboardInterrupt:
        progress.close()
        print(
            f"interrupted: {progress.done - len(failures)} new run(s) saved in {path}; "
            "rerun the same command to resume",
            file=log,
        )
        return True
    finally:
        if _in_main_thread():
            signal.signal(signal.SIGTERM, previous)
        progress.close()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run_inline(config: StudyConfig, data: StudyData, todo: list[RunSpec], finish) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for spec in todo:
            result, error = _safe_train(spec, data, config.device)
            finish(spec, result, error)
    finally:
        torch.set_num_threads(threads)


def _safe_train(spec: RunSpec, data: StudyData, device: str) -> tuple[dict | None, str | None]:
    from normlab.study.train import train_run

    try:
        return train_run(spec, data, device), None
    except Exception:
        return None, traceback.format_exc()


# --- worker processes ------------------------------------------------------------------------------------
# A small pool of our own rather than multiprocessing.Pool: a worker that dies (out of memory, killed)
# must fail its run instead of hanging the study, and an interruption must end the workers at once.


def _worker_main(worker: int, tasks, results, data_args: tuple, device: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _exit_with_parent()
    import torch

    torch.set_num_threads(1)
    try:
        data = load_dataset(*data_args)
    except Exception:
        results.put(("fatal", worker, None, traceback.format_exc()))
        return
    while True:
        spec = tasks.get()
        if spec is None:
            return
        results.put(("start", worker, spec, None))
        result, error = _safe_train(spec, data, device)
        results.put(("done", worker, spec, (result, error)))


def _exit_with_parent() -> None:
    """End this worker as soon as the parent is gone (say kill -9): nobody would record its results."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's sentinel closes, i.e. when it has exited
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _run_pool(config: StudyConfig, todo: list[RunSpec], finish, tick=lambda: None) -> None:
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools or locks
    tasks, results = ctx.Queue(), ctx.Queue()
    for spec in todo:
        tasks.put(spec)
    workers = min(config.workers, len(todo))
    for _ in range(workers):
        tasks.put(None)  # one stop sign per worker
    data_args = (config.dataset, config.data_dir, config.train_size, config.test_size)
    procs = [
        ctx.Process(target=_worker_main, args=(i, tasks, results, data_args, config.device), daemon=True)
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    in_flight: dict[int, RunSpec] = {}
    remaining = len(todo)
    try:
        while remaining:
            try:
                kind, worker, spec, payload = results.get(timeout=0.5)
            except queue.Empty:
                remaining -= _reap_dead_workers(procs, in_flight, finish)
                tick()  # keeps a terminal's elapsed time moving during long runs
                continue
            if kind == "start":
                in_flight[worker] = spec
            elif kind == "done":
                in_flight.pop(worker, None)
                finish(spec, *payload)
                remaining -= 1
            elif kind == "fatal":
                raise RuntimeError(f"a worker could not load the data:\n{payload}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
        for q in (tasks, results):
            q.cancel_join_thread()
            q.close()


def _reap_dead_workers(procs, in_flight: dict, finish) -> int:
    """Fail the run of each worker that died; returns how many runs that finished. Raises when no worker
    is left (the results queue was found empty before this is called, so nothing is lost in transit)."""
    failed = 0
    for i, p in enumerate(procs):
        if p.exitcode not in (None, 0) and i in in_flight:
            finish(in_flight.pop(i), None, f"worker process {p.pid} died (exit code {p.exitcode})")
            failed += 1
    if all(p.exitcode is not None for p in procs):
        raise RuntimeError("every worker process has exited before the grid was done")
    return failed
