"""`CoprocessorConfig`: every choice that shapes a coprocessor, validated at construction.

PAPER.md leaves several choices to the implementer; each one is a field here, so it is written down
with the trained adapter and can be measured rather than guessed:

* ``soft_token_attention`` -- soft tokens attend to each other causally (like any decoder) or fully.
* ``latent_source`` -- latents are the coprocessor's hidden states after its final norm, or before it.
* ``latent_scale`` -- how latents are mapped into the decoder's input-embedding space.
* ``soft_token_init`` -- what the trainable soft tokens start as.

Position ids are not a choice: latents sit at t+1 .. t+N and the text continues at t+N+1, exactly
what the unchanged decoder does when it continues from an augmented cache.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

INITS = ("decoder", "scratch")
SOFT_TOKEN_ATTENTION = ("causal", "full")
LATENT_SOURCES = ("final_norm", "pre_norm")
LATENT_SCALES = ("none", "embed_rms", "learned")
SOFT_TOKEN_INITS = ("vocab_sample", "vocab_mean", "normal")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"CoprocessorConfig.{name} must be one of {choices}, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"CoprocessorConfig.{name} must be a positive integer, got {value!r}")


@dataclass
class CoprocessorConfig:
    """How the coprocessor is built and what it feeds the frozen decoder.

    Attributes:
        num_latents: N, latent embeddings written into the cache per augmentation.
        num_ahead: A, teacher-forced tokens after each augmentation point that carry the loss.
        init: ``"decoder"`` copies the decoder's weights (the paper's default), ``"scratch"``
            initialises the same architecture randomly (the paper's ablation).
        lora_rank: if set, the coprocessor is the decoder's weights plus a peft LoRA adapter of this
            rank (the base weights are shared with the frozen decoder, not copied).
        lora_alpha: LoRA scaling numerator; defaults to ``2 * lora_rank``.
        lora_target_modules: peft ``target_modules``; ``"all-linear"`` adapts every linear layer.
        soft_token_attention: ``"causal"`` or ``"full"`` attention among the N soft tokens.
        latent_source: read latents after the coprocessor's final norm or just before it.
        latent_scale: ``"none"`` feeds hidden states as they are; ``"embed_rms"`` rescales each
            latent to the RMS of the decoder's token embeddings; ``"learned"`` does the same and
            then multiplies by a trainable per-channel gain initialised at 1.
        soft_token_init: ``"vocab_sample"`` copies N random rows of the embedding table,
            ``"vocab_mean"`` starts all soft tokens at the mean embedding (plus tiny noise),
            ``"normal"`` draws them with the embedding table's standard deviation.
        seed: seeds the soft-token (and scratch-weight) initialisation.
    """

    num_latents: int = 16
    num_ahead: int = 16
    init: str = "decoder"
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_target_modules: str | list[str] = "all-linear"
    soft_token_attention: str = "causal"
    latent_source: str = "final_norm"
    latent_scale: str = "embed_rms"
    soft_token_init: str = "vocab_sample"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive_int("num_latents", self.num_latents)
        _check_positive_int("num_ahead", self.num_ahead)
        _check_choice("init", self.init, INITS)
        _check_choice("soft_token_attention", self.soft_token_attention, SOFT_TOKEN_ATTENTION)
        _check_choice("latent_source", self.latent_source, LATENT_SOURCES)
        _check_choice("latent_scale", self.latent_scale, LATENT_SCALES)
        _check_choice("soft_token_init", self.soft_token_init, SOFT_TOKEN_INITS)
        if self.lora_rank is not None:
            _check_positive_int("lora_rank", self.lora_rank)
            if self.init == "scratch":
                raise ValueError("CoprocessorConfig: LoRA adapts the decoder's weights; it cannot be combined "
                                 "with init='scratch'")
        if self.lora_alpha is not None and not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            raise ValueError(f"CoprocessorConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"CoprocessorConfig.seed must be an integer, got {self.seed!r}")

    @property
    def uses_lora(self) -> bool:
        return self.lora_rank is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoprocessorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"CoprocessorConfig: unknown fields {unknown} (known: {sorted(known)})")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
