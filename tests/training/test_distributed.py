"""Training under torchrun (two CPU processes, gloo) equals one process with the doubled batch, and resumes
under either number of processes. Two-process runs are real `torchrun --standalone` launches: of `python -m dca
train`, or of this file, which as a script trains one process's share (and can stop after a step)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import train_args

from dca.errors import ArgumentError
from dca.training.checkpoint import read_metrics
from dca.training.distributed import DistributedError, setup
from dca.training.train import TrainArgs, train

TESTS = Path(__file__).resolve().parents[1]
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
LORA = {"coprocessor": {"lora_rank": 2}}
FULL = {"grad_accum": 2}  # a full coprocessor: FSDP2; two micro-batches per step test accumulation too


class Stopped(Exception):
    pass


def torchrun(*command: str) -> subprocess.CompletedProcess:
    path = [str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             *command], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def two_processes(args: TrainArgs, stop_after: int | None = None) -> subprocess.CompletedProcess:
    spec = {**dataclasses.asdict(args), "stop_after": stop_after}
    return torchrun(__file__, json.dumps(spec))


def cli_flags(obj) -> list[str]:
    """`dca train` options for a TrainArgs (nested CoprocessorConfig included)."""
    flags = []
    for f in dataclasses.fields(obj):
        value, flag = getattr(obj, f.name), "--" + f.name.replace("_", "-")
        if dataclasses.is_dataclass(value):
            flags += cli_flags(value)
        elif isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "coprocessor.safetensors")


def assert_close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOLERANCE, msg=name)
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.fixture(scope="module")
def one_process(train_assets, tmp_path_factory):
    """The single-process runs with batch 4 that two processes with batch 2 must equal (cached per variant)."""
    cache = {}

    def run(variant: dict) -> Path:
        key = json.dumps(variant, sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("one-process") / "run"
            cache[key] = (train(train_args(train_assets, out, batch_size=4, **variant)), out)
        return cache[key][1]

    return run


def test_two_processes_with_ddp_train_a_lora_coprocessor_as_one_process_with_twice_the_batch(
        train_assets, tmp_path, one_process):
    one = one_process(LORA)
    args = train_args(train_assets, tmp_path / "two", batch_size=2, **LORA)
    result = torchrun("-m", "dca", "train", *cli_flags(args))
    assert "2 processes (DDP)" in result.stderr and result.stderr.count("[dca train]") == 1
    difference = assert_close(adapter(one / "adapter"), adapter(tmp_path / "two" / "adapter"))
    print(f"DDP: largest weight difference {difference:.2e}")
    # rank 0 alone logs: every step once, with the numbers of one process
    logged, reference = read_metrics(tmp_path / "two" / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in logged] == [0, 1, 2, 3, 4, 5, 6]
    for mine, theirs in zip(logged, reference, strict=True):
        for key in ("loss", "base_loss", "grad_norm", "lr", "eval_loss"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (mine["step"], key)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["batch_size"] == 4  # the global batch


def test_two_processes_with_fsdp2_train_a_full_coprocessor_as_one_process_with_twice_the_batch(
        train_assets, tmp_path, one_process):
    one = one_process(FULL)
    result = two_processes(train_args(train_assets, tmp_path / "two", batch_size=2, **FULL))
    assert "2 processes (FSDP2)" in result.stderr
    difference = assert_close(adapter(one / "adapter"), adapter(tmp_path / "two" / "adapter"))
    print(f"FSDP2: largest weight difference {difference:.2e}")
    assert [r["step"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5, 6]


def test_a_run_of_two_processes_resumes_as_one_with_the_doubled_batch(train_assets, tmp_path, one_process, capsys):
    straight = adapter(one_process(FULL) / "adapter")
    # two processes stop after step 3 (checkpoint of step 2); one process with the whole batch finishes
    run = tmp_path / "run"
    two_processes(train_args(train_assets, run, batch_size=2, **FULL), stop_after=3)
    assert not (run / "adapter").exists()
    train(train_args(train_assets, run, batch_size=4, **FULL))
    assert "resuming at step 2" in capsys.readouterr().err
    print(f"2 -> 1 processes: largest weight difference {assert_close(straight, adapter(run / 'adapter')):.2e}")
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5, 6]


def test_a_run_of_one_process_resumes_as_two_with_half_the_batch(train_assets, tmp_path, one_process):
    straight = adapter(one_process(FULL) / "adapter")
    run = tmp_path / "run"

    def stop_after_3(step, _):
        if step == 3:
            raise Stopped

    with pytest.raises(Stopped):
        train(train_args(train_assets, run, batch_size=4, **FULL), callback=stop_after_3)
    result = two_processes(train_args(train_assets, run, batch_size=2, **FULL))
    assert "resuming at step 2" in result.stderr
    print(f"1 -> 2 processes: largest weight difference {assert_close(straight, adapter(run / 'adapter')):.2e}")
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5, 6]


def test_a_resume_with_another_global_batch_is_refused(train_assets, tmp_path):
    run = tmp_path / "run"
    train(train_args(train_assets, run, steps=2, batch_size=4))
    with pytest.raises(ArgumentError, match=r"batch_size: 4 then, 2 now\) \(batch_size is the global batch"):
        train(train_args(train_assets, run, steps=2, batch_size=2))


@pytest.mark.parametrize(("env", "device", "error", "message"), [
    ({"WORLD_SIZE": "2"}, "cpu", DistributedError, "RANK is not set .* torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "cpu", DistributedError, "MASTER_ADDR and MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "cpu", DistributedError, "do not fit WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two"}, "cpu", DistributedError, "not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"},
     "cuda:1", ArgumentError, "device"),
])
def test_a_bad_torchrun_environment_is_refused_before_any_work(monkeypatch, env, device, error, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(error, match=message):
        setup(device)


def test_train_checks_the_environment_before_loading_anything(train_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("dca.training.train.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(DistributedError, match="torchrun"):
        train(train_args(train_assets, tmp_path / "run"))


if __name__ == "__main__":  # one process of a `two_processes` launch
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    stop_after = spec.pop("stop_after")

    def stop(step: int, _record: dict) -> None:
        if step == stop_after:
            raise Stopped

    try:
        train(TrainArgs(**spec), callback=stop)
    except Stopped:
        pass
