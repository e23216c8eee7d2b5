"""Group attention whose cost is linear in the number of groups P, exact, never building the dense mask.

In the one-pass objective every query belongs to one of P groups laid after the T cached original
tokens, and a group sees a prefix of those tokens and, causally, itself (`dca.masks`). The dense path
scores every query against all T + P·G keys, so its cost grows with P²; here each query is scored
against the T prefix keys and the G keys of its own group only, and one softmax runs over the
[T + G] scores -- the log-sum-exp merge of the prefix part and the block-diagonal part, written out --
so both the values and the gradients equal the dense computation. The arithmetic is one autograd
Function (`dca.attention.kernel`) that keeps no score matrix for the backward pass and recomputes it
there, so a layer keeps about what SDPA's fused dense kernel keeps.

It runs as an attention implementation of transformers (registered by `dca.attention` under
`GROUPED`): `AugmentedLM` switches a model to it only for its group passes and hands it the
`GroupLayout` as the keyword argument `dca_groups`, which transformers passes down to every layer.
It follows transformers' eager attention: grouped-query attention, per-layer sliding windows (which
count cache slots, as `dca.masks` explains), logit softcapping (Gemma 2) and padding.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dca.attention.kernel import grouped_attention_core
from dca.masks import padded_latents, prefix_allowed, within_group_allowed

GROUPED = "dca_grouped"


@dataclass
class GroupLayout:
    """Where the P groups of one pass sit: what `prefix_allowed` and `within_group_allowed` need."""

    prefix_valid: torch.Tensor  # [B, T]: 1 for real original tokens
    prefix_positions: torch.Tensor  # [B, T]
    insert_at: torch.Tensor  # [B, P]: each group's t
    group_size: int  # G
    causal: bool = True  # within a group
    # False where the cached prefix came from a pass without gradients (training_loss's): its keys and values then
    # get none, which spares two of the backward pass's five matrix products over the prefix
    prefix_grad: bool = True
    replaced: int = 0  # "overwrite": each group replaces the cache entries of the last this-many tokens up to t
    padded_from: int = 0  # the first member that replaces a token (N - R under appended_at="window")
    _masks: dict = field(default_factory=dict, repr=False)  # per sliding window: computed once per pass

    def padded_latents(self) -> torch.Tensor | None:
        """[B, P]: latents of each group that replace no token ("overwrite" at t < N-1), or None (`dca.masks`)."""
        return padded_latents(self.prefix_valid, self.insert_at, self.replaced)

    def blocked(self, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What may NOT be attended, shaped for the scores: (prefix [B, 1, 1, P, G, T], group [G, G] or, where some
        latents replace no token, [B, 1, 1, P, G, G])."""
        if sliding_window not in self._masks:
            to_prefix = prefix_allowed(self.prefix_valid, self.prefix_positions, self.insert_at, self.group_size,
                                       sliding_window, self.replaced)
            to_group = within_group_allowed(self.group_size, causal=self.causal, sliding_window=sliding_window,
                                            device=self.insert_at.device, padded=self.padded_latents(),
                                            padded_from=self.padded_from)
            if to_group.dim() == 4:  # per group ([B, P, G, G]): shaped like the prefix's
                to_group = to_group[:, None, None]
            self._masks[sliding_window] = (~to_prefix[:, None, None], ~to_group)
        return self._masks[sliding_window]


def grouped_attention(
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
    """transformers' attention-function interface; returns ([B, P*G, H, D], no weights)."""
    if dca_groups is None:  # a call without groups while a group pass has switched the model: run as before
        return base_attention(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    if dropout:
        raise ValueError("grouped attention has no dropout: the decoder and coprocessor run without it")
    batch, heads, q_len, dim = query.shape
    kv_heads, groups, size = key.shape[1], dca_groups.insert_at.shape[1], dca_groups.group_size
    prefix_len = key.shape[2] - q_len
    if q_len != groups * size or prefix_len != dca_groups.prefix_valid.shape[1]:
        raise ValueError(f"grouped attention got {q_len} queries after {prefix_len} cached keys, but the layout "
                         f"has {groups} groups of {size} after {dca_groups.prefix_valid.shape[1]} tokens")
    scale = dim**-0.5 if scaling is None else scaling
    # query heads h = kv * rep + r share key/value head kv: no copies of the keys (grouped-query attention)
    q = query.view(batch, kv_heads, heads // kv_heads, groups, size, dim)
    k_prefix, v_prefix = key[:, :, :prefix_len], value[:, :, :prefix_len]  # [B, Hkv, T, D]
    if not dca_groups.prefix_grad:
        k_prefix, v_prefix = k_prefix.detach(), v_prefix.detach()
    k_group = key[:, :, prefix_len:].view(batch, kv_heads, groups, size, dim)
    v_group = value[:, :, prefix_len:].view(batch, kv_heads, groups, size, dim)

    blocked_prefix, blocked_group = dca_groups.blocked(sliding_window)
    # one autograd Function that keeps no [P·G, T] score matrix for the backward pass (`dca.attention.kernel`)
    out = grouped_attention_core(q, k_prefix, v_prefix, k_group, v_group, blocked_prefix, blocked_group, scale,
                                 softcap)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def _configs(models: tuple[nn.Module | None, ...]) -> list:
    configs = []
    for model in models:
        config = getattr(model, "config", None)
        if config is not None and all(config is not c for c in configs):
            configs.append(config)
    return configs


_switch = threading.Lock()


def base_attention(module: nn.Module) -> Callable:
    """The implementation a model had before `use_grouped_attention` switched it: what a call without
    groups (another thread's `augment`, say) runs meanwhile."""
    name = getattr(module.config, "_dca_base_attention", module.config._attn_implementation)
    if name == "eager" or name == GROUPED:  # every transformers model file defines its own eager attention
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


@contextlib.contextmanager
def use_grouped_attention(*models: nn.Module | None, implementation: str = GROUPED) -> Iterator[None]:
    """Run these models' attention layers as `grouped_attention` (or another registered `implementation` that
    takes `dca_groups`, such as flex attention's) inside the block.

    transformers looks the implementation up in each model's config at every call. The switch is
    counted, so overlapping blocks from several threads restore the model only when the last one ends,
    and calls without groups meanwhile run the model's own implementation (`base_attention`).
    """
    configs = _configs(models)
    with _switch:
        for config in configs:
            if getattr(config, "_dca_grouped_users", 0) == 0:
                config._dca_base_attention = config._attn_implementation
                config._attn_implementation = implementation
            config._dca_grouped_users = getattr(config, "_dca_grouped_users", 0) + 1
    try:
        yield
    finally:
        with _switch:
            for config in configs:
                config._dca_grouped_users -= 1
                if config._dca_grouped_users == 0:
                    config._attn_implementation = config._dca_base_attention
