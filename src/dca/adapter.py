"""Saving and loading a trained coprocessor, PEFT-style: a folder with config JSON + safetensors.

The folder records the base model it was trained for (architecture, sizes, a fingerprint of its
weights) and a checksum of the weights file, so a coprocessor is never silently loaded onto the
wrong decoder or from a damaged file. Writes go to a temporary folder renamed into place, so an
interrupted save leaves the previous adapter (or nothing), never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from dca.config import CoprocessorConfig

if TYPE_CHECKING:
    from dca.model import AugmentedLM

CONFIG_NAME = "dca_config.json"
WEIGHTS_NAME = "coprocessor.safetensors"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """A saved coprocessor that cannot be loaded as asked (wrong decoder, damaged or missing files)."""


def decoder_fingerprint(decoder: PreTrainedModel) -> str:
    """A short hash of the decoder's weights: names, shapes, dtypes and a strided sample of values.

    Exact values only (no reductions), so the same weights hash alike on any device.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(decoder.state_dict().items()):
        flat = tensor.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def describe_decoder(decoder: PreTrainedModel) -> dict[str, Any]:
    config = decoder.config.get_text_config(decoder=True)
    return {
        "model_type": config.model_type,
        "architectures": list(decoder.config.architectures or [type(decoder).__name__]),
        "name_or_path": str(getattr(decoder.config, "_name_or_path", "") or ""),
        "hidden_size": decoder.get_input_embeddings().embedding_dim,
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": decoder.get_input_embeddings().num_embeddings,
        "fingerprint": decoder_fingerprint(decoder),
    }


def trainable_state_dict(model: AugmentedLM) -> dict[str, torch.Tensor]:
    """Exactly what training changes: the coprocessor's trainable tensors (soft tokens included)."""
    return {name: param.detach().contiguous().cpu()
            for name, param in model.coprocessor.named_parameters() if param.requires_grad}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_adapter(model: AugmentedLM, path: str | Path) -> Path:
    if model.coprocessor is None:
        raise ValueError("nothing to save: this AugmentedLM has no coprocessor")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(trainable_state_dict(model), staging / WEIGHTS_NAME, metadata={"format": "pt"})
        meta = {
            "format_version": FORMAT_VERSION,
            "coprocessor": model.coprocessor.config.to_dict(),
            "base_model": describe_decoder(model.decoder),
            "weights_sha256": _sha256(staging / WEIGHTS_NAME),
        }
        (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
            os.replace(staging, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"{path} is not a saved coprocessor: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(config_file.read_text())
        missing = {"coprocessor", "base_model", "weights_sha256"} - set(meta)
        if missing:
            raise KeyError(f"missing {sorted(missing)}")
        meta["coprocessor"] = CoprocessorConfig.from_dict(meta["coprocessor"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise AdapterError(f"{config_file} is damaged or not a dca config: {err}") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{config_file} has format_version {meta.get('format_version')}, "
                           f"this dca reads {FORMAT_VERSION}")
    return meta


def check_decoder_matches(saved: dict[str, Any], decoder: PreTrainedModel, source: Path) -> None:
    current = describe_decoder(decoder)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "fingerprint")
    if any(saved.get(k) != current[k] for k in keys):
        def name(d: dict[str, Any]) -> str:
            return (f"{d.get('name_or_path') or '?'} ({d.get('model_type')}, hidden {d.get('hidden_size')}, "
                    f"{d.get('num_hidden_layers')} layers, vocab {d.get('vocab_size')}, "
                    f"fingerprint {d.get('fingerprint')})")
        raise AdapterError(f"the coprocessor in {source} was trained for {name(saved)}, "
                           f"but the decoder given is {name(current)}")


def load_adapter(path: str | Path, decoder: PreTrainedModel) -> AugmentedLM:
    from dca.model import AugmentedLM

    path = Path(path)
    meta = read_adapter_config(path)
    check_decoder_matches(meta["base_model"], decoder, path)
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        raise AdapterError(f"{weights_file} is missing")
    if _sha256(weights_file) != meta["weights_sha256"]:
        raise AdapterError(f"{weights_file} is corrupted or truncated (its checksum does not match "
                           f"{CONFIG_NAME}); re-save or re-download it")
    try:
        weights = load_file(weights_file, device=str(decoder.device))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights_file} cannot be read: {err}") from err

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
