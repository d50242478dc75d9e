"""Schedules the service runs: mirror updates, snapshot policies, replication pulls.

    jobs = Jobs()
    jobs.add("mirror /srv/copy.img", every_seconds=60, fn=lambda: mirror_once(...))

The service starts its jobs when it starts serving and stops them before it
closes the volume (`start()` / `stop()`). Each job runs on one thread of its own,
first `every_seconds` after the start, then `every_seconds` after its previous
run *ended* (a slow run is never run twice at once, and never stacks up). An
exception a job raises is logged and kept as its `last_error`; the job runs
again at its next time and the service goes on. `status()` is what
`blockxfer info --json` shows of a served volume under `server.jobs`:
`[{"name", "every_seconds", "last_run", "last_error", "next_run"}]`, times in
Unix seconds (None before the first run). A job that works on the volume takes
the volume lock like any control command (use the service's `VolumeOps`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("blockxfer.jobs")


@dataclass
class Job:
    name: str
    every_seconds: float
    fn: Callable[[], object]
    last_run: float | None = None
    last_error: str | None = None
    next_run: float | None = None
    runs: int = 0
    first: float | None = None          # seconds before the first run (None: every_seconds)
    from_start: bool = False            # the next run is due every_seconds after the
    #                                     previous one *started* (a mirror's timer)
    thread: threading.Thread | None = field(default=None, repr=False)
    stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self) -> float:
        """Seconds until the next run."""
        if self.last_run is None:
            return self.every_seconds if self.first is None else self.first
        if not self.from_start:
            return self.every_seconds
        return max(0.0, self.last_run + self.every_seconds - time.time())

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "every_seconds": self.every_seconds,
                "last_run": self.last_run, "last_error": self.last_error,
                "next_run": self.next_run, "runs": self.runs}


class Jobs:
    """The service's scheduled jobs."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._stop = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def add(self, name: str, every_seconds: float, fn: Callable[[], object], *,
            first: float | None = None, from_start: bool = False) -> Job:
        """Schedule `fn` every `every_seconds` (the first run after `first` seconds,
        if given); started at once if the service runs."""
        if every_seconds <= 0:
            raise ValueError("every_seconds must be positive")
        job = Job(name, float(every_seconds), fn, first=first, from_start=from_start)
        with self._lock:
            if name in self._jobs:
                raise ValueError(f"a job named {name!r} exists already")
            self._jobs[name] = job
            if self._stop.is_set():
                job.stop.set()
            if self._started:
                self._launch(job)
        return job

    def start(self) -> None:
        with self._lock:
            self._started = True
            for job in self._jobs.values():
                self._launch(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop scheduling; wait (up to `timeout`) for runs in progress to end."""
        self._stop.set()
        with self._lock:
            for j in self._jobs.values():
                j.stop.set()
            threads = [j.thread for j in self._jobs.values() if j.thread is not None]
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def remove(self, name: str, timeout: float = 60.0) -> Job | None:
        """Unschedule job `name` and wait (up to `timeout`) for a run in progress to
        end; the job, or None when there was none."""
        with self._lock:
            job = self._jobs.pop(name, None)
        if job is None:
            return None
        job.stop.set()
        if job.thread is not None and job.thread is not threading.current_thread():
            job.thread.join(timeout)
        return job

    def get(self, name: str) -> Job | None:
        with self._lock:
            return self._jobs.get(name)

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.status() for j in self._jobs.values()]

    def _launch(self, job: Job) -> None:
        job.thread = threading.Thread(target=self._loop, args=(job,), daemon=True,
                                      name=f"job {job.name}")
        job.thread.start()

    def _loop(self, job: Job) -> None:
        while True:
            wait = job.wait()
            job.next_run = time.time() + wait
            if job.stop.wait(wait):
                job.next_run = None
                return
            self.run_once(job)

    @staticmethod
    def run_once(job: Job) -> None:
        """Run the job now; an error is logged and remembered, never raised."""
        job.last_run = time.time()
        try:
            job.fn()
            job.last_error = None
        except Exception as e:   # a job's failure must not stop the service
            log.warning("job %s failed: %s", job.name, e)
            job.last_error = str(e) or type(e).__name__
        finally:
            job.runs += 1
