"""What a batch given to `AugmentedLM` must satisfy, checked before any pass runs.

Each check raises a `ValueError` that names the argument and what it holds, so a bad batch fails here with a
readable message instead of deep inside attention with an index error or, worse, silently (a padded insertion
point, a position id past the decoder's table).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig


def check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a LongTensor [batch, length], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids is an empty batch (batch size 0): there is nothing to run")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: augmentation needs at least one token")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}) (the decoder's input embedding has {vocab_size} "
                         f"rows), got ids from {low} to {high}")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(getattr(attention_mask, 'shape', ()))} must be a tensor matching "
                         f"input_ids {tuple(input_ids.shape)}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        odd = attention_mask[(attention_mask != 0) & (attention_mask != 1)].unique()[:5].tolist()
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (real token), got values such as {odd}")
    if not bool(attention_mask.any(dim=1).all()):
        raise ValueError("every row needs at least one real token (attention_mask has an all-zero row)")
    return input_ids, attention_mask.long()


def position_limit(config: PretrainedConfig) -> int | None:
    limit = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)  # GPT-2: n_positions
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def check_context(config: PretrainedConfig, what: str, largest_position: int, context: int) -> None:
    """Refuse what the decoder cannot read: a position id past its table, or more cache slots than its context.

    A learned absolute position table (GPT-2) has a row per position id and nothing else limits it; rotary
    models are trained on `max_position_embeddings` tokens, and the latents fill cache slots even when they
    take no positions.
    """
    limit = position_limit(config)
    if limit is None:
        return
    if largest_position >= limit:
        raise ValueError(f"{what} need position id {largest_position}, but the decoder has "
                         f"max_position_embeddings={limit} (position ids 0..{limit - 1}): shorten the input")
    text_config = config.get_text_config(decoder=True)
    rotary = getattr(text_config, "rope_parameters", None) is not None or hasattr(text_config, "rope_theta")
    if rotary and context > limit:
        raise ValueError(f"{what} fill {context} cache slots, more than the decoder's context of "
                         f"max_position_embeddings={limit}: shorten the input")


def check_positions(positions: torch.Tensor, attention_mask: torch.Tensor,
                    what: str = "insertion positions") -> torch.Tensor:
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.dtype != torch.long:
        raise ValueError("positions must be a LongTensor [batch, P] of insertion indices")
    if positions.shape[0] != attention_mask.shape[0] or positions.shape[1] == 0:
        raise ValueError(f"positions {tuple(positions.shape)} must be [batch={attention_mask.shape[0]}, P>=1]")
    length = attention_mask.shape[1]
    if bool((positions < 0).any()) or bool((positions > length - 2).any()):
        raise ValueError(f"{what} must lie in [0, {length - 2}] (each needs a following token), "
                         f"got min {int(positions.min())}, max {int(positions.max())}")
    if not bool(attention_mask.gather(1, positions).bool().all()):
        raise ValueError(f"every one of the {what} must be a real token, not padding")
    return positions


def check_delays(delays: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    if not isinstance(delays, torch.Tensor) or delays.dtype != torch.long or delays.shape != positions.shape:
        raise ValueError(f"delays must be a LongTensor shaped like positions {tuple(positions.shape)}, got "
                         f"{getattr(delays, 'dtype', type(delays))} {tuple(getattr(delays, 'shape', ()))}")
    if bool((delays < 0).any()):
        raise ValueError(f"delays must be >= 0 (tokens decoded before the latents arrive), got {int(delays.min())}")
    return delays
