"""The straightforward, sequential computation that the one-pass objective must equal.

For one row and one insertion point t: augment the prompt x[0..t] once, score x[t+1] with the
logits after the last latent, then let the plain decoder continue over x[t+1 .. t+A-1] from the
augmented cache (its text positions resuming where `augment` says) and score x[t+2 .. t+A]. This is
what inference does; it is also what a naive
implementation trains with (one such computation per position), which `dca bench` measures.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from dca.masks import latent_cache_mask, latent_group_position_ids
from dca.model import AugmentedLM


def sequential_group_losses(model: AugmentedLM, input_ids: torch.Tensor, t: int, delay: int = 0) -> torch.Tensor:
    """Cross-entropy of each existing ahead token x[s+1 .. s+A], s = t + delay, of one unpadded row [1, T].

    With a delay the latents are those `augment` computes from x[0..t] with their anchor moved to s
    (`move_anchor`), inserted after x[0..s] read plainly, at the position ids a group inserted at s takes
    (`insert_latents`). Differentiable when called with gradients enabled.
    """
    num_ahead = model.coprocessor.config.num_ahead
    s = t + delay
    targets = input_ids[0, s + 1 : s + 1 + num_ahead]
    if len(targets) == 0:
        return torch.zeros(0, device=input_ids.device)
    out = model.augment_with_grad(input_ids[:, : t + 1])
    if delay:
        text = input_ids[:, : s + 1]
        out = insert_latents(model, text, move_anchor(model, out.latents, input_ids[:, : t + 1], text))
    losses = [F.cross_entropy(out.logits.float(), targets[:1])]
    if len(targets) > 1:
        steps = torch.arange(len(targets) - 1, device=input_ids.device)
        # the augmented cache's own mask: latents that replace a short prompt's padding stay hidden ("overwrite")
        mask = F.pad(out.attention_mask, (0, len(targets) - 1), value=1)
        cont = model.decoder(input_ids=input_ids[:, s + 1 : s + len(targets)], attention_mask=mask,
                             position_ids=out.next_position_ids + steps, past_key_values=out.past_key_values,
                             use_cache=True)
        losses.append(F.cross_entropy(cont.logits[0].float(), targets[1:], reduction="none"))
    return torch.cat([loss.reshape(-1) for loss in losses])


def insert_latents(model: AugmentedLM, text: torch.Tensor, latents: torch.Tensor) -> SimpleNamespace:
    """Read the unpadded row `text` [1, S] plainly, then write `latents` after its last token, laid out as
    `augment` lays out latents computed at that token: what a late insertion is defined to be. Under "overwrite"
    the R latents that replace tokens take the entries of the last R tokens of `text`: only x[0..s-R] is read
    first, and with fewer than R tokens the first R - `len(text)` of them, which would replace nothing, are masked
    (as `augment` masks those over its left padding)."""
    config = model.coprocessor.config
    n, length, kept = config.num_latents, text.shape[1], config.kept_entries(text.shape[1])
    cache = DynamicCache()
    if kept:
        model.decoder(input_ids=text[:, :kept], past_key_values=cache, use_cache=True)
    prefix_pos = torch.arange(length, device=text.device)[None]
    last = torch.tensor([[length - 1]], device=text.device)
    latent_pos = latent_group_position_ids(config, prefix_pos, last, n)
    mask = latent_cache_mask(config, torch.ones_like(text))  # latents over augment's padding of a short text: 0
    out = model.decoder(inputs_embeds=latents, attention_mask=mask, position_ids=latent_pos, past_key_values=cache,
                        use_cache=True)
    next_pos = torch.tensor([[length + config.positions_taken]], device=text.device)
    return SimpleNamespace(past_key_values=cache, logits=out.logits[:, -1], attention_mask=mask,
                           next_position_ids=next_pos)


def move_anchor(model: AugmentedLM, latents: torch.Tensor, prompt: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Latents computed at the end of the unpadded row `prompt` [1, t+1], to be inserted after `text` [1, s+1]
    (which starts with it): the anchor they were written on is swapped for the one of the insertion point.

    The mapping is additive (latent = anchor + coprocessor output), so this is ``latents - anchor(t) +
    anchor(s)``, each anchor written out from `CoprocessorConfig.latent_anchor`: "replay" is the embeddings of
    the last N tokens before the point (the first token repeated where there are fewer), "last_token" the
    last token's embedding on the last latent, "none" nothing. Pause tokens (no coprocessor body) have none.
    """
    config = model.coprocessor.config
    if config.latent_anchor == "none" or model.coprocessor.body is None:
        return latents
    return latents - _anchor(model, prompt).to(latents.dtype) + _anchor(model, text).to(latents.dtype)


def _anchor(model: AugmentedLM, row: torch.Tensor) -> torch.Tensor:
    config, length = model.coprocessor.config, row.shape[1]
    n = config.num_latents
    anchored = config.anchored_latents  # "overwrite" with R < N: the appended latents have no anchor
    replayed = anchored.stop - anchored.start
    embeds = model.decoder.get_input_embeddings()(row[0])
    replay = torch.stack([embeds[max(length - replayed + i, 0)] for i in range(replayed)])[None]
    if config.latent_anchor == "last_token":
        replay = torch.cat([torch.zeros_like(replay[:, :-1]), replay[:, -1:]], dim=1)
    return F.pad(replay, (0, 0, anchored.start, n - anchored.stop))
