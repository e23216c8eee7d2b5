"""What lets `dca train` resume exactly, and only the same run: checkpoints, run identity, the metrics log.

* ``checkpoint/`` holds the adapter's own files plus ``trainer_state.safetensors`` (optimiser tensors,
  RNG states) and ``trainer_state.json`` (step, scheduler, everything else, and the checksum of the
  tensors). Nothing is pickled, so a run folder handed to you cannot run code; it is written with
  `dca.atomic.save_directory`, so a kill at any instant leaves the newest complete checkpoint.
* ``run.json`` says what the run *is*, by content rather than by path: every argument that changes
  the result, the decoder's fingerprint and a hash of the training tokens. It is written before
  the first step; a rerun that differs is refused with the differences, and a moved folder resumes.
* ``metrics.jsonl`` is cut back to the checkpoint's step on resume, so no step is logged twice.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from dca.adapter import adapter_files, check_finite, load_adapter, read_tensors
from dca.atomic import recover, save_directory, write_file
from dca.errors import ArgumentError, DCAError

CHECKPOINT = "checkpoint"
STATE_TENSORS, STATE_JSON = "trainer_state.safetensors", "trainer_state.json"
RUN_FILE, METRICS_FILE = "run.json", "metrics.jsonl"
STATE_FORMAT = 1


class CheckpointError(DCAError, ValueError):
    """A checkpoint or run folder that cannot be resumed (damaged, foreign, or another run's)."""


# ------------------------------------------------------------------ nested state <-> JSON + tensors
def _flatten(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON for everything but tensors, which go to `tensors` under their path; dicts keep int keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[k, _flatten(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint ({key})")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "tensor" in obj:
            return tensors[obj["tensor"]]
        if "tuple" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["tuple"])
        return {k: _unflatten(v, tensors) for k, v in obj["dict"]}
    return obj


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(run_dir: Path, model, optimizer, scheduler, step: int, *,
                    optimizer_state: dict | None = None) -> None:
    """Replace checkpoint/ crash-safely; refuses (NonFiniteError) to write any non-finite tensor.

    `optimizer_state` replaces `optimizer.state_dict()`: a sharded optimiser's state gathered whole
    (`dca.training.distributed`), in the layout of one process, so any number of processes resumes it.
    """
    tensors: dict[str, torch.Tensor] = {}
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    skeleton = _flatten({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                         "rng": rng_state()}, tensors, "state")
    check_finite(tensors, f"checkpoint of step {step}")
    files = adapter_files(model, run_dir / CHECKPOINT)
    files[STATE_TENSORS] = save(tensors)
    meta = {"format": STATE_FORMAT, "step": step, "state": skeleton,
            "tensors_sha256": hashlib.sha256(files[STATE_TENSORS]).hexdigest()}
    files[STATE_JSON] = json.dumps(meta, allow_nan=False).encode()
    save_directory(run_dir / CHECKPOINT, files)


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's checkpoint (finishing an interrupted save first), or None if there is none."""
    recover(run_dir / CHECKPOINT)
    folder = run_dir / CHECKPOINT
    path = folder / STATE_JSON
    if not folder.exists():
        return None
    if not path.is_file():
        if (folder / "trainer_state.pt").is_file():
            raise CheckpointError(f"{folder} was written by an older dca as a pickle, which dca no longer loads "
                                  "(it could run code); delete it to start the run again")
        raise CheckpointError(f"{folder} is damaged ({STATE_JSON} is missing); delete it to start the run again")
    try:
        meta = json.loads(path.read_text())
        return int(meta["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged ({err}); delete {run_dir / CHECKPOINT} to start again") from err


def load_checkpoint(run_dir: Path, decoder) -> tuple[Any, dict]:
    """(the coprocessor, {"step", "optimizer", "scheduler", "rng"}) of the run's checkpoint."""
    folder = run_dir / CHECKPOINT
    meta = json.loads((folder / STATE_JSON).read_text())
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{folder} has trainer-state format {meta.get('format')}, this dca reads {STATE_FORMAT}")
    tensors = read_tensors(folder / STATE_TENSORS, meta["tensors_sha256"], STATE_JSON, CheckpointError)
    state = _unflatten(meta["state"], tensors)
    return load_adapter(folder, decoder), {"step": int(meta["step"]), **state}


# ------------------------------------------------------------------ run identity
def _differences(saved: dict, current: dict) -> list[str]:
    """What differs among the keys both know."""
    return [f"{key}: {saved[key]!r} then, {current[key]!r} now"
            for key in sorted(set(saved) & set(current)) if saved[key] != current[key]]


def check_run_identity(run_dir: Path, identity: dict[str, Any]) -> None:
    """Record `identity` in run.json, or refuse if the run folder already holds another run.

    Keys missing from the saved identity are filled in (a run may be killed before it knew all of them).
    """
    path = run_dir / RUN_FILE
    saved: dict[str, Any] = {}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is damaged ({err}); delete the run folder to start again") from err
        differences = _differences(saved, identity)
        if differences:
            hint = " (batch_size is the global batch: --batch-size x processes)" if any(
                d.startswith("batch_size:") for d in differences) else ""
            raise ArgumentError("out", f"{run_dir} holds another run ({'; '.join(differences)}){hint}: use another "
                                       "--out, or the same arguments, model and data to resume it")
    if set(identity) - set(saved):
        write_file(path, json.dumps({**saved, **identity}, indent=2, sort_keys=True).encode())


def tensor_digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ the metrics log
def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a half-written last line (a kill mid-write) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]


def trim_metrics(path: Path, last_step: int) -> list[dict]:
    """Keep the records of steps <= `last_step` (what the checkpoint has seen), rewritten crash-safely."""
    recover(path)
    records = [r for r in read_metrics(path) if r["step"] <= last_step]
    if path.exists():
        write_file(path, "".join(json.dumps(r) + "\n" for r in records).encode())
    return records
