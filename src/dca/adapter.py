"""Saving and loading a trained coprocessor, PEFT-style: a folder with config JSON + safetensors.

The folder records the base model it was trained for (architecture, sizes, a fingerprint of its
weights) and a checksum of the weights file, so a coprocessor is never silently loaded onto the
wrong decoder or from a damaged or edited file: the config carries a checksum of itself and of the
weights. Saves are crash-safe at every instant (`dca.atomic`): an interrupted save leaves the
previous adapter or the new one, never half of one and never none. Nothing non-finite is written or
loaded, and nothing loaded can run code (safetensors and JSON only).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from transformers import PreTrainedModel

from dca.atomic import recover, save_directory
from dca.config import CoprocessorConfig
from dca.errors import DCAError, NonFiniteError

if TYPE_CHECKING:
    from dca.model import AugmentedLM

CONFIG_NAME = "dca_config.json"
WEIGHTS_NAME = "coprocessor.safetensors"
FORMAT_VERSION = 2  # 2: the config's own checksum, dtype-independent fingerprints; 1 is still read
READABLE_VERSIONS = (1, 2)


class AdapterError(DCAError, ValueError):
    """A saved coprocessor that cannot be loaded as asked (wrong decoder, damaged or missing files)."""


def _fingerprint(decoder: PreTrainedModel, *, legacy: bool = False) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(decoder.state_dict().items()):
        flat = tensor.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)].cpu()
        if legacy:  # format 1: exact float32 values and the dtype, so a bf16 copy never matched
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(sample.float().numpy().tobytes())
        else:
            digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
            digest.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def decoder_fingerprint(decoder: PreTrainedModel) -> str:
    """A short hash of the decoder's weights: names, shapes and a strided sample of values rounded to bf16.

    Exact values only (no reductions), so the same weights hash alike on any device, and a float32,
    bf16 or fp32-from-bf16 copy of one model hash alike (a coprocessor trained on one runs on the other).
    """
    return _fingerprint(decoder)


def display_name(name_or_path: str) -> str:
    """What a saved file may say about where a model came from: a hub name, or a local folder's own name
    (builtin models live in folders named after them), never a path into the user's disk."""
    path = Path(name_or_path).expanduser()
    return path.name if path.is_absolute() or path.exists() else name_or_path


def describe_decoder(decoder: PreTrainedModel) -> dict[str, Any]:
    config = decoder.config.get_text_config(decoder=True)
    return {
        "model_type": config.model_type,
        "architectures": list(decoder.config.architectures or [type(decoder).__name__]),
        "name_or_path": display_name(str(getattr(decoder.config, "_name_or_path", "") or "")),
        "hidden_size": decoder.get_input_embeddings().embedding_dim,
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": decoder.get_input_embeddings().num_embeddings,
        "dtype": str(decoder.dtype).removeprefix("torch."),
        "fingerprint": decoder_fingerprint(decoder),
    }


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if bad:
        raise NonFiniteError(f"{what}: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}); refusing them")


def _config_checksum(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def trainable_state_dict(model: AugmentedLM) -> dict[str, torch.Tensor]:
    """Exactly what training changes: the coprocessor's trainable tensors (soft tokens included)."""
    return {name: param.detach().contiguous().cpu()
            for name, param in model.coprocessor.named_parameters() if param.requires_grad}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def adapter_files(model: AugmentedLM, path: str | Path) -> dict[str, bytes]:
    """The files of a saved coprocessor, name -> contents; refuses non-finite weights."""
    if model.coprocessor is None:
        raise ValueError("nothing to save: this AugmentedLM has no coprocessor")
    state = trainable_state_dict(model)
    check_finite(state, f"saving a coprocessor to {path}")
    weights = save(state, metadata={"format": "pt"})
    meta = {
        "format_version": FORMAT_VERSION,
        "coprocessor": model.coprocessor.config.to_dict(),
        "base_model": describe_decoder(model.decoder),
        "weights_sha256": _sha256(weights),
    }
    meta["config_sha256"] = _config_checksum(meta)
    return {WEIGHTS_NAME: weights, CONFIG_NAME: json.dumps(meta, indent=2, sort_keys=True).encode()}


def save_adapter(model: AugmentedLM, path: str | Path) -> Path:
    return save_directory(path, adapter_files(model, path), keep_other_files=True)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    recover(path)  # an interrupted save is finished (or undone) before anything is read
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"{path} is not a saved coprocessor: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(config_file.read_text())
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise AdapterError(f"{config_file} has format_version {meta.get('format_version')}, "
                               f"this dca reads {READABLE_VERSIONS}")
        if meta["format_version"] >= 2 and meta.get("config_sha256") != _config_checksum(meta):
            raise AdapterError(f"{config_file} was changed after it was saved (its checksum does not match); "
                               "re-save the coprocessor instead of editing its config")
        missing = {"coprocessor", "base_model", "weights_sha256"} - set(meta)
        if missing:
            raise KeyError(f"missing {sorted(missing)}")
        meta["coprocessor"] = CoprocessorConfig.from_dict(meta["coprocessor"])
    except AdapterError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise AdapterError(f"{config_file} is damaged or not a dca config: {err}") from err
    return meta


def check_decoder_matches(saved: dict[str, Any], decoder: PreTrainedModel, source: Path,
                          format_version: int = FORMAT_VERSION) -> None:
    current = describe_decoder(decoder)
    if format_version < 2:
        current["fingerprint"] = _fingerprint(decoder, legacy=True)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "fingerprint")
    if any(saved.get(k) != current[k] for k in keys):
        def name(d: dict[str, Any]) -> str:
            return (f"{d.get('name_or_path') or '?'} ({d.get('model_type')}, hidden {d.get('hidden_size')}, "
                    f"{d.get('num_hidden_layers')} layers, vocab {d.get('vocab_size')}, "
                    f"{d.get('dtype', 'float32')}, fingerprint {d.get('fingerprint')})")
        hint = ""
        if saved.get("dtype", "float32") != current["dtype"]:
            hint = (f"; the dtypes differ ({saved.get('dtype', 'float32')} saved, {current['dtype']} given): "
                    f"load the decoder in {saved.get('dtype', 'float32')}")
        raise AdapterError(f"the coprocessor in {source} was trained for {name(saved)}, "
                           f"but the decoder given is {name(current)}{hint}")


def read_tensors(path: Path, sha256: str, recorded_in: str, error: type[Exception]) -> dict[str, torch.Tensor]:
    """A safetensors file whose checksum (recorded in `recorded_in`) matches and whose values are finite."""
    if not path.is_file():
        raise error(f"{path} is missing")
    data = path.read_bytes()
    if _sha256(data) != sha256:
        raise error(f"{path} is corrupted or truncated (its checksum does not match {recorded_in}); re-save or "
                    "re-download it")
    try:
        tensors = load(data)
    except SafetensorError as err:
        raise error(f"{path} cannot be read: {err}") from err
    check_finite(tensors, f"loading {path}")
    return tensors


def load_adapter(path: str | Path, decoder: PreTrainedModel) -> AugmentedLM:
    from dca.model import AugmentedLM

    path = Path(path)
    if not isinstance(decoder, PreTrainedModel):
        try:
            name = read_adapter_config(path)["base_model"].get("name_or_path")
        except AdapterError:
            name = None
        raise TypeError(f"loading the coprocessor in {path} needs the decoder it was trained for"
                        f"{f' ({name})' if name else ''}, a transformers PreTrainedModel; got "
                        f"{type(decoder).__name__}. It needs the frozen decoder loaded first, e.g. decoder = "
                        "transformers.AutoModelForCausalLM.from_pretrained(name_or_path) or "
                        "dca.resources.load_model(name)")
    meta = read_adapter_config(path)
    check_decoder_matches(meta["base_model"], decoder, path, meta["format_version"])
    weights_file = path / WEIGHTS_NAME
    weights = read_tensors(weights_file, meta["weights_sha256"], CONFIG_NAME, AdapterError)

    model = AugmentedLM(decoder, meta["coprocessor"])
    expected = {name: p for name, p in model.coprocessor.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong_shape:
        raise AdapterError(f"{weights_file} does not fit this coprocessor: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(weights[name])
    return model
