"""Dynamic batching: requests wait in a bounded queue; one worker thread runs them in batches.

The worker takes the oldest waiting job, waits up to `max_wait` seconds for more jobs with the same `augment`
value (all else may differ within a batch, see `dca.serve.batch`), and runs up to `max_batch` rows at once.
A full queue refuses new jobs (`QueueFull`: the server answers 503); a cancelled job is dropped before it runs
and stops at its next token while it runs; `stop()` runs what is queued, then ends the worker.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from dca.model import AugmentedLM
from dca.serve.batch import Row, generate_rows


class QueueFull(Exception):
    """The queue holds `max_queue` waiting jobs already."""


class ShuttingDown(Exception):
    """The engine is stopping and takes no new jobs."""


@dataclass
class Job:
    """One request: its rows (one per prompt and choice) share an `augment` value and a cancel flag."""

    rows: list[Row]
    augment: Any = True  # passed to AugmentedLM.generate as it is
    on_done: Callable[[Job], None] | None = None  # called from the worker thread when the job ends
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=itertools.count().__next__)

    def __post_init__(self) -> None:
        for row in self.rows:
            row.is_cancelled = self.cancelled.is_set

    def cancel(self) -> None:
        self.cancelled.set()

    def batch_key(self) -> tuple:
        return (type(self.augment).__name__, self.augment)  # True and 1 must not share a batch


class Engine:
    """A worker thread that batches the jobs submitted to it. Thread-safe; `submit` never blocks."""

    def __init__(self, model: AugmentedLM, tokenizer: PreTrainedTokenizerBase, *, max_batch: int = 8,
                 max_wait: float = 0.01, max_queue: int = 64, store: Any = None):
        self.model, self.tokenizer = model, tokenizer
        self.store = store  # a dca.serve.store.ContextStore: prompts that start with a stored document reuse it
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self.tokenizer_lock = threading.Lock()  # whoever encodes beside the worker's decoding holds it
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = {"completed": 0, "cancelled": 0, "rejected": 0, "failed": 0, "batches": 0, "running": 0,
                      "largest_batch": 0}

    # ------------------------------------------------------------------ control
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._work, name="dca-serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish every queued and running one, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self._pending)} requests are waiting already (the limit is {self.max_queue})")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    # ------------------------------------------------------------------ worker
    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            key = self._pending[0].batch_key()
            deadline = time.monotonic() + self.max_wait
            # wait a little for company, unless the batch is full already or we are draining
            while not self._stopping and self._rows(key) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, rows = [], 0
            for job in list(self._pending):
                if job.batch_key() != key:
                    continue
                if batch and rows + len(job.rows) > self.max_batch:
                    break
                batch.append(job)
                rows += len(job.rows)
                self._pending.remove(job)
            self.stats["running"] = len(batch)
            return batch

    def _rows(self, key: tuple) -> int:
        return sum(len(job.rows) for job in self._pending if job.batch_key() == key)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [job for job in batch if not job.cancelled.is_set()]
            for job in batch:
                if job.cancelled.is_set():
                    for row in job.rows:
                        row.finish_reason = "cancelled"
            try:
                if live:
                    self.stats["batches"] += 1
                    self.stats["largest_batch"] = max(self.stats["largest_batch"], sum(len(j.rows) for j in live))
                    generate_rows(self.model, self.tokenizer, [row for job in live for row in job.rows],
                                  live[0].augment, self.tokenizer_lock,
                                  **({"store": self.store} if self.store is not None else {}))
            except Exception as err:  # a bug or a bad input that got past validation: fail these jobs, keep serving
                for job in live:
                    job.error = err
            finally:
                with self._cond:
                    self.stats["running"] = 0
                for job in batch:
                    cancelled = job.cancelled.is_set() or any(r.finish_reason == "cancelled" for r in job.rows)
                    self.stats["failed" if job.error else "cancelled" if cancelled else "completed"] += 1
                    job.done.set()
                    if job.on_done is not None:
                        job.on_done(job)
