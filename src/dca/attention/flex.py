"""Group attention through PyTorch's flex attention: the CUDA path, block-sparse and fused.

The rule of `dca.masks` -- member m of the group after t sees original token j when j <= t (t - N under
"overwrite"), j is
real and (with a window) within the window of the member's cache slot, and member k of its own
group when k <= m (causal) and within the window -- is written here once more as a predicate
`mask_mod(b, h, q, kv)` over the flattened [P·G queries, T + P·G keys]. `create_block_mask` turns it
into a `BlockMask` that lists, per block of 128 queries, only the key blocks it touches: the prefix
and the band of its own groups, so the work grows linearly in P. A test evaluates the predicate at
every (q, kv) against `dca.masks.group_attention_allowed`.

It runs like `dca.attention.grouped`: registered with transformers' `AttentionInterface` (as `FLEX`),
switched on only for a group pass, fed the layout through the keyword argument `dca_groups` (a
`FlexLayout`, which builds each sliding window's block mask once per pass and shares it between
layers). On CUDA flex attention is compiled once per process (as PyTorch recommends: eager flex
attention materialises every score); on CPU it runs eagerly, forward only -- torch 2.13 has no flex
attention backward on CPU, which is why CPU training uses `grouped`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from dca.attention.grouped import GroupLayout, base_attention, grouped_attention
from dca.masks import group_position_ids

FLEX = "dca_flex"
MIN_CUDA_HEAD_DIM = 16  # the Triton kernel's smallest head dimension (tl.dot)


def group_mask_mod(layout: GroupLayout, sliding_window: int | None = None) -> Callable:
    """The predicate `create_block_mask` takes: may query q (of P·G) attend to key kv (of T + P·G)?"""
    batch, groups = layout.insert_at.shape
    size, causal, prefix_len = layout.group_size, layout.causal, layout.prefix_valid.shape[1]
    # the prefix tables run on over the group keys (none of them a prefix key), so every lookup below is in range
    # for any q < P·G, kv < T + P·G -- the CUDA kernel hands the predicate indices in range -- with no clamping
    # (which trips inductor's range analysis)
    tail = (batch, groups * size)
    valid = torch.cat([layout.prefix_valid.bool(), layout.prefix_valid.new_zeros(tail, dtype=torch.bool)], 1)
    positions = torch.cat([layout.prefix_positions, layout.prefix_positions.new_zeros(tail)], 1)  # [B, T + P·G]
    # "overwrite" (`replaced` = N): a group sees x[0..t-N] and its members sit N cache slots earlier
    insert_at = layout.insert_at - layout.replaced  # [B, P]: the last prefix key each group sees
    slots = group_position_ids(layout.prefix_positions, layout.insert_at, size) - layout.replaced  # [B, P·G]
    padded = layout.padded_latents()  # [B, P] or None: latents that replace no token, hidden from the others

    def mask_mod(b, h, q, kv):
        group, member = q // size, q % size
        k = kv - prefix_len  # as a group key: its index among the P·G, negative for prefix keys
        to_prefix = valid[b, kv] & (kv <= insert_at[b, group])
        to_group = (k >= 0) & (k // size == group)
        if causal:
            to_group = to_group & (k % size <= member)
        if padded is not None:
            hidden = (k % size >= layout.padded_from) & (k % size < layout.padded_from + padded[b, group])
            to_group = to_group & (~hidden | (k % size == member))
        if sliding_window is not None:  # windows count cache slots (dca.masks)
            to_prefix = to_prefix & (slots[b, q] - positions[b, kv] < sliding_window)
            to_group = to_group & (member - k % size < sliding_window)
        return to_prefix | to_group

    return mask_mod


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn)


def _on_cuda(fn: Callable, device: torch.device) -> Callable:
    """`fn` compiled once per process on CUDA; eager elsewhere (what the CPU tests compare), and inside a model that
    is being compiled as a whole (which compiles this too)."""
    return _compiled(fn) if device.type == "cuda" and not torch.compiler.is_compiling() else fn


@dataclass
class FlexLayout(GroupLayout):
    """A `GroupLayout` that also keeps the block mask of each sliding window, built once per pass."""

    _block_masks: dict = field(default_factory=dict, repr=False)

    def block_mask(self, sliding_window: int | None) -> BlockMask:
        if sliding_window not in self._block_masks:
            batch, groups = self.insert_at.shape
            queries = groups * self.group_size
            self._block_masks[sliding_window] = _on_cuda(create_block_mask, self.insert_at.device)(
                group_mask_mod(self, sliding_window), batch, None, queries, self.prefix_valid.shape[1] + queries,
                device=self.insert_at.device)
        return self._block_masks[sliding_window]


def flex_group_attention(
    module: nn.Module,
    query: torch.Tensor,  # [B, H, P*G, D]
    key: torch.Tensor,  # [B, Hkv, T + P*G, D]: the cached prefix, then the groups
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dca_groups: GroupLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface; returns ([B, P*G, H, D], no weights).

    Raises:
        ValueError: dropout, or shapes that do not match the layout.
    """
    if dca_groups is None:  # a call without groups while a group pass has switched the model: run as before
        return base_attention(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    if not isinstance(dca_groups, FlexLayout):  # another thread's grouped pass, while this model is switched to flex
        return grouped_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 sliding_window=sliding_window, softcap=softcap, dca_groups=dca_groups, **kwargs)
    if dropout:
        raise ValueError("flex group attention has no dropout: the decoder and coprocessor run without it")
    heads, q_len = query.shape[1], query.shape[2]
    groups, size = dca_groups.insert_at.shape[1], dca_groups.group_size
    prefix_len = key.shape[2] - q_len
    if q_len != groups * size or prefix_len != dca_groups.prefix_valid.shape[1]:
        raise ValueError(f"flex group attention got {q_len} queries after {prefix_len} cached keys, but the layout "
                         f"has {groups} groups of {size} after {dca_groups.prefix_valid.shape[1]} tokens")
    rep = heads // key.shape[1]
    if rep & (rep - 1):  # flex's kernel for < 128 queries shares a key head among 2^i query heads only: copy the keys
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)

    def softcapped(score, b, h, q, kv):  # Gemma 2: scores bent into (-softcap, softcap) after scaling
        return torch.tanh(score / softcap) * softcap

    out = _on_cuda(flex_attention, query.device)(
        query, key, value, score_mod=softcapped if softcap is not None else None,
        block_mask=dca_groups.block_mask(sliding_window), scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def flex_supported(config, device: torch.device | str) -> bool:
    """Whether `group_attention="auto"` takes flex for a model of this config on this device: CUDA, and a head
    dimension the fused kernel takes."""
    if torch.device(device).type != "cuda":
        return False
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim >= MIN_CUDA_HEAD_DIM
