"""The arguments `AugmentedLM.generate` hands transformers' `generate`, so that it behaves like the plain call.

`generate` is given the prompt's ids alone, together with ``inputs_embeds`` = [prompt, N latents] and the
augmented cache without its last latent, which it then processes itself as its first step. Since
``input_ids`` never holds placeholders for the latents, streamers, stopping criteria, logits processors
and the returned sequences see the prompt and the new tokens only, exactly as with `decoder.generate`.

Two things transformers does not do for such a call are done here:

* lengths: when ``inputs_embeds`` is longer than ``input_ids``, transformers takes a ``max_length`` or
  ``min_length`` to count the embeddings and the new tokens (it subtracts the embeddings' length); the
  user's lengths count the prompt and the new tokens, so the embeddings' length is added beforehand;
* rows: it repeats every tensor argument ``max(num_beams, num_return_sequences)`` times
  (``_expand_inputs_for_generation``), but not a cache passed in: the caller repeats it by `rows`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig, PreTrainedModel
from transformers.generation import GenerationMode

# generate(augment=True) builds these itself, from the augmented cache
OWN_ARGUMENTS = ("past_key_values", "inputs_embeds", "position_ids", "inputs", "input_ids")
# assisted generation drafts tokens with a model (or a lookup) that never saw the latents, and transformers runs the
# remaining modes from the Hub
MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE)


@dataclass
class GenerateArguments:
    rows: int  # rows generate runs per prompt row: the augmented cache must be repeated this often
    generation_config: GenerationConfig | None
    kwargs: dict[str, Any]


def check_own_arguments(kwargs: dict[str, Any]) -> None:
    given = [name for name in OWN_ARGUMENTS if kwargs.get(name) is not None]
    if given:
        raise ValueError(f"generate(augment=True) builds the cache itself: do not pass {', '.join(given)}")


def generate_arguments(decoder: PreTrainedModel, generation_config: GenerationConfig | None,
                       kwargs: dict[str, Any], embeds_length: int,
                       prompt_length: int | None = None) -> GenerateArguments:
    """The arguments for `decoder.generate(input_ids=prompt, inputs_embeds=<embeds_length long>, ...)`; with
    embeddings as long as the prompt (latents that replace its last entries) transformers counts lengths as usual."""
    # transformers' own merge of the argument, the keyword arguments and the decoder's generation_config
    resolved, _ = decoder._prepare_generation_config(generation_config, **kwargs)
    mode = resolved.get_generation_mode(kwargs.get("assistant_model"))
    if kwargs.get("custom_generate") is not None:
        mode = "custom_generate"
    if mode not in MODES:
        raise ValueError(f"generate(augment=True) supports greedy search, sampling and beam search, not "
                         f"{getattr(mode, 'value', mode)}; use generate(augment=False) for it")
    if resolved.cache_implementation is not None:
        raise ValueError(f"generate(augment=True) continues the augmented DynamicCache: unset cache_implementation "
                         f"(got {resolved.cache_implementation!r})")
    # transformers' test for "no max_length anywhere": then it uses 20 new tokens, whatever the inputs
    default_max_length = (kwargs.get("max_length") is None
                          and (generation_config is None or generation_config.max_length is None)
                          and decoder.generation_config.max_length is None)
    overrides = {}
    if embeds_length != prompt_length:  # transformers corrects lengths only when the two differ
        if resolved.max_new_tokens is None and not default_max_length:
            overrides["max_length"] = resolved.max_length + embeds_length
        if resolved.min_new_tokens is None and resolved.min_length:
            overrides["min_length"] = resolved.min_length + embeds_length
    kwargs = dict(kwargs)
    if generation_config is not None:
        generation_config = copy.deepcopy(generation_config)
    for name, value in overrides.items():
        # where the user put it: a keyword beside a generation_config makes transformers warn
        if generation_config is not None and name not in kwargs:
            setattr(generation_config, name, value)
        else:
            kwargs[name] = value
    return GenerateArguments(max(resolved.num_beams, resolved.num_return_sequences), generation_config, kwargs)
