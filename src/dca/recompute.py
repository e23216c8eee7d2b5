"""Activation checkpointing that keeps the cache: each decoder or coprocessor layer of a group pass stores
only its input and is run again during the backward pass.

transformers' own checkpointing cannot serve here: it drops `past_key_values` (every group would lose
its prefix) and only acts on modules in training mode (the frozen decoder never is). Here every layer
is wrapped for the duration of one pass, over a `dca.cache.prefix_view` of the cache, so the replayed
layer reads exactly the keys the first run read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer


def _layers(models: tuple[nn.Module | None, ...]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for model in models:
        for module in model.modules() if model is not None else ():
            if isinstance(module, GradientCheckpointingLayer):  # the decoder layers of every transformers model
                seen.setdefault(id(module), module)
    return list(seen.values())


@contextlib.contextmanager
def recomputed_layers(*models: nn.Module | None, enabled: bool = True,
                      setting: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                      ) -> Iterator[None]:
    """Inside the block, every decoder layer of `models` keeps only its inputs for the backward pass.

    `setting()` is entered around the replay too: the backward pass runs after the block has exited,
    so whatever the first run depended on (e.g. `use_grouped_attention`) must be set up again.
    """
    layers = _layers(models) if enabled else []
    if enabled and not layers:
        raise ValueError("activation checkpointing found no decoder layers (transformers GradientCheckpointingLayer) "
                         f"in {[type(m).__name__ for m in models if m is not None]}")
    own = [layer.__dict__.get("forward") for layer in layers]  # e.g. a hook library's wrapper, put back after
    for layer in layers:
        forward = layer.forward

        def run(*args, _forward=forward, **kwargs):
            with setting():
                return _forward(*args, **kwargs)

        def replayed(*args, _run=run, **kwargs):
            return checkpoint(_run, *args, use_reentrant=False, **kwargs)

        layer.forward = replayed  # an instance attribute: shadows the class's forward
    try:
        yield
    finally:
        for layer, previous in zip(layers, own, strict=True):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
