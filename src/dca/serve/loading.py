"""Loading what is served: a decoder (builtin name or folder) and, optionally, a saved coprocessor for it."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from dca.checks import check_coprocessor, check_model_source, resolve_device
from dca.errors import ArgumentError
from dca.inputs import position_limit
from dca.model import AugmentedLM
from dca.resources import load_model


def check_sources(model: str, coprocessor: str | None) -> None:
    """Cheap checks of `--model` and `--coprocessor` (nothing is loaded)."""
    check_model_source("model", model)
    if coprocessor:
        check_coprocessor("coprocessor", coprocessor)


def load_served(model: str, coprocessor: str | None,
                device: str = "auto") -> tuple[AugmentedLM, PreTrainedTokenizerBase]:
    """The frozen decoder wrapped in an `AugmentedLM` (without a coprocessor it is the plain decoder), and its
    tokenizer, which always has a pad token. Generation pads on the left, as augmentation needs."""
    check_sources(model, coprocessor)
    decoder, tokenizer = load_model(model, device=resolve_device("device", device))
    tokenizer.padding_side = "left"
    if coprocessor:
        return AugmentedLM.from_pretrained(check_coprocessor("coprocessor", coprocessor), decoder).eval(), tokenizer
    return AugmentedLM(decoder).eval(), tokenizer


def num_latents(model: AugmentedLM) -> int:
    return 0 if model.coprocessor is None else model.coprocessor.config.num_latents


def latent_slots(model: AugmentedLM, prompt_length: int) -> int:
    """Cache slots the latents add after a prompt of `prompt_length` tokens: N, less the prompt's entries they
    replace under "overwrite" (a prompt shorter than N is left-padded to N, so it ends with N slots)."""
    if model.coprocessor is None:
        return 0
    config = model.coprocessor.config
    return config.kept_entries(prompt_length) + config.num_latents - prompt_length


def context_limit(model: AugmentedLM) -> int | None:
    """How many cache slots (prompt, latents and new tokens) the decoder can read; None if unlimited."""
    return position_limit(model.decoder.config)


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], param: str = "chat") -> str:
    """The prompt the tokenizer's chat template makes of `messages`, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ArgumentError(param, "needs a chat template, and this model's tokenizer has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
