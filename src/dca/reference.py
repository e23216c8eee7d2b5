"""The straightforward, sequential computation that the one-pass objective must equal.

For one row and one insertion point t: augment the prompt x[0..t] once, score x[t+1] with the
logits after the last latent, then let the plain decoder continue over x[t+1 .. t+A-1] from the
augmented cache (its text positions resuming where `augment` says) and score x[t+2 .. t+A]. This is
what inference does; it is also what a naive
implementation trains with (one such computation per position), which `dca bench` measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dca.model import AugmentedLM


def sequential_group_losses(model: AugmentedLM, input_ids: torch.Tensor, t: int) -> torch.Tensor:
    """Cross-entropy of each existing ahead token x[t+1 .. t+A] of one unpadded row [1, T].

    Differentiable when called with gradients enabled.
    """
    num_ahead = model.coprocessor.config.num_ahead
    prompt = input_ids[:, : t + 1]
    targets = input_ids[0, t + 1 : t + 1 + num_ahead]
    if len(targets) == 0:
        return torch.zeros(0, device=input_ids.device)
    out = model.augment_with_grad(prompt)
    losses = [F.cross_entropy(out.logits.float(), targets[:1])]
    if len(targets) > 1:
        steps = torch.arange(len(targets) - 1, device=input_ids.device)
        cont = model.decoder(input_ids=input_ids[:, t + 1 : t + len(targets)], attention_mask=torch.ones(
            1, out.attention_mask.shape[1] + len(targets) - 1, dtype=torch.long, device=input_ids.device),
            position_ids=out.next_position_ids + steps, past_key_values=out.past_key_values, use_cache=True)
        losses.append(F.cross_entropy(cont.logits[0].float(), targets[1:], reduction="none"))
    return torch.cat([loss.reshape(-1) for loss in losses])

