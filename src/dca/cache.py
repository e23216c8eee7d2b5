"""Key-value cache helpers.

transformers' dynamic cache layers grow by concatenation (`torch.cat` makes new tensors), so a fork
that copies only the layer objects shares every stored tensor with the original yet can be extended
without touching it. That is how the coprocessor reads the decoder's cache for free.
"""

from __future__ import annotations

import copy

from transformers import Cache, DynamicCache


def fork_cache(cache: Cache) -> Cache:
    """A cache that starts equal to `cache` and can be appended to without changing it."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"fork_cache needs a DynamicCache (grown by concatenation), got {type(cache).__name__}")
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    return forked
