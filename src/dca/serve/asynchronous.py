"""Asynchronous augmentation (the paper's App. A.5): decode at once, write the latents in when they are ready.

`generate_async` prefills the prompt x[0..t] into a plain cache and starts decoding from it straight away, so
the first token comes as fast as without a coprocessor. As soon as it is chosen, the coprocessor starts
reading a fork of the prompt's cache (`fork_cache`: the same tensors, never extended by the decoder) -- on a
background thread, and on GPUs also on its own CUDA stream -- and computes the latents `augment` would write
after x[t]. When they are ready,
d tokens x[t+1 .. t+d] have been generated; the next decoder step reads [x[t+d], latents] and the text goes on
after them. With ``latent_delay=d`` the latents are inserted after exactly d tokens (d = 0: before the first
one, which is `augment`), for evaluation and tests.

Layout of late latents (the same as `AugmentedLM.training_loss(delays=...)`, see `dca.masks`): with s = t + d,
the latents see x[0..s] and each other, and take the position ids the config's ``latent_positions`` gives
latents inserted after x[s]:

* ``"after"``: pos(s)+1 .. pos(s)+N, and the text resumes at pos(s)+N+1;
* ``"shared"``: all at pos(s), and the text resumes at pos(s)+1;
* ``"replay"``: the positions of x[s-N+1 .. s] (generated tokens count), and the text resumes at pos(s)+1;
* ``"overwrite"``: as "replay", in place of the cache entries of x[s-N+1 .. s] (generated tokens the decoder has
  already read lose their entries; x[s] never gets one), as `training_loss(delays=...)` scores it; with
  ``num_overwritten`` = R < N only R replace x[s-R+1 .. s], the others follow at pos(s)+1 ... (or precede them,
  ``appended_at="window"``)

The coprocessor's output is that of time t (its soft tokens sat at t and read x[0..t]); the anchor it is added
to (`latent_anchor`) is that of the insertion point, computed from the tokens generated so far: under
``"replay"`` the embeddings of x[s-N+1 .. s], so that the last latent still carries the decoder's current token
x[s] (the prompt's x[t] there would make it predict x[t+1] again). So the latents and the text after them keep
the offsets and the anchor they were trained with. Greedy search and sampling run with transformers' own logits
processors and stopping criteria (built from the `GenerationConfig` as `generate` builds them); beam search is
refused: its beams would each need the latents at a different moment.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import GenerationMode

from dca.cache import fork_cache
from dca.generation import check_own_arguments
from dca.masks import latent_cache_mask, latent_group_position_ids, prefix_position_ids

ASYNC = "async"  # AugmentedLM.generate(augment=ASYNC)
# what the loop itself honours beside the GenerationConfig's fields
OWN_KWARGS = ("logits_processor", "stopping_criteria", "streamer", "tokenizer")


@dataclass
class AsyncGeneration:
    sequences: torch.Tensor  # [B, L + new]: the prompt and the new tokens (never the latents)
    latent_delay: int | None  # tokens generated before the latents were written in (None: generation ended first)


class _Latents:
    """The coprocessor's latents for the prompt, computed beside the decoder (a thread; a CUDA stream on GPUs)."""

    def __init__(self, model, cache: DynamicCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 background: bool):
        self.future: Future = Future()
        self.event = None
        forked = fork_cache(cache)  # the decoder's later steps never change what the coprocessor reads
        # held until the latents are taken: on a GPU the side stream may still read the prompt's tensors after the
        # thread is done, and the decoder's stream must not get their memory back before it has waited for them
        self._forked = forked
        if not background:
            self.future.set_result(model.prompt_latents(forked, input_ids, attention_mask, anchored=False))
            return
        device = input_ids.device
        stream = None
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # the prompt's cache is written by then
            self.event = torch.cuda.Event()

        def run() -> None:
            try:
                with torch.no_grad():  # grad mode is per thread
                    if stream is None:
                        self.future.set_result(model.prompt_latents(forked, input_ids, attention_mask, anchored=False))
                        return
                    with torch.cuda.stream(stream):
                        latents = model.prompt_latents(forked, input_ids, attention_mask, anchored=False)
                        self.event.record(stream)
                    self.future.set_result(latents)
            except BaseException as err:  # re-raised in the decoding thread, where it is awaited
                self.future.set_exception(err)

        threading.Thread(target=run, name="dca-coprocessor", daemon=True).start()

    def close(self) -> None:
        """Generation ended without the latents: on a GPU, let the decoder's stream wait for the side stream
        before the prompt's tensors can be freed (the host waits only for the kernels to be queued)."""
        if self.event is not None and self._forked is not None:
            with contextlib.suppress(BaseException):
                self.result()

    def ready(self) -> bool:
        return self.future.done() and (self.event is None or self.event.query())

    def result(self) -> torch.Tensor:
        latents = self.future.result()
        if self.event is not None:  # the decoder's stream waits for the coprocessor's kernels, not the host
            torch.cuda.current_stream(latents.device).wait_event(self.event)
            latents.record_stream(torch.cuda.current_stream(latents.device))
        self._forked = None
        return latents


def generate_dispatch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, augment: Any,
                      generation_config: GenerationConfig | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """`AugmentedLM.generate` with ``augment="async"`` (or ``latent_delay``): the new sequences."""
    if augment != ASYNC:
        raise ValueError(f"augment must be True, False or {ASYNC!r}, got {augment!r}"
                         + (" (latent_delay is an option of augment='async')" if "latent_delay" in kwargs else ""))
    latent_delay = kwargs.pop("latent_delay", None)
    if model.coprocessor is None:  # as augment=True: nothing to add
        return model.decoder.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      generation_config=generation_config, **kwargs)
    return generate_async(model, input_ids, attention_mask, latent_delay=latent_delay,
                          generation_config=generation_config, **kwargs).sequences


@torch.no_grad()
def generate_async(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   latent_delay: int | None = None, generation_config: GenerationConfig | None = None,
                   **kwargs: Any) -> AsyncGeneration:
    """Greedy or sampled decoding that starts before the latents exist (module docstring).

    Args:
        model: an `AugmentedLM` with a coprocessor.
        input_ids, attention_mask: [B, L], left-padded.
        latent_delay: insert the latents after exactly this many new tokens (computing them in the foreground);
            None: as soon as the background computation is done.
        generation_config, kwargs: what transformers' `generate` takes (lengths, sampling, eos and pad ids,
            ``logits_processor``, ``stopping_criteria``, ``streamer``, ``tokenizer`` for stop strings).
    """
    from dca.inputs import check_batch, check_context

    if latent_delay is not None and (isinstance(latent_delay, bool) or not isinstance(latent_delay, int)
                                     or latent_delay < 0):
        raise ValueError(f"latent_delay must be a non-negative integer (or None: as soon as ready), got "
                         f"{latent_delay!r}")
    check_own_arguments(kwargs)
    coprocessor = model._require_coprocessor()
    decoder = model.decoder
    input_ids, attention_mask = check_batch(input_ids, attention_mask, model._vocab_size)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate(augment='async') needs left padding: the last token of every row must be real")
    own = {name: kwargs.pop(name, None) for name in OWN_KWARGS}
    config, rest = _generation_config(decoder, generation_config, kwargs, input_ids)
    if rest:
        raise ValueError(f"generate(augment='async') does not take {', '.join(sorted(rest))}")
    batch, length = input_ids.shape
    n, replaced = coprocessor.config.num_latents, coprocessor.config.replaced_entries
    prefix_pos = prefix_position_ids(attention_mask)
    check_context(decoder.config, "generate(augment='async'): the prompt, its latents and the new tokens",
                   int(prefix_pos.max()) + config.max_length - length + coprocessor.config.positions_taken,
                   int(attention_mask.sum(1).max()) + coprocessor.config.added_entries + config.max_length - length)
    processors = decoder._get_logits_processor(
        generation_config=config, input_ids_seq_length=length, encoder_input_ids=input_ids,
        logits_processor=own["logits_processor"] or LogitsProcessorList(), device=input_ids.device, model_kwargs={})
    stopping = decoder._get_stopping_criteria(generation_config=config,
                                              stopping_criteria=own["stopping_criteria"] or StoppingCriteriaList(),
                                              tokenizer=own["tokenizer"])
    streamer = own["streamer"]
    pad = config._pad_token_tensor
    if streamer is not None:
        streamer.put(input_ids.cpu())

    # the prompt, plainly: the first token needs nothing else
    cache = DynamicCache()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=prefix_pos,
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
    # in the background, the coprocessor starts once the first token is out: nothing competes with it
    latents = None if latent_delay is None else _Latents(model, cache, input_ids, attention_mask, background=False)
    sequences, mask, text_pos = input_ids, attention_mask, prefix_pos  # text only: tokens, mask and position ids
    next_pos = prefix_pos[:, -1:] + 1  # of the next text token
    pending: torch.Tensor | None = None  # the last token, not yet in the cache
    inserted_at = None
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    while True:
        generated = sequences.shape[1] - length
        due = latents is not None and (latents.ready() if latent_delay is None else generated == latent_delay)
        if inserted_at is None and due:  # this step reads [last token, latents]; with d = 0 the latents alone
            last = torch.full((batch, 1), text_pos.shape[1] - 1, device=input_ids.device)  # s = t + d
            embeds = latents.result()
            # the anchor of the insertion point, from the prompt and the tokens generated so far (generated rows
            # are real: left padding only); with d = 0 exactly what augment adds
            text_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, generated)], dim=1)
            anchor = model._latent_anchor(sequences, text_mask, last)
            if anchor is not None:
                embeds = embeds + anchor.to(embeds.dtype)
            position_ids = latent_group_position_ids(coprocessor.config, text_pos, last, n)
            if replaced:  # "overwrite": the latents take the entries of x[s-R+1 .. s]; x[s] (pending) never enters
                kept = coprocessor.config.kept_entries(text_mask.shape[1])
                if mask.shape[1] > kept:
                    cache.crop(kept - mask.shape[1])  # transformers' crop takes the number of entries to drop
                # with fewer than R tokens, the latents that would replace none are masked (as augment does); the
                # appended ones (R < N) are seen
                mask = latent_cache_mask(coprocessor.config, text_mask)
                pending = None
            else:
                if pending is not None:
                    embeds = torch.cat([model._embed(pending).to(embeds.dtype), embeds], dim=1)
                    position_ids = torch.cat([text_pos[:, -1:], position_ids], dim=1)
                mask = torch.cat([mask, mask.new_ones(batch, embeds.shape[1])], dim=1)
            out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
            inserted_at, pending = generated, None
            next_pos = next_pos + coprocessor.config.positions_taken  # the text resumes after the latents
        elif pending is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            out = decoder(input_ids=pending, attention_mask=mask, position_ids=text_pos[:, -1:],
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
            pending = None
        scores = processors(sequences, out.logits[:, -1].float())
        if config.do_sample:
            token = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(-1)
        if pad is not None:
            token = torch.where(unfinished, token, pad)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        if streamer is not None:
            streamer.put(token.cpu())
        unfinished &= ~stopping(sequences, scores)
        if not bool(unfinished.any()):
            break
        if latents is None:  # the prompt's cache has not been extended yet: the fork reads exactly the prompt
            latents = _Latents(model, cache, input_ids, attention_mask, background=True)
        pending = token[:, None]
        text_pos, next_pos = torch.cat([text_pos, next_pos], dim=1), next_pos + 1
    if latents is not None and inserted_at is None:
        latents.close()
    if streamer is not None:
        streamer.end()
    return AsyncGeneration(sequences, inserted_at)


def _generation_config(decoder, generation_config: GenerationConfig | None, kwargs: dict[str, Any],
                       input_ids: torch.Tensor) -> tuple[GenerationConfig, dict[str, Any]]:
    """transformers' merge of the arguments, its special tokens and its lengths, as `generate` prepares them."""
    has_default_max_length = (kwargs.get("max_length") is None
                              and (generation_config is None or generation_config.max_length is None)
                              and decoder.generation_config.max_length is None)
    has_default_min_length = (kwargs.get("min_length") is None
                              and (generation_config is None or generation_config.min_length is None)
                              and decoder.generation_config.min_length is None)
    config, rest = decoder._prepare_generation_config(copy.deepcopy(generation_config), **kwargs)
    rest = {k: v for k, v in rest.items() if v is not None and k not in ("use_cache", "attention_mask")}
    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE) or config.num_return_sequences != 1:
        raise ValueError(f"generate(augment='async') supports greedy search and sampling with one sequence per "
                         f"prompt, not {getattr(mode, 'value', mode)} with num_return_sequences="
                         f"{config.num_return_sequences}: use augment=True for beam search or several sequences")
    if config.return_dict_in_generate:
        raise ValueError("generate(augment='async') returns the sequences only: unset return_dict_in_generate")
    decoder._prepare_special_tokens(config, True, device=input_ids.device, batch_size=input_ids.shape[0])
    config = decoder._prepare_generated_length(config, has_default_max_length, has_default_min_length, "input_ids",
                                               input_ids.shape[1], input_ids)
    if config.max_length <= input_ids.shape[1]:
        raise ValueError(f"max_length ({config.max_length}) leaves no room for new tokens after the prompt's "
                         f"{input_ids.shape[1]}: use max_new_tokens")
    return config, rest
