"""What `AugmentedLM.augment` and `AugmentedLM.training_loss` return (re-exported by `dca.model` and `dca`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class AugmentOutput:
    """The result of augmenting a prompt's cache once, at its end."""

    past_key_values: DynamicCache  # the prompt (without its last N tokens under "overwrite") followed by the N latents
    logits: torch.Tensor  # [B, vocab]: the decoder's next-token logits after the last latent
    latents: torch.Tensor  # [B, N, hidden]: what was written into the cache
    attention_mask: torch.Tensor  # [B, L + N] (max(L, N) under "overwrite"): the cache's mask, latents included
    next_position_ids: torch.Tensor  # [B, 1]: position id of the first token after the latents
    latent_position_ids: torch.Tensor  # [B, N]: the latents' position ids


@dataclass
class TrainingLoss:
    """The one-pass objective with its per-token parts, for logging and for checking."""

    loss: torch.Tensor  # mean cross-entropy over every valid ahead token of every group
    token_losses: torch.Tensor  # [B, P, A], zero where there is no target
    target_mask: torch.Tensor  # [B, P, A] bool: x[t+k] exists (and is not padding)
    baseline_token_losses: torch.Tensor | None = None  # [B, P, A]: same targets, no augmentation

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())

    @property
    def baseline_loss(self) -> torch.Tensor | None:
        if self.baseline_token_losses is None:
            return None
        return self.baseline_token_losses.sum() / self.target_mask.sum().clamp(min=1)
