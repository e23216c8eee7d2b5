"""Attention masks and position ids for many augmentation groups in one pass.

A *group* is what one augmentation point t adds after the original sequence: N soft tokens for the
coprocessor, or N latents followed by the ahead tokens for the decoder. All P groups of a row are
laid side by side after the row's original tokens (which live in the cache), and the mask lets each
group see exactly what it would see at inference if the prompt ended at t:

* original tokens j <= t (and not padding),
* its own earlier members (causally) -- or all its members, for bidirectional soft tokens,
* never later original tokens, and never another group.

Positions follow the inference convention of `CoprocessorConfig.latent_positions`:

* ``"after"``: the k-th member of a group (k = 0, 1, ...) sits at ``position(t) + 1 + k``, so
  latents occupy t+1 .. t+N and the text resumes at t+N+1;
* ``"shared"``: every latent sits at ``position(t)`` and the text resumes at t+1;
* ``"replay"``: latent i (i = 0 .. N-1) sits at the position of x[t-N+1+i], the prompt token it
  replays under ``latent_anchor="replay"`` (clamped to the first real token), and the text resumes
  at t+1.

* ``"overwrite"``: latents at the positions of x[t-N+1 .. t], as "replay", but in the decoder's pass they
  *replace* those tokens' cache entries: the group sees original tokens j <= t-N only (`replaced` = N),
  its member k sits in cache slot pos(t) + 1 + k - N, and the text resumes at t+1. The coprocessor's soft
  tokens still see all of x[0..t] (they are appended to the prompt's cache: `replaced` = 0). At a point
  with r < N real tokens up to it, the first N - r latents replace nothing and are hidden like padding
  (`padded_latents`), as `augment` pads a short prompt to N. With `num_overwritten` = R < N only the first R
  latents replace x[t-R+1 .. t] (`replaced` = R); the other N - R follow at pos(t) + 1 .. pos(t) + N - R, in
  cache slots after them, and the text resumes at pos(t) + N - R + 1. With ``appended_at="window"`` the N - R
  come first (at the R's first N - R positions, in the first cache slots of the group), the R follow N - R
  positions on, and the latents over a short row's padding are the first of the R, not of the group
  (`within_group_allowed`'s `padded_from`).

Under "shared" and "replay" the latents take cache slots but no positions. Sliding windows are laid
over cache slots, not position ids, because that is what the decoder's own masks do at inference
(its window counts cache entries): a group member is always ``1 + k`` slots after token t (``1 + k - N``
under "overwrite").

Late latents (asynchronous augmentation, `training_loss(delays=...)`): latents computed from x[0..t]
that arrive d tokens late are inserted after x[s], s = t + d, and every function here is then called
with s as the group's insertion point: the group sees x[0..s] and itself, its latents take the
positions the layout gives latents inserted after x[s] (``"after"``: pos(s)+1 .. pos(s)+N;
``"shared"``: pos(s); ``"replay"``: the positions of x[s-N+1 .. s]; ``"overwrite"``: those, in place of
x[s-N+1 .. s], so the group sees x[0..s-N]) and the text resumes as after s.
The coprocessor's output keeps the content of time t (its soft tokens sit at t), but the decoder sees
the latents laid out exactly as synchronous ones, with the anchor of s (`latent_anchor="replay"`: the
embeddings of x[s-N+1 .. s], which they replay at those positions), so the offsets between latents and
the text after them, and the current token at the last latent, are those it was trained with; with
d = 0 nothing changes.

Masks are additive floats (0 = attend, dtype minimum = blocked): transformers' eager attention
silently ignores a boolean 4D mask, and -inf turns fully blocked rows into NaNs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from dca.config import LATENT_POSITIONS, CoprocessorConfig

FULL, SLIDING = "full_attention", "sliding_attention"


def prefix_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a (possibly left- or right-padded) batch, the way `generate` computes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def group_position_ids(prefix_positions: torch.Tensor, insert_at: torch.Tensor, group_size: int, *,
                       num_latents: int = 0, layout: str = "after", replaced: int | None = None,
                       appended_first: bool = False) -> torch.Tensor:
    """[B, P * group_size] position ids of P groups whose first `num_latents` members are latents.

    With ``layout="after"`` member k of the group after token t sits at pos(t) + 1 + k (whatever it
    is); this is also every member's cache slot relative to t. With ``"shared"`` or ``"replay"`` the
    latents sit at pos(t), or at the positions of x[t-N+1 .. t], and the members after them at
    pos(t) + 1, pos(t) + 2, ... ("overwrite" places them as "replay" does; its cache slots are `prefix_allowed`'s).
    Under "overwrite" with `replaced` = R < N (`num_overwritten`) only the first R latents take the positions of
    x[t-R+1 .. t]; the others, and the text after them, sit at pos(t) + 1, pos(t) + 2, ... as under "after".
    With `appended_first` (``appended_at="window"``) the N - R come first instead, as if inserted before x[t-R+1]:
    at pos(x[t-R+1]) + 0 .. N-R-1, then the R at the positions of x[t-R+1 .. t] plus N - R, and the text after.
    """
    if layout not in LATENT_POSITIONS:
        raise ValueError(f"latent positions must be one of {LATENT_POSITIONS}, got {layout!r}")
    if not 0 <= num_latents <= group_size:
        raise ValueError(f"num_latents={num_latents} must lie in [0, group_size={group_size}]")
    in_place = {"after": 0, "overwrite": num_latents if replaced is None else replaced}.get(layout, num_latents)
    if not 0 <= in_place <= num_latents:
        raise ValueError(f"replaced={replaced} must lie in [0, num_latents={num_latents}]")
    device = insert_at.device
    start = prefix_positions.gather(1, insert_at)[:, :, None]  # [B, P, 1]: pos(t)
    following = start + 1 + torch.arange(group_size - in_place, device=device)  # [B, P, group_size - in_place]
    if in_place == 0:
        return following.flatten(1)
    if layout == "shared":
        latents = start.expand(-1, -1, in_place)
    else:  # replay, overwrite: the positions of x[t-R+1 .. t]; left padding has position 0, like the first real token
        index = (insert_at[:, :, None] + torch.arange(1 - in_place, 1, device=device)).clamp(min=0)
        latents = prefix_positions.gather(1, index.flatten(1)).view_as(index)
    appended = num_latents - in_place
    if appended_first and layout == "overwrite" and appended:
        latents = torch.cat([latents[:, :, :1] + torch.arange(appended, device=device), latents + appended], dim=2)
        following = following[:, :, appended:]  # the text's positions, as after the appended latents
    return torch.cat([latents, following], dim=2).flatten(1)


def latent_group_position_ids(config: CoprocessorConfig, prefix_positions: torch.Tensor, insert_at: torch.Tensor,
                              group_size: int) -> torch.Tensor:
    """`group_position_ids` of groups that start with `config`'s N latents, laid out as its `latent_positions` (and
    `num_overwritten`) say: the one place a config becomes position ids."""
    return group_position_ids(prefix_positions, insert_at, group_size, num_latents=config.num_latents,
                              layout=config.latent_positions, replaced=config.replaced_entries,
                              appended_first=config.appended_first)


def prefix_allowed(
    prefix_valid: torch.Tensor,
    prefix_positions: torch.Tensor,
    insert_at: torch.Tensor,
    group_size: int,
    sliding_window: int | None,
    replaced: int,
) -> torch.Tensor:
    """Boolean [B, P, group_size, T]: may member k of the group after t attend to original token j?

    Yes when j <= t - replaced, j is not padding, and (with a window) j lies within the window of the
    member's cache slot, pos(t) + 1 + k - replaced (see the module docstring). `replaced` > 0: the
    group's first members replace the cache entries of x[t-replaced+1 .. t] ("overwrite").
    """
    key_index = torch.arange(prefix_valid.shape[1], device=insert_at.device)
    allowed = (key_index <= insert_at[:, :, None] - replaced) & prefix_valid[:, None, :].bool()  # [B, P, T]
    allowed = allowed[:, :, None, :].expand(-1, -1, group_size, -1)
    if sliding_window is not None:
        slots = group_position_ids(prefix_positions, insert_at, group_size).view(*insert_at.shape, group_size)
        slots = slots - replaced
        allowed = allowed & (slots[..., None] - prefix_positions[:, None, None, :] < sliding_window)
    return allowed


def padded_latents(prefix_valid: torch.Tensor, insert_at: torch.Tensor, replaced: int) -> torch.Tensor | None:
    """[B, P]: how many of each group's first latents replace no token, or None when no group has any.

    Under "overwrite" a group at a point with r < N real tokens up to it replaces all r and has N - r latents
    left over: they stand where `augment` left-pads a short prompt to N, and like that padding no other member
    sees them (`within_group_allowed`), so the group's last r latents are what the decoder reads.
    """
    if not replaced:
        return None
    real = prefix_valid.long().cumsum(1).gather(1, insert_at)  # real tokens in x[0..t]
    padded = (replaced - real).clamp(min=0)
    return padded if bool(padded.any()) else None


def latent_cache_mask(config: CoprocessorConfig, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L - R + N] (L at least R): the mask of the cache after the latents are written at the end of the
    left-padded rows `attention_mask` [B, L] -- the kept prompt entries, then the latents in their cache order,
    each that replaces a token with that token's mask (0 where it replaces padding; a row shorter than R is
    left-padded to R first, as `augment` pads a short prompt), the appended ones 1."""
    short = config.replaced_entries - attention_mask.shape[1]
    if short > 0:
        attention_mask = F.pad(attention_mask, (short, 0))
    kept = attention_mask.shape[1] - config.replaced_entries
    latents = attention_mask.new_ones(attention_mask.shape[0], config.num_latents)
    if config.replaced_entries:
        latents[:, config.anchored_latents] = attention_mask[:, kept:]
    return torch.cat([attention_mask[:, :kept], latents], dim=1)


def within_group_allowed(group_size: int, *, causal: bool = True, sliding_window: int | None = None,
                         device: torch.device | None = None, padded: torch.Tensor | None = None,
                         padded_from: int = 0) -> torch.Tensor:
    """Boolean [group_size, group_size]: may member q of a group attend to member k of the same group?

    With `padded` ([B, P], `padded_latents`) it is [B, P, group_size, group_size]: a group's first `padded`
    members from member `padded_from` on (the first that replaces a token: N - R under ``appended_at="window"``,
    else 0) are hidden from the others (each still sees itself, so that no row is blocked everywhere).
    """
    member = torch.arange(group_size, device=device)
    allowed = torch.ones(group_size, group_size, dtype=torch.bool, device=device)
    if causal:
        allowed = member[None, :] <= member[:, None]
    if sliding_window is not None:
        allowed = allowed & (member[:, None] - member[None, :] < sliding_window)
    if padded is not None:
        hidden = (member >= padded_from) & (member < padded_from + padded[:, :, None])  # [B, P, G]
        allowed = allowed & (~hidden[:, :, None, :] | (member[:, None] == member[None, :]))
    return allowed


def group_attention_allowed(
    prefix_valid: torch.Tensor,
    prefix_positions: torch.Tensor,
    insert_at: torch.Tensor,
    group_size: int,
    *,
    causal_within_group: bool = True,
    sliding_window: int | None = None,
    replaced: int = 0,
    padded_from: int = 0,
) -> torch.Tensor:
    """Boolean [B, Q, T + Q] where Q = P * group_size: may query q attend to key k?

    Keys are the T original tokens (the cache) followed by the Q group members themselves: the
    dense form of `prefix_allowed` beside a block diagonal of `within_group_allowed`, which is the
    rule; `dca.attention` uses the two parts without ever building this.
    """
    batch, num_groups = insert_at.shape
    to_prefix = prefix_allowed(prefix_valid, prefix_positions, insert_at, group_size, sliding_window,
                               replaced).flatten(1, 2)
    block = within_group_allowed(group_size, causal=causal_within_group, sliding_window=sliding_window,
                                 device=insert_at.device, padded=padded_latents(prefix_valid, insert_at, replaced),
                                 padded_from=padded_from)
    block = block.expand(batch, num_groups, group_size, group_size)  # [B, P, G, G]
    same_group = torch.eye(num_groups, dtype=torch.bool, device=insert_at.device)[:, None, :, None]  # [P, 1, P, 1]
    to_group = (block[:, :, :, None, :] & same_group).reshape(batch, num_groups * group_size, -1)
    return torch.cat([to_prefix, to_group], dim=-1)


def to_additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [B, Q, K] -> additive [B, 1, Q, K] float mask."""
    blocked = torch.finfo(dtype).min
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, blocked)[:, None]


def attention_kinds(config: PretrainedConfig) -> dict[str, int | None]:
    """The attention kinds a model's layers use, each with its sliding window (None = unlimited).

    Models with per-layer types (Gemma 2/3, Qwen2, ...) take a dict of masks keyed by kind; the
    others take one tensor, which is returned under the key ``None`` in the caller.
    """
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not layer_types:
        return {FULL: window}  # e.g. Mistral: one kind, windowed if the config says so
    unsupported = set(layer_types) - {FULL, SLIDING}
    if unsupported:
        raise NotImplementedError(f"dca cannot yet build masks for attention kinds {sorted(unsupported)} "
                                  f"of model type {config.model_type!r}")
    return {kind: (window if kind == SLIDING else None) for kind in dict.fromkeys(layer_types)}


def group_attention_mask(
    config: PretrainedConfig,
    prefix_valid: torch.Tensor,
    prefix_positions: torch.Tensor,
    insert_at: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    *,
    causal_within_group: bool = True,
    replaced: int = 0,
    padded_from: int = 0,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask argument a transformers model takes for P groups laid after a cached prefix (whose last
    `replaced` tokens before each group's t the group replaces, `prefix_allowed`)."""
    kinds = attention_kinds(config)
    masks = {
        kind: to_additive(
            group_attention_allowed(prefix_valid, prefix_positions, insert_at, group_size,
                                    causal_within_group=causal_within_group, sliding_window=window,
                                    replaced=replaced, padded_from=padded_from),
            dtype,
        )
        for kind, window in kinds.items()
    }
    if getattr(config, "layer_types", None):
        return masks
    return masks[FULL]
