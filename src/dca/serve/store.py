"""Stored augmented contexts: a document's augmented cache, computed once (offline), reused by every prompt that
starts with the document (the paper: the coprocessor "can run offline, on a stored context").

An entry is the document's cache followed by the N latents written after its last token, exactly what
`AugmentedLM.augment(document)` returns. A prompt ``document + rest`` then needs only ``rest`` prefilled: it
continues after the latents at `next_position_ids` (``latent_positions`` decides whether the latents took
positions), with an attention mask over document, latents and rest. That is the same computation as augmenting
the document and feeding the rest of the prompt; the augmentation point is the document's end, not the prompt's.

On disk, one folder per entry, ``STORE/<tokens>-<key>/`` holding ``entry.json`` and ``cache.safetensors``, each
written crash-safely (`dca.atomic.save_directory`); no pickle. The key hashes the decoder's fingerprint and dtype,
the coprocessor's checksum (its config and trained tensors) and the token ids, and ``entry.json`` repeats all
three, so an entry is served only to the models and tokens it was computed for. ``entry.json`` carries the
checksum of the tensors file and of itself: a damaged, truncated, edited or misplaced entry is never served; it is
recomputed, rewritten, and a warning says so.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from transformers import DynamicCache, GenerationConfig
from transformers.utils import ModelOutput

from dca.adapter import check_finite, decoder_fingerprint, read_tensors
from dca.atomic import recover, save_directory
from dca.errors import DCAError
from dca.generation import check_own_arguments, generate_arguments
from dca.inputs import check_batch, check_context
from dca.masks import latent_cache_mask
from dca.model import AugmentedLM

FORMAT_VERSION = 1
ENTRY_NAME = "entry.json"
TENSORS_NAME = "cache.safetensors"


class StoreError(DCAError, ValueError):
    """A stored context that cannot be served: damaged, or computed for other models or other tokens."""


@dataclass
class StoredContext:
    """A document's augmented cache, as `AugmentedLM.augment` returns it for that document alone."""

    tokens: torch.Tensor  # [L] the document's token ids
    past_key_values: DynamicCache  # the document followed by its N latents
    latents: torch.Tensor  # [1, N, hidden]
    logits: torch.Tensor  # [1, vocab]: next-token logits after the last latent
    latent_position_ids: torch.Tensor  # [1, N]
    next_position_ids: torch.Tensor  # [1, 1]: where the text after the latents continues
    path: Path | None = None


# (the state of the model's tensors, its identity): fingerprints are recomputed only when a weight changes
_IDENTITIES: weakref.WeakKeyDictionary[AugmentedLM, tuple[tuple, dict[str, str]]] = weakref.WeakKeyDictionary()


def _tensor_state(module: torch.nn.Module) -> tuple:
    # an in-place update bumps _version; a replaced tensor has another pointer
    return tuple((name, p.data_ptr(), p._version, p.dtype) for name, p in module.state_dict(keep_vars=True).items())


def model_identity(model: AugmentedLM) -> dict[str, str]:
    """What an entry is computed for: the decoder's fingerprint and dtype, and the coprocessor's checksum."""
    if model.coprocessor is None:
        raise StoreError("a stored context needs a coprocessor: this AugmentedLM has none")
    state = (_tensor_state(model.decoder), _tensor_state(model.coprocessor))
    known = _IDENTITIES.get(model)
    if known is not None and known[0] == state:
        return known[1]
    digest = hashlib.sha256(model.coprocessor.config.to_json().encode())
    shared = {id(p) for p in model.decoder.parameters()}  # the decoder's fingerprint covers what is shared with it
    for name, param in sorted(model.coprocessor.named_parameters(), key=lambda item: item[0]):
        if id(param) not in shared:  # every own tensor, trainable or not (a frozen copy must not match another)
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    identity = {"decoder": decoder_fingerprint(model.decoder), "decoder_dtype": str(model.decoder.dtype),
                "coprocessor": digest.hexdigest()}
    _IDENTITIES[model] = (state, identity)
    return identity


def _entry_checksum(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "entry_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class ContextStore:
    """A folder of stored augmented contexts. `put` computes and writes one; `find` returns the longest stored
    document a prompt starts with, recomputing (and rewriting) an entry found damaged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"the context store {self.path} is a file, not a folder")
        self.stats = {"hits": 0, "misses": 0, "recomputed": 0, "written": 0}

    # ---------------------------------------------------------------- naming
    @staticmethod
    def key(identity: dict[str, str], tokens: torch.Tensor) -> str:
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        digest.update(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def entry_path(self, identity: dict[str, str], tokens: torch.Tensor) -> Path:
        return self.path / f"{tokens.numel()}-{self.key(identity, tokens)[:40]}"

    def stored_lengths(self) -> list[int]:
        """Document lengths (in tokens) of the entries in the store, longest first."""
        if not self.path.is_dir():
            return []
        lengths = {int(p.name.split("-", 1)[0]) for p in self.path.iterdir()
                   if p.is_dir() and p.name.split("-", 1)[0].isdigit()}
        return sorted(lengths, reverse=True)

    # ---------------------------------------------------------------- writing
    def put(self, model: AugmentedLM, tokens: torch.Tensor) -> StoredContext:
        """Compute the augmented cache of the document `tokens` ([L] ids) and write it to the store."""
        tokens = _check_tokens(tokens, model)
        identity = model_identity(model)  # (which refuses a model without a coprocessor)
        out = model.augment(tokens[None].to(model.device))
        cache, latents, latent_pos = out.past_key_values, out.latents, out.latent_position_ids
        # all N latents, also of a document shorter than R ("overwrite"): those over augment's padding are masked
        # when served (`generate_with_store`), as after augment
        context = StoredContext(tokens, cache, latents, out.logits, latent_pos, out.next_position_ids)
        context.path = self._write(identity, context, model)
        return context

    def _write(self, identity: dict[str, str], context: StoredContext, model: AugmentedLM) -> Path:
        tensors = {"latents": context.latents, "logits": context.logits,
                   "latent_position_ids": context.latent_position_ids, "next_position_ids": context.next_position_ids}
        for i, layer in enumerate(context.past_key_values.layers):
            tensors[f"keys.{i}"], tensors[f"values.{i}"] = layer.keys, layer.values
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        path = self.entry_path(identity, context.tokens)
        check_finite(tensors, f"storing a context in {path}")
        data = save(tensors, metadata={"format": "pt"})
        meta = {"format_version": FORMAT_VERSION, "identity": identity, "tokens": context.tokens.tolist(),
                "num_latents": int(context.latents.shape[1]), "num_layers": len(context.past_key_values.layers),
                "latent_positions": model.coprocessor.config.latent_positions,
                "tensors_sha256": hashlib.sha256(data).hexdigest()}
        meta["entry_sha256"] = _entry_checksum(meta)
        save_directory(path, {TENSORS_NAME: data, ENTRY_NAME: json.dumps(meta, indent=1).encode()})
        self.stats["written"] += 1
        return path

    # ---------------------------------------------------------------- reading
    def load(self, model: AugmentedLM, tokens: torch.Tensor) -> StoredContext:
        """The stored entry of `tokens` for this model, verified; `StoreError` if it is missing, damaged, or was
        computed for another decoder, coprocessor or other tokens."""
        tokens = _check_tokens(tokens, model)
        identity = model_identity(model)
        return self._read(self.entry_path(identity, tokens), identity, tokens, model)

    def _read(self, path: Path, identity: dict[str, str], tokens: torch.Tensor, model: AugmentedLM) -> StoredContext:
        recover(path)  # an interrupted write is finished or undone first
        entry = path / ENTRY_NAME
        if not entry.is_file():
            raise StoreError(f"{path} holds no stored context ({ENTRY_NAME} is missing)")
        try:
            meta = json.loads(entry.read_text())
            if not isinstance(meta, dict) or meta.get("entry_sha256") != _entry_checksum(meta):
                raise StoreError(f"{entry} is damaged or was edited (its checksum does not match)")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{entry} is damaged: {err}") from err
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{entry} has format_version {meta.get('format_version')}, this dca reads "
                             f"{FORMAT_VERSION}")
        if meta.get("identity") != identity:
            raise StoreError(f"{path} was computed for another decoder or coprocessor ({meta.get('identity')}, "
                             f"asked for {identity}): refusing to serve it")
        if meta.get("tokens") != tokens.tolist():
            raise StoreError(f"{path} holds another document's tokens: refusing to serve it")
        tensors = read_tensors(path / TENSORS_NAME, meta["tensors_sha256"], ENTRY_NAME, StoreError)
        n, layers = meta["num_latents"], meta["num_layers"]
        latents_written = model.coprocessor.config.num_latents  # all N: entries with fewer came from an older dca
        if n != latents_written:
            raise StoreError(f"{path} holds {n} latents, this coprocessor writes {latents_written}")
        expected = ({"latents", "logits", "latent_position_ids", "next_position_ids"}
                    | {f"{kind}.{i}" for kind in ("keys", "values") for i in range(layers)})
        entries = model.coprocessor.config.kept_entries(tokens.numel()) + n  # "overwrite": the last N replaced
        if set(tensors) != expected or any(tensors[f"keys.{i}"].shape[-2] != entries for i in range(layers)):
            raise StoreError(f"{path / TENSORS_NAME} does not hold a stored context of {tokens.numel()} tokens and "
                             f"{n} latents")
        device, dtype = model.device, model.decoder.dtype
        cache = DynamicCache()
        for i in range(layers):
            cache.update(tensors[f"keys.{i}"].to(device, dtype), tensors[f"values.{i}"].to(device, dtype), i)
        return StoredContext(tokens, cache, tensors["latents"].to(device, dtype), tensors["logits"].to(device),
                             tensors["latent_position_ids"].to(device), tensors["next_position_ids"].to(device), path)

    def stored_prefix(self, model: AugmentedLM, input_ids: torch.Tensor) -> int | None:
        """The length of the longest document stored for this model that `input_ids` ([L] ids) starts with, or None;
        a cheap look (the entry is verified when `find` reads it)."""
        input_ids = _check_tokens(input_ids, model)
        lengths = [n for n in self.stored_lengths() if n <= input_ids.numel()]
        identity = model_identity(model) if lengths else {}
        return next((n for n in lengths if self.entry_path(identity, input_ids[:n]).exists()), None)

    def find(self, model: AugmentedLM, input_ids: torch.Tensor) -> StoredContext | None:
        """The stored context of the longest document that `input_ids` ([L] ids) starts with, or None.

        An entry found damaged or not matching is never served: it is recomputed from the prompt's own tokens
        (which are the document's) and rewritten, with a warning.
        """
        input_ids = _check_tokens(input_ids, model)
        lengths = [n for n in self.stored_lengths() if n <= input_ids.numel()]
        if not lengths:
            self.stats["misses"] += 1
            return None
        identity = model_identity(model)
        for length in lengths:
            tokens = input_ids[:length]
            path = self.entry_path(identity, tokens)
            if not (path.exists() or path.with_name(f".{path.name}.new").exists()):
                continue
            try:
                context = self._read(path, identity, tokens, model)
            except StoreError as err:
                warnings.warn(f"stored context not served, recomputing it: {' '.join(str(err).split())}",
                              stacklevel=2)
                self.stats["recomputed"] += 1
                return self.put(model, tokens)
            self.stats["hits"] += 1
            return context
        self.stats["misses"] += 1
        return None


def _check_tokens(tokens: torch.Tensor, model: AugmentedLM) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.long or tokens.numel() == 0:
        raise ValueError(f"a stored context's tokens must be a non-empty 1-D LongTensor, got "
                         f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}")
    check_batch(tokens[None], None, model._vocab_size)
    return tokens.detach().cpu()


def as_store(store: str | Path | ContextStore) -> ContextStore:
    return store if isinstance(store, ContextStore) else ContextStore(store)


def generate_with_store(model: AugmentedLM, store: str | Path | ContextStore, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None, augment: Any, generation_config: GenerationConfig | None,
                        generate_kwargs: dict[str, Any]) -> torch.Tensor | ModelOutput:
    """`AugmentedLM.generate(..., store=...)`: from the stored context of the longest document the prompt starts with
    (only the rest of the prompt is prefilled); a prompt that starts with none is augmented at its end as usual."""
    if augment is not True or "latent_delay" in generate_kwargs:
        raise ValueError(f"generate(store=...) continues from a stored augmented cache: it takes augment=True, got "
                         f"augment={augment!r}{' with latent_delay' if 'latent_delay' in generate_kwargs else ''}")
    store = as_store(store)
    check_own_arguments(generate_kwargs)
    input_ids, attention_mask = check_batch(input_ids, attention_mask, model._vocab_size)
    if input_ids.shape[0] != 1 or not bool(attention_mask.all()):
        raise ValueError("generate(store=...) takes one prompt without padding (batch size 1); call it per prompt")
    context = store.find(model, input_ids[0])
    if context is None:
        return model.generate(input_ids, attention_mask, generation_config=generation_config, **generate_kwargs)
    n, length = context.latents.shape[1], context.tokens.numel()
    kept = model.coprocessor.config.kept_entries(length)  # "overwrite": the latents took the last entries
    rest = input_ids[:, length:]
    next_pos = context.next_position_ids + torch.arange(rest.shape[1], device=input_ids.device)
    check_context(model.decoder.config, "generate: the stored document, its latents and the rest of the prompt",
                   int(next_pos.max()) if rest.shape[1] else int(context.latent_position_ids.max()),
                   input_ids.shape[1] - length + kept + n)
    call = generate_arguments(model.decoder, generation_config, generate_kwargs, input_ids.shape[1] - length + kept + n,
                              input_ids.shape[1])
    cache = context.past_key_values
    if rest.shape[1] == 0:
        cache.crop(-1)  # generate must process at least one input itself: the last latent, as an embedding
    if call.rows > 1:
        cache.batch_repeat_interleave(call.rows)  # generate repeats every tensor argument, but not a cache
    embed = model.decoder.get_input_embeddings()
    embeds = torch.cat([embed(input_ids[:, :kept]), context.latents, embed(rest)], dim=1)
    # the document at 0..L-1, the latents where augment put them, the rest after them: generate prefills only
    # what the cache lacks (the rest, or the last latent)
    position_ids = torch.cat([torch.arange(kept, device=input_ids.device)[None], context.latent_position_ids,
                              next_pos], dim=1)
    # augment's mask over document and latents (0 on latents over a short document's padding), then the rest
    mask = torch.cat([latent_cache_mask(model.coprocessor.config, attention_mask[:, :length]),
                      attention_mask[:, length:]], dim=1)
    return model.decoder.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask,
                                  position_ids=position_ids, past_key_values=cache,
                                  generation_config=call.generation_config, **call.kwargs)
