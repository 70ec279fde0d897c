"""`blockmem eval`: every (task, length, sample) through every system, one JSONL record each.

Resumable: a record is appended (and fsynced) as soon as its sample finishes, and a run started
again with the same results file skips every (model, seed, system, task, length, index) already
there, so an interrupted run continues where it stopped. A torn last line (a run killed mid-write)
is cut off before appending. One runner writes a results file at a time (a lock file beside it).

Each (system, length) runs in its own worker process (blockmem.eval.worker); its stderr goes to
RESULTS.log. With `jobs` > 1 that many workers run at once, each (system, length)'s samples dealt
out among them (on N cores `jobs=N, threads=1` keeps every core on a sample of its own); one runner
still writes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blockmem.errors import ConfigError
from blockmem.eval.systems import SystemSpec, worker_failure
from blockmem.eval.tasks import TaskOptions

Key = tuple[str, int, str, str, int, int]  # model, seed, system, task, length, index


@dataclass
class EvalPlan:
    model: str | None
    tasks: list[str]
    lengths: list[int]
    systems: list[SystemSpec]
    samples: int
    out: Path
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    chunk: int = 1024
    options: TaskOptions = field(default_factory=TaskOptions)
    kvpress_python: str | None = None
    ram_budget: str | None = None  # memory tiers for block-memory methods (bytes moved per token)
    jobs: int = 1  # worker processes at once

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}", "e.g. --samples 20 per task and length")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.jobs}", "e.g. --jobs 2 --threads 1 on two cores")

    def model_name(self) -> str:
        from blockmem.model.loader import resolve

        return resolve(self.model)[0]


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a results file (a torn last line is skipped)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ConfigError(f"{path} line {number} is not JSON", "restore the file or start a new one") from None
    return records


def _key(record: dict[str, Any]) -> Key:
    return (record["model"], record["seed"], record["system"], record["task"], record["length"], record["index"])


@contextlib.contextmanager
def results_file(path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Lock `path` for this run, cut a torn last line, and yield an append(record) function."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:  # held open and locked for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another blockmem run is writing {path}", "wait for it, or pass another --out") from None
        handle.seek(0, os.SEEK_END)
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # a torn record: keep whole lines only
                handle.seek(0)
                data = handle.read()
                handle.truncate(data.rfind(b"\n") + 1)

        def append(record: dict[str, Any]) -> None:
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
                out.flush()
                os.fsync(out.fileno())

        yield append


def pending(plan: EvalPlan, name: str, done: set[Key], system: SystemSpec, length: int) -> list[tuple[str, int]]:
    """The (task, index) samples of one system and length not yet in the file, index by index:
    sample 0 of every task, then sample 1, ..., so that a run stopped early leaves every task with
    about as many samples as the others (and `report --samples K` finds the first K of each)."""
    return [(task, index) for index in range(plan.samples) for task in plan.tasks
            if (name, plan.seed, system.label, task, length, index) not in done]


def deal(work: list[tuple[str, int]], tasks: list[str], jobs: int) -> list[list[tuple[str, int]]]:
    """Split one group's pending (task, index) samples into `jobs` hands, keeping their order:
    sample (task, index) goes to hand (position of task + index) mod jobs, so that each hand gets
    every task in turn (dealing the list round-robin would give each of two hands only half of
    an even number of tasks, and every sample of a slow task to one worker). Empty hands are
    dropped."""
    hands: list[list[tuple[str, int]]] = [[] for _ in range(jobs)]
    position = {task: n for n, task in enumerate(tasks)}
    for task, index in work:
        hands[(position[task] + index) % jobs].append((task, index))
    return [hand for hand in hands if hand]


def run_eval(plan: EvalPlan, on_record: Callable[[dict[str, Any]], None] | None = None,
             on_group: Callable[[str, int, int], None] | None = None,
             on_plan: Callable[[int], None] | None = None) -> list[str]:
    """Run what is missing from plan.out; returns one message per worker that failed.
    on_plan(samples still to run) comes first, on_group(system, length, samples) as each worker
    starts, on_record(record) after each sample (one at a time, whatever plan.jobs is)."""
    name = plan.model_name()
    with results_file(plan.out) as append:
        done = {_key(r) for r in read_records(plan.out) if "model" in r}
        units = []  # (system, length, samples) for one worker: a group's work dealt into plan.jobs hands
        for length in plan.lengths:
            for system in plan.systems:
                work = pending(plan, name, done, system, length)
                units += [(system, length, hand) for hand in deal(work, plan.tasks, plan.jobs)]
        if on_plan:
            on_plan(sum(len(work) for _, _, work in units))
        lock = threading.Lock()  # one record at a time into the file and the callbacks
        workers = _Workers()

        def deliver(record: dict[str, Any]) -> None:
            with lock:
                append(record)
                if on_record:
                    on_record(record)

        def run_unit(unit: tuple[SystemSpec, int, list[tuple[str, int]]]) -> str | None:
            system, length, work = unit
            if on_group:
                with lock:
                    on_group(system.label, length, len(work))
            job = {"system": asdict(system), "model": plan.model, "model_name": name, "dtype": plan.dtype,
                   "device": plan.device, "threads": plan.threads, "chunk": plan.chunk, "seed": plan.seed,
                   "length": length, "work": work, "task_options": asdict(plan.options),
                   "kvpress_python": plan.kvpress_python, "ram_budget": plan.ram_budget,
                   "log": str(_log(plan.out))}
            failure = _run_worker(job, plan.out, deliver, workers)
            return f"{system.label} at {length} tokens: {failure}" if failure else None

        with ThreadPoolExecutor(max_workers=plan.jobs, thread_name_prefix="eval-worker") as pool:
            try:
                failures = list(pool.map(run_unit, units))
            except BaseException:  # Ctrl-C: stop every worker, or the pool waits for them
                pool.shutdown(wait=False, cancel_futures=True)
                workers.stop()
                raise
    return [failure for failure in failures if failure]


def _log(out: Path) -> Path:
    return out.with_name(out.name + ".log")


class _Workers:
    """The worker processes running now, so that a stopped run can kill them all (and any started
    after the stop)."""

    def __init__(self) -> None:
        self.lock, self.running, self.stopped = threading.Lock(), set[subprocess.Popen[str]](), False

    def started(self, process: subprocess.Popen[str]) -> None:
        with self.lock:
            self.running.add(process)
            if self.stopped:
                process.kill()

    def ended(self, process: subprocess.Popen[str]) -> None:
        with self.lock:
            self.running.discard(process)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for process in self.running:
                process.kill()


def _run_worker(job: dict[str, Any], out: Path, deliver: Callable[[dict[str, Any]], None],
                workers: _Workers) -> str | None:
    log = _log(out)
    with open(log, "ab") as stderr:
        stderr.write(f"--- {job['system']['label']} at {job['length']} tokens\n".encode())
        stderr.flush()
        process = subprocess.Popen([sys.executable, "-m", "blockmem.eval.worker"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
        workers.started(process)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(job))
        process.stdin.close()
        error = None
        try:
            for line in process.stdout:
                if not line.startswith("{"):
                    continue
                record = json.loads(line)
                if "error" in record:
                    error = record["error"] + (f" (fix: {record['fix']})" if record.get("fix") else "")
                    continue
                deliver(record)
        except BaseException:
            process.kill()
            raise
        finally:
            workers.ended(process)
        code = process.wait()
    if error:
        return error
    if code != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        return f"{worker_failure(job['system']['kind'], code, tail[0] if tail else None)}; see {log}"
    return None
