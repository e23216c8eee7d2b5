"""The engine's batching, queue bound, cancellation and draining, with generation replaced by a recorder."""

import pytest

from dca.serve import engine as engine_module
from dca.serve.batch import Row
from dca.serve.engine import Engine, Job, QueueFull, ShuttingDown


@pytest.fixture
def batches(monkeypatch):
    """Every batch the engine runs, as (augment, [prompt of each row]); a prompt [666] makes generation fail."""
    seen = []

    def record(model, tokenizer, rows, augment=True, tokenizer_lock=None):
        seen.append((augment, [row.prompt_ids[0] for row in rows]))
        if any(row.prompt_ids == [666] for row in rows):
            raise RuntimeError("boom")
        for row in rows:
            row.finish_reason = "length"

    monkeypatch.setattr(engine_module, "generate_rows", record)
    return seen


def job(prompt, augment=True, n=1):
    return Job([Row([prompt], 4) for _ in range(n)], augment=augment)


def test_batches_group_by_augment_in_order_and_respect_max_batch(batches):
    engine = Engine(None, None, max_batch=3, max_wait=0.0, max_queue=16)
    jobs = [job(1), job(2, augment=False), job(3, n=2), job(4), job(5, augment=False), job(6)]
    for j in jobs:
        engine.submit(j)  # all queued before the worker starts: batching depends on nothing but the queue
    engine.start()
    engine.stop()
    assert batches == [(True, [1, 3, 3]), (False, [2, 5]), (True, [4, 6])]
    assert all(j.done.is_set() and j.error is None for j in jobs)
    assert engine.stats["completed"] == 6 and engine.stats["largest_batch"] == 3


def test_a_full_queue_refuses_and_a_stopping_engine_too(batches):
    engine = Engine(None, None, max_queue=2)
    engine.submit(job(1))
    engine.submit(job(2))
    with pytest.raises(QueueFull):
        engine.submit(job(3))
    assert engine.stats["rejected"] == 1
    engine.start()
    engine.stop()
    with pytest.raises(ShuttingDown):
        engine.submit(job(4))
    assert [prompts for _, prompts in batches] == [[1, 2]]


def test_cancelled_jobs_are_dropped_and_failures_stay_with_their_batch(batches):
    engine = Engine(None, None, max_batch=1, max_wait=0.0)
    cancelled, failing, fine = job(1), job(666), job(2)
    cancelled.cancel()
    for j in (cancelled, failing, fine):
        engine.submit(j)
    engine.start()
    engine.stop()
    assert [prompts for _, prompts in batches] == [[666], [2]]  # the cancelled job never ran
    assert cancelled.rows[0].finish_reason == "cancelled" and cancelled.done.is_set()
    assert isinstance(failing.error, RuntimeError) and fine.error is None and fine.rows[0].finish_reason == "length"
    assert (engine.stats["cancelled"], engine.stats["failed"], engine.stats["completed"]) == (1, 1, 1)
