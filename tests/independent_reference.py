"""An independent reference for the one-pass objective, written from the documentation alone.

`dca.reference` runs `AugmentedLM.augment_with_grad`, which shares position ids, the latent anchor, the
latent mapping and (for full soft-token attention) the mask builder with `training_loss`: a bug in any of
them would appear on both sides and cancel. This module imports nothing from dca. It uses transformers'
public API (a model called with `inputs_embeds`, explicit `position_ids`, an explicit 4D attention mask and
its own `DynamicCache`) and torch, and writes out what `CoprocessorConfig`'s docstrings and the README say:

* the frozen decoder reads the prompt x[0..t] into its own cache;
* the coprocessor body reads a copy of that cache with the N soft tokens at the latents' position ids
  (``latent_positions``), causal or full among themselves (``soft_token_attention``), each seeing every
  prompt token; sliding windows count cache entries (the masks module's docstring);
* its final states (``latent_source``: after the final norm, or its input) are mapped into embedding
  space (``latent_scale``) and added to the anchor (``latent_anchor``);
* the decoder reads the N latents at their position ids after the prompt, then x[t+1 .. t+A-1] with the
  text's position ids; the logits after the last latent score x[t+1], those after x[t+k] score x[t+k+1].
  Under ``latent_positions="overwrite"`` the decoder's own prompt pass is run on x[0..t-N] only (the latents
  take the place of x[t-N+1 .. t]), and the coprocessor reads a cache of the whole prompt made apart; a
  prompt of r < N tokens masks its first N - r latents, which replace no token. With ``num_overwritten``
  = R < N only the first R latents take the places of x[t-R+1 .. t] (and replay them); the other N - R follow at
  t+1 .. t+N-R with no anchor but a trainable offset each, and the text resumes at t+N-R+1. With
  ``appended_at="window"`` those N - R come first instead, as N - R entries inserted before x[t-R+1]: at the
  N - R positions from that of x[t-R+1] on, the R after them at the positions of x[t-R+1 .. t] plus
  N - R, and the text resumes at t+N-R+1 as before.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import DynamicCache

SLIDING = "sliding_attention"


def overwritten(config) -> int:
    """R: the latents that replace prompt tokens (`num_overwritten`, all N by default under "overwrite")."""
    if config.latent_positions != "overwrite":
        return 0
    return config.num_latents if config.num_overwritten is None else config.num_overwritten


def appended_first(config) -> bool:
    """Whether the N - R appended latents precede the R that replace tokens (``appended_at="window"``)."""
    return getattr(config, "appended_at", "point") == "window" and 0 < overwritten(config) < config.num_latents


def latent_position_ids(config, t: int) -> list[int]:
    """`latent_positions`: "after" t+1 .. t+N, "shared" all at t, "replay" the positions of x[t-N+1 .. t]
    (clamped at the first token), "overwrite" those of x[t-R+1 .. t], then t+1 .. t+N-R (or, appended first,
    N - R positions from that of x[t-R+1] on, then those of x[t-R+1 .. t] moved N - R on)."""
    layout, n = config.latent_positions, config.num_latents
    if layout == "after":
        return [t + 1 + i for i in range(n)]
    if layout == "shared":
        return [t] * n
    r = overwritten(config) or n
    window = [max(t - r + 1 + i, 0) for i in range(r)]
    if appended_first(config):
        return [window[0] + i for i in range(n - r)] + [p + n - r for p in window]
    return window + [t + 1 + i for i in range(n - r)]


def text_position_ids(config, t: int, count: int) -> list[int]:
    """The text after the latents resumes at t+N+1 ("after"), at t+1 (latents that take no positions), or at
    t+N-R+1 ("overwrite")."""
    n = config.num_latents
    taken = {"after": n, "overwrite": n - overwritten(config)}.get(config.latent_positions, 0)
    start = t + 1 + taken
    return list(range(start, start + count))


def soft_token_mask(model_config, t: int, n: int, full: bool, dtype: torch.dtype):
    """The coprocessor pass's additive 4D mask [1, 1, N, t+1+N] (a dict by layer kind for hybrid models).

    Soft token i sits in cache slot t+1+i. It sees every prompt token and, among the soft tokens, those
    before it (or all of them, `full`); a sliding-window layer sees only keys less than `window` slots back.
    """
    def allowed(window: int | None) -> torch.Tensor:
        grid = torch.zeros(n, t + 1 + n, dtype=torch.bool)
        for i in range(n):
            query_slot = t + 1 + i
            for key_slot in range(t + 1 + n):
                is_prompt = key_slot <= t
                visible = is_prompt or full or key_slot <= query_slot
                if window is not None and query_slot - key_slot >= window:
                    visible = False
                grid[i, key_slot] = visible
        return grid

    def additive(grid: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(grid.shape, dtype=dtype)
        return mask.masked_fill(~grid, torch.finfo(dtype).min)[None, None]

    layer_types = getattr(model_config, "layer_types", None)
    window = getattr(model_config, "sliding_window", None)
    if not layer_types:
        return additive(allowed(window))
    return {kind: additive(allowed(window if kind == SLIDING else None)) for kind in set(layer_types)}


def _final_norm(body):
    for name in ("norm", "ln_f"):  # Llama/Qwen/Gemma, GPT-2
        if hasattr(body, name):
            return getattr(body, name)
    raise AssertionError(f"no final norm found on {type(body).__name__}")


def embedding_rms(decoder) -> torch.Tensor:
    """The RMS of the decoder's token embeddings (as its embedding layer scales them), averaged over tokens."""
    embed = decoder.get_input_embeddings()
    table = embed(torch.arange(embed.num_embeddings)).float()
    return table.pow(2).mean(-1).sqrt().mean()


def coprocessor_latents(model, prompt: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """[1, N, H]: the latents written after `prompt` [1, t+1], read off a copy of the decoder's `cache`."""
    copro, decoder = model.coprocessor, model.decoder
    config = copro.config
    t, n = prompt.shape[1] - 1, config.num_latents
    soft = copro.soft_tokens[None]  # the N trainable soft tokens
    if config.method == "pause":
        return soft  # pause tokens are written as they are
    body = copro.body
    captured = []
    hook = _final_norm(body).register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        out = body(inputs_embeds=soft, position_ids=torch.tensor([latent_position_ids(config, t)]),
                   attention_mask=soft_token_mask(body.config, t, n, config.soft_token_attention == "full",
                                                  soft.dtype),
                   past_key_values=copy.deepcopy(cache), use_cache=True)
    finally:
        hook.remove()
    hidden = captured[-1] if config.latent_source == "pre_norm" else out.last_hidden_state
    if config.latent_scale == "none":
        latents = hidden
    else:  # rescaled to the embedding RMS, then times a per-channel gain ("learned") or a scalar gate ("gated")
        latents = hidden / hidden.pow(2).mean(-1, keepdim=True).sqrt() * embedding_rms(decoder)
        if config.latent_scale in ("learned", "gated"):
            latents = latents * copro.latent_gain
    embed = decoder.get_input_embeddings()
    r = overwritten(config) or n  # the latents that get an anchor: the appended ones under "overwrite" get none,
    anchored = slice(n - r, n) if appended_first(config) else slice(0, r)
    appended = slice(0, n - r) if appended_first(config) else slice(r, n)
    anchor = torch.zeros_like(latents)
    if r < n:  # but a trainable offset each
        anchor[:, appended] = copro.appended_offset
    if config.latent_anchor == "replay":  # the embeddings of x[t-R+1 .. t], clamped at the first token
        anchor[:, anchored] = embed(prompt[:, [max(t - r + 1 + i, 0) for i in range(r)]])
    elif config.latent_anchor == "last_token":  # x[t] on the last anchored latent, zeros elsewhere
        anchor[:, anchored.stop - 1] = embed(prompt[:, -1])
    latents = latents + anchor
    return latents


def group_losses(model, row: torch.Tensor, t: int) -> torch.Tensor:
    """Cross-entropy of each existing ahead token x[t+1 .. t+A] of one row [1, T] augmented after x[t]."""
    config, decoder = model.coprocessor.config, model.decoder
    targets = row[0, t + 1 : t + 1 + config.num_ahead]
    prompt = row[:, : t + 1]
    cache = DynamicCache()  # the reference's own cache, full length
    decoder(input_ids=prompt, position_ids=torch.arange(t + 1)[None], past_key_values=cache, use_cache=True)
    latents = coprocessor_latents(model, prompt, cache)
    latent_positions = torch.tensor([latent_position_ids(config, t)])
    r = overwritten(config)
    if r:  # "overwrite": the decoder continues from x[0..t-R]; the latents take the rest
        cache, kept = DynamicCache(), max(t + 1 - r, 0)
        if kept:
            decoder(input_ids=prompt[:, :kept], position_ids=torch.arange(kept)[None], past_key_values=cache,
                    use_cache=True)
    # the decoder's own causal masks from here on, given position ids and which entries are padding: a prompt of
    # t+1 < R tokens masks the first R - (t+1) of the R latents (they would replace no token), where augment pads it
    visible = torch.ones(1, cache.get_seq_length() + config.num_latents, dtype=torch.long)
    if r:
        first = cache.get_seq_length() + (config.num_latents - r if appended_first(config) else 0)
        visible[:, first : first + max(r - (t + 1), 0)] = 0
    out = decoder(inputs_embeds=latents, position_ids=latent_positions, attention_mask=visible, past_key_values=cache,
                  use_cache=True)
    logits = [out.logits[0, -1:]]
    if len(targets) > 1:
        ahead = row[:, t + 1 : t + len(targets)]
        positions = torch.tensor([text_position_ids(config, t, ahead.shape[1])])
        visible = F.pad(visible, (0, ahead.shape[1]), value=1)
        logits.append(decoder(input_ids=ahead, position_ids=positions, attention_mask=visible, past_key_values=cache,
                              use_cache=True).logits[0])
    return F.cross_entropy(torch.cat(logits).float(), targets, reduction="none")
