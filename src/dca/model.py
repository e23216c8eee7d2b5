"""`AugmentedLM`: a frozen decoder plus an optional coprocessor that augments its cache.

The three passes of training (`training_loss`), each over the whole batch at once:

1. the frozen decoder reads the original sequence, without gradients, into a cache;
2. the coprocessor reads that cache with P groups of N soft tokens, one group per insertion
   point t, and returns P * N latents;
3. the decoder reads P groups of [N latents, ahead tokens x[t+1 .. t+A-1]] after the same cache
   and is scored on x[t+1 .. t+A].

Masks (`dca.masks`) make every group see only x[0..t] and itself, so each group computes exactly
what `augment` followed by ordinary decoding would compute if the prompt ended at t. Position ids
follow `CoprocessorConfig.latent_positions`; text after an augmented cache continues at
`AugmentOutput.next_position_ids`, which is not the cache length unless latents sit "after" t. Under
``"overwrite"`` the latents replace the cache entries of the prompt's last N tokens: the decoder's groups
see x[0..t-N] (and the coprocessor's still x[0..t]), and `augment` crops the prompt's cache before writing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.utils import ModelOutput

from dca.attention import FLEX, GROUP_ATTENTION, GROUPED, FlexLayout, GroupLayout, flex_supported, use_grouped_attention
from dca.cache import fork_cache, prefix_view
from dca.config import CoprocessorConfig
from dca.coprocessor import Coprocessor
from dca.generation import check_own_arguments, generate_arguments
from dca.inputs import check_batch, check_context, check_delays, check_positions, position_limit
from dca.masks import group_attention_mask, latent_cache_mask, latent_group_position_ids, prefix_position_ids
from dca.outputs import AugmentOutput, TrainingLoss
from dca.recompute import recomputed_layers


class AugmentedLM(nn.Module):
    """A frozen Hugging Face causal LM with a trainable cache-augmenting coprocessor."""

    def __init__(self, decoder: PreTrainedModel, config: CoprocessorConfig | None = None,
                 coprocessor: Coprocessor | None = None):
        super().__init__()
        decoder.requires_grad_(False)
        decoder.eval()
        self.decoder = decoder
        self.config = config
        self.coprocessor = coprocessor if coprocessor is not None or config is None else Coprocessor(decoder, config)
        # how training_loss's groups attend: "grouped" (linear in P), "flex" (block-sparse flex attention, for CUDA),
        # "dense" (one mask, the reference) or "auto" (flex where `flex_supported`, else grouped)
        self.group_attention = "auto"
        # training_loss keeps only each layer's input of its two group passes and replays the layer in backward
        self.activation_checkpointing = False

    @classmethod
    def from_decoder(cls, decoder: PreTrainedModel, config: CoprocessorConfig | None = None) -> AugmentedLM:
        """Freeze `decoder` and build a coprocessor for it (the default config if none is given)."""
        if not isinstance(decoder, PreTrainedModel):
            raise TypeError(f"from_decoder needs a transformers PreTrainedModel, got {type(decoder).__name__}")
        return cls(decoder, config or CoprocessorConfig())

    @classmethod
    def from_pretrained(cls, path: str | Path, decoder: PreTrainedModel | None = None) -> AugmentedLM:
        """Load a coprocessor saved by `save_pretrained` onto the decoder it was trained for."""
        from dca.adapter import load_adapter

        return load_adapter(path, decoder)  # which says what to do when no decoder is given

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the coprocessor as config JSON + safetensors (atomically)."""
        from dca.adapter import save_adapter

        return save_adapter(self, path)

    def train(self, mode: bool = True) -> AugmentedLM:
        super().train(mode)
        self.decoder.eval()  # the decoder is frozen: no dropout, ever
        return self

    @property
    def device(self) -> torch.device:
        return self.decoder.get_input_embeddings().weight.device

    @property
    def _vocab_size(self) -> int:
        return self.decoder.get_input_embeddings().num_embeddings  # what the embedding can look up

    def _require_coprocessor(self) -> Coprocessor:
        if self.coprocessor is None:
            raise RuntimeError("this AugmentedLM has no coprocessor: build one with AugmentedLM.from_decoder(decoder, "
                               "config) or load one with AugmentedLM.from_pretrained(path, decoder)")
        return self.coprocessor

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(input_ids)

    # ------------------------------------------------------------------ training: one pass, P groups
    def training_loss(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *, with_baseline: bool = False,
                      num_ahead: int | None = None, delays: torch.Tensor | None = None) -> TrainingLoss:
        """The paper's objective for P insertion points per row, in one pass over the batch.

        Args:
            input_ids: [B, T] token ids.
            positions: [B, P] insertion indices t: latents computed from x[0..t] go after token t.
            attention_mask: [B, T], 1 for real tokens (left or right padding).
            with_baseline: also score the same targets without augmentation (costs one LM head).
            num_ahead: score this many ahead tokens instead of the config's A (evaluation by position).
            delays: [B, P] d >= 0 per group (delay-robust training, asynchronous evaluation): the coprocessor's
                output, still computed from x[0..t], is inserted after x[s], s = t + d; the group sees x[0..s] and
                itself, sits where a group inserted at s would (`dca.masks.group_position_ids` at s), its anchor
                (`latent_anchor`) is that of s (the embeddings of x[s-N+1 .. s] for "replay") and it is scored on
                x[s+1 .. s+A]. None: no delay (bit-identical to all zeros).

        Under ``latent_positions="overwrite"`` each group's decoder pass sees x[0..s-R] and replaces x[s-R+1 .. s]
        (R = `num_overwritten`, N by default; the other N - R latents follow them, or precede them under
        `appended_at="window"`), while its soft tokens still read x[0..t]; at a point with r < R real tokens up to s
        the first R - r of the R latents are hidden
        (`dca.masks.padded_latents`), as `augment` hides them after a prompt shorter than R.

        Raises:
            ValueError: a bad batch or bad positions, delays or num_ahead, naming which.
        """
        coprocessor = self._require_coprocessor()
        config = coprocessor.config
        if any(_checkpointing(m) for m in (self.decoder, coprocessor.body)):
            # transformers' checkpointed layers drop past_key_values: every group would lose its prefix
            raise ValueError("training_loss does not work with activation (gradient) checkpointing: it silently "
                             "drops the cache the groups attend to; call activation_checkpointing_disable()")
        if num_ahead is not None and (isinstance(num_ahead, bool) or not isinstance(num_ahead, int) or num_ahead < 1):
            raise ValueError(f"num_ahead must be a positive integer (or None for the config's {config.num_ahead}), "
                             f"got {num_ahead!r}")
        input_ids, attention_mask = check_batch(input_ids, attention_mask, self._vocab_size)
        positions = check_positions(positions, attention_mask)
        # where each group's latents are inserted: after t, or d tokens later (the decoder's side of every group)
        inserted = positions if delays is None else check_positions(positions + check_delays(delays, positions),
                                                                     attention_mask, "delayed insertion positions")
        replaced = config.replaced_entries  # "overwrite": the first R latents replace x[s-R+1 .. s] for the decoder
        n, a = config.num_latents, config.num_ahead if num_ahead is None else num_ahead
        prefix_pos = prefix_position_ids(attention_mask)
        arange_a = torch.arange(1, a + 1, device=input_ids.device)
        target_index = inserted[:, :, None] + arange_a  # [B, P, A]: x[s+1 .. s+A], s = t + d
        in_bounds = target_index < input_ids.shape[1]
        target_index = target_index.clamp(max=input_ids.shape[1] - 1)
        target_mask = in_bounds & attention_mask.gather(1, target_index.flatten(1)).view_as(in_bounds).bool()
        targets = input_ids.gather(1, target_index.flatten(1)).view_as(target_index)
        group = n + a - 1
        # members after a group's last target are computed but unused: only the others must fit the context
        group_pos = latent_group_position_ids(config, prefix_pos, inserted, group)
        needed = torch.cat([target_mask.new_ones(*positions.shape, n), target_mask[:, :, 1:]], dim=2)
        real_before = prefix_pos.gather(1, inserted) + 1  # real tokens x[0..s]
        check_context(self.decoder.config, "training_loss: a group's prompt, latents and ahead tokens",
                       max(int(prefix_pos.max()), int(group_pos.view_as(needed)[needed].max())),
                       max(int(attention_mask.sum(1).max()),
                           int((real_before.clamp(min=replaced) + needed.sum(2)).max()) - replaced))

        # 1. the frozen decoder over the original tokens: a full-length cache (no sliding-window eviction)
        cache = DynamicCache()
        with torch.no_grad():
            prefix_out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=prefix_pos,
                                      past_key_values=cache,
                                      logits_to_keep=(target_index - 1).flatten(1) if with_baseline else 1)
        baseline = None
        if with_baseline:
            baseline = _token_losses(prefix_out.logits.view(*targets.shape, -1), targets, target_mask)

        # 2. the coprocessor: P groups of N soft tokens over a fork of that cache (pause tokens read nothing)
        attention = self._group_attention()  # "grouped", "flex" or "dense"
        if coprocessor.body is None:
            latents = coprocessor.pause_tokens(input_ids.shape[0], positions.shape[1])
        else:
            soft_mask, soft_pos, soft_kwargs = self._group_inputs(
                attention_mask, prefix_pos, positions, n,
                causal=config.soft_token_attention == "causal", attention=attention)
            with self._group_pass(coprocessor.body, attention):
                # the soft tokens read x[0..t]; the anchor is the text before the insertion point s = t + d, so that
                # late latents replay x[s-N+1 .. s] and the decoder's current token stays x[s]
                latents = coprocessor(prefix_view(cache), soft_mask, soft_pos,
                                      anchor=self._latent_anchor(input_ids, attention_mask, inserted), **soft_kwargs)

        # 3. the decoder: P groups of [latents, x[s+1 .. s+A-1]] after x[0..s]
        ahead = self._embed(targets[:, :, : a - 1])  # [B, P, A-1, H]
        embeds = torch.cat([latents.view(*positions.shape, n, -1), ahead.to(latents.dtype)], dim=2).flatten(1, 2)
        keep = (torch.arange(positions.shape[1], device=input_ids.device)[:, None] * group + n - 1
                + torch.arange(a, device=input_ids.device)).flatten()  # logits at the last latent and after
        mask, _, group_kwargs = self._group_inputs(attention_mask, prefix_pos, inserted, group, causal=True,
                                                   attention=attention, replaced=replaced)
        limit = position_limit(self.decoder.config)
        if limit is not None:  # the unused members past the end (learned position tables have no row for them)
            group_pos = group_pos.clamp(max=limit - 1)
        with self._group_pass(self.decoder, attention):
            out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=group_pos,
                               past_key_values=prefix_view(cache), logits_to_keep=keep, **group_kwargs)
        token_losses = _token_losses(out.logits.view(*targets.shape, -1), targets, target_mask)
        loss = token_losses.sum() / target_mask.sum().clamp(min=1)
        return TrainingLoss(loss, token_losses, target_mask, baseline)

    @contextlib.contextmanager
    def _group_pass(self, model: nn.Module, attention: str):
        """A pass over P groups: grouped (or flex) attention and activation checkpointing, as this model is set."""
        def setting():
            if attention == "dense":
                return contextlib.nullcontext()
            return use_grouped_attention(model, implementation=FLEX if attention == "flex" else GROUPED)

        with setting(), recomputed_layers(model, enabled=bool(self.activation_checkpointing), setting=setting):
            yield

    def _group_attention(self) -> str:
        if self.group_attention not in GROUP_ATTENTION:
            raise ValueError(f"AugmentedLM.group_attention must be one of {GROUP_ATTENTION}, "
                             f"got {self.group_attention!r}")
        if self.group_attention == "auto":
            return "flex" if flex_supported(self.decoder.config, self.device) else "grouped"
        return self.group_attention

    def _group_inputs(self, attention_mask: torch.Tensor, prefix_pos: torch.Tensor, positions: torch.Tensor,
                      group_size: int, *, causal: bool, attention: str = "dense", replaced: int = 0):
        """(attention mask, position ids, keyword arguments) of a pass over P groups of `group_size` that start with
        the N latents (or soft tokens), each replacing
        the cache entries of the last `replaced` tokens up to its insertion point (`dca.masks.prefix_allowed`)."""
        config = self.coprocessor.config
        position_ids = latent_group_position_ids(config, prefix_pos, positions, group_size)
        # the latents over a short prompt's padding are the first of the R that replace tokens (none if none do)
        padded_from = config.anchored_latents.start if replaced else 0
        if attention != "dense":  # the layout goes to the implementation through transformers' kwargs; the mask is
            # a token 4D placeholder (any 4D tensor), so that transformers builds none (grouped and flex attention
            # ignore it); training_loss's cache comes from a pass without gradients: the prefix needs none
            placeholder = attention_mask[:, None, None]
            layout = FlexLayout if attention == "flex" else GroupLayout  # flex's also keeps its block masks
            return placeholder, position_ids, {"dca_groups": layout(attention_mask, prefix_pos, positions, group_size,
                                                                    causal, prefix_grad=False, replaced=replaced,
                                                                    padded_from=padded_from)}
        device = attention_mask.device.type
        # under autocast, attention runs in the autocast dtype: SDPA kernels want the mask in it too
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.decoder.dtype
        mask = group_attention_mask(self.decoder.config, attention_mask, prefix_pos, positions, group_size,
                                    dtype, causal_within_group=causal, replaced=replaced, padded_from=padded_from)
        return mask, position_ids, {}

    def _latent_anchor(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor | None:
        """[B, P * N, H]: the embeddings each group's latents are added to (`config.latent_anchor`)."""
        config = self.coprocessor.config
        kind, n = config.latent_anchor, config.num_latents
        if kind == "none" or self.coprocessor.body is None:
            return None
        # "overwrite" with R < N: the R latents in place of x[t-R+1 .. t] replay them; the appended ones get zeros
        anchored = config.anchored_latents
        replayed = anchored.stop - anchored.start
        offsets = torch.arange(1 - replayed, 1, device=input_ids.device)  # x[t-R+1 .. t]
        first_real = (attention_mask.cumsum(1) == 0).sum(1)[:, None, None]  # never reach into left padding
        index = torch.maximum(positions[:, :, None] + offsets, first_real)
        anchor = self._embed(input_ids.gather(1, index.flatten(1))).view(*index.shape, -1)
        if kind == "last_token":
            anchor = anchor * (offsets == 0)[:, None].to(anchor.dtype)
        return F.pad(anchor, (0, 0, anchored.start, n - anchored.stop)).flatten(1, 2)

    # ------------------------------------------------------------------ inference: once, at the prompt's end
    @torch.no_grad()
    def augment(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> AugmentOutput:
        """Run the prompt, call the coprocessor once at its end, and write the latents into the cache.

        Batches must be left-padded (as for `generate`); each row gives what it would alone. A LoRA coprocessor
        reads the prompt in the decoder's own prefill pass (`Coprocessor.read_after_prompt`): the same cache and
        latents as `augment_with_grad`, one pass over the weights fewer. Under ``latent_positions="overwrite"`` the
        latents replace the cache entries of the prompt's last N tokens (the cache is cropped after the coprocessor
        has read it): the returned cache holds L entries, not L + N. A row with r < N real tokens keeps only its
        last r latents (the others replace padding and are masked like it); a prompt shorter than N is left-padded
        to N first, so the returned cache and mask then hold N entries.

        Raises:
            ValueError: a bad batch or right padding.
        """
        return self._augment(input_ids, attention_mask, shared_pass=True)

    def augment_with_grad(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> AugmentOutput:
        """`augment` with autograd left as it is (what a naive, per-position trainer calls): the decoder's prefill,
        then the coprocessor over a fork of its cache, the straightforward computation."""
        return self._augment(input_ids, attention_mask, shared_pass=False)

    def _augment(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                 shared_pass: bool) -> AugmentOutput:
        cache, latents, extended_mask, latent_pos, next_pos = self._prompt_and_latents(input_ids, attention_mask,
                                                                                      shared_pass=shared_pass)
        out = self.decoder(inputs_embeds=latents, attention_mask=extended_mask, position_ids=latent_pos,
                           past_key_values=cache, logits_to_keep=1)
        return AugmentOutput(cache, out.logits[:, -1], latents, extended_mask, next_pos, latent_pos)

    def _prompt_and_latents(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, shared_pass: bool):
        """(the prompt's plain cache, latents [B, N, H], mask over prompt + latents, latent position ids, position id
        of the text after the latents), the inputs checked first."""
        coprocessor = self._require_coprocessor()
        input_ids, attention_mask = check_batch(input_ids, attention_mask, self._vocab_size)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("augment needs left padding: the last token of every row must be real "
                             "(tokenizer.padding_side = 'left')")
        n, replaced, added = (coprocessor.config.num_latents, coprocessor.config.replaced_entries,
                              coprocessor.config.added_entries)
        # "overwrite" with fewer than N tokens: the prompt is left-padded to N; the latents that replace padding are
        # masked like it, so a short row gets as many latents as it has tokens (the last ones), an exact no-op at gate 0
        short = replaced - input_ids.shape[1]
        if short > 0:
            input_ids, attention_mask = F.pad(input_ids, (short, 0)), F.pad(attention_mask, (short, 0))
        batch, length = input_ids.shape
        prefix_pos = prefix_position_ids(attention_mask)
        last = torch.full((batch, 1), length - 1, device=input_ids.device)
        latent_pos = latent_group_position_ids(coprocessor.config, prefix_pos, last, n)
        next_pos = prefix_pos[:, -1:] + 1 + coprocessor.config.positions_taken
        # the latents replace the last `replaced` entries and take their mask (0 where they replace padding)
        extended_mask = latent_cache_mask(coprocessor.config, attention_mask)
        check_context(self.decoder.config, "augment: the prompt and its latents",
                       int(latent_pos.max().clamp(min=prefix_pos.max())),
                       int(attention_mask.sum(1).max()) + added)

        cache = DynamicCache()
        if shared_pass and coprocessor.reads_after_prompt:
            # the soft tokens read all of x[0..t], whatever the latents later replace
            soft_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, n)], dim=1)
            latents = coprocessor.read_after_prompt(self._embed(input_ids), soft_mask,
                                                    torch.cat([prefix_pos, latent_pos], dim=1), cache,
                                                    anchor=self._latent_anchor(input_ids, attention_mask, last))
        else:
            self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=prefix_pos,
                         past_key_values=cache, logits_to_keep=1)
            latents = self.prompt_latents(fork_cache(cache), input_ids, attention_mask)
        if replaced:
            cache.crop(-replaced)  # "overwrite": the latents take the last R tokens' entries (after the read)
        return cache, latents, extended_mask, latent_pos, next_pos

    def prompt_latents(self, cache: DynamicCache, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, *, anchored: bool = True) -> torch.Tensor:
        """[B, N, H]: the coprocessor's latents for a left-padded prompt whose plain cache is `cache` (extended in
        place: pass a fork). What `augment` writes after the prompt; asynchronous generation runs it on the side,
        with ``anchored=False`` (the output without `latent_anchor`'s embeddings, which it adds at insertion)."""
        coprocessor = self._require_coprocessor()
        config = coprocessor.config
        n = config.num_latents
        prefix_pos = prefix_position_ids(attention_mask)
        last = torch.full((input_ids.shape[0], 1), input_ids.shape[1] - 1, device=input_ids.device)
        anchor = self._latent_anchor(input_ids, attention_mask, last) if anchored else None
        if config.soft_token_attention == "causal":
            # the model's own causal mask: an independent check on dca.masks in the tests
            extended_mask = torch.cat([attention_mask, attention_mask.new_ones(input_ids.shape[0], n)], dim=1)
            latent_pos = latent_group_position_ids(config, prefix_pos, last, n)
            return coprocessor(cache, extended_mask, latent_pos, anchor=anchor)
        soft_mask, soft_pos, _ = self._group_inputs(attention_mask, prefix_pos, last, n, causal=False)
        return coprocessor(cache, soft_mask, soft_pos, anchor=anchor)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 augment: bool | str = True, generation_config: GenerationConfig | None = None,
                 store: str | Path | Any | None = None, **generate_kwargs: Any) -> torch.Tensor | ModelOutput:
        """transformers' `generate`, from an augmented cache; every argument means what it means there.

        Lengths count the prompt and the new tokens; beam search and several return sequences work; streamers,
        stopping criteria and logits processors see the prompt and the new tokens, never the latents. With
        `return_dict_in_generate=True`, `sequences` are prompt + new tokens, and the first step's hidden states and
        attentions cover the N latents only (the prompt's cache was computed before `generate`).
        With `augment=False`, or without a coprocessor, this is exactly `decoder.generate`. With `augment="async"`
        decoding starts before the latents exist and they are written in when ready, or after exactly
        `latent_delay=d` new tokens (`dca.serve.asynchronous`; greedy search and sampling). With `store` (a folder or
        a `dca.serve.store.ContextStore`) a prompt that starts with a stored document continues from that document's
        stored augmented cache and only the rest of the prompt is prefilled (`dca.serve.store`).
        """
        if store is not None and augment is not False and self.coprocessor is not None:
            from dca.serve.store import generate_with_store

            return generate_with_store(self, store, input_ids, attention_mask, augment, generation_config,
                                       generate_kwargs)
        if isinstance(augment, str) or "latent_delay" in generate_kwargs:
            from dca.serve.asynchronous import generate_dispatch

            return generate_dispatch(self, input_ids, attention_mask, augment, generation_config, generate_kwargs)
        if not augment or self.coprocessor is None:
            return self.decoder.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         generation_config=generation_config, **generate_kwargs)
        check_own_arguments(generate_kwargs)
        input_ids, attention_mask = check_batch(input_ids, attention_mask, self._vocab_size)
        n, kept = self.coprocessor.config.num_latents, self.coprocessor.config.kept_entries(input_ids.shape[1])
        call = generate_arguments(self.decoder, generation_config, generate_kwargs, kept + n, input_ids.shape[1])
        # the prompt's cache without the latents: generate writes them itself, as its first step, whose logits give
        # the first token (writing them here would cost a pass, and generate would still have to rerun the last one)
        cache, latents, extended_mask, latent_pos, _ = self._prompt_and_latents(input_ids, attention_mask,
                                                                               shared_pass=True)
        if call.rows > 1:
            cache.batch_repeat_interleave(call.rows)  # generate repeats every tensor argument, but not a cache
        embeds = torch.cat([self._embed(input_ids[:, :kept]), latents], dim=1)
        # explicit position ids (generate continues them from the last one): latents may consume none
        position_ids = torch.cat([prefix_position_ids(attention_mask)[:, :kept], latent_pos], dim=1)
        return self.decoder.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=extended_mask,
                                     position_ids=position_ids, past_key_values=cache,
                                     generation_config=call.generation_config, **call.kwargs)


def _checkpointing(module: nn.Module | None) -> bool:
    return bool(getattr(module, "is_activation_checkpointing", False))  # transformers 5's name; None: pause tokens


def _token_losses(logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none")
    return losses.view_as(targets) * target_mask
