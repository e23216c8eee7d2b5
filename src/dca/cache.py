"""Key-value cache helpers.

transformers' dynamic cache layers grow by concatenation (`torch.cat` makes new tensors), so a fork
that copies only the layer objects shares every stored tensor with the original yet can be extended
without touching it. That is how the coprocessor reads the decoder's cache for free.
"""

from __future__ import annotations

import copy

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer


def fork_cache(cache: Cache) -> Cache:
    """A cache that starts equal to `cache` and can be appended to without changing it."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"fork_cache needs a DynamicCache (grown by concatenation), got {type(cache).__name__}")
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    return forked


class _PrefixLayer(DynamicLayer):
    """A cache layer that lends its keys and values to a pass without keeping what the pass adds."""

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def prefix_view(cache: Cache) -> Cache:
    """A fork of `cache` that every pass reads as its prefix and none extends.

    Running a layer twice over it gives the same keys twice, which is what activation checkpointing
    needs: its backward replays each layer (`dca.recompute`).
    """
    forked = fork_cache(cache)
    if any(type(layer) is not DynamicLayer for layer in forked.layers):
        raise TypeError("prefix_view needs full-length DynamicLayers (the cache training_loss builds)")
    for layer in forked.layers:
        layer.__class__ = _PrefixLayer  # same state, an update that keeps nothing
    return forked
