"""Perplexity by position after the augmentation point: the paper's Table 1 protocol.

Augment held-out text at P points per sequence and score the next K tokens after each, with and
without the latents, on the very same targets (`training_loss(..., with_baseline=True)` computes
both in one pass). The relative perplexity change at distance k is exp(mean NLL_aug(k) -
mean NLL_base(k)) - 1; its confidence interval comes from a bootstrap over sequences.

With ``latent_delay=d`` the latents computed from x[0..t] arrive d tokens late, as under asynchronous
augmentation: they are inserted after x[t+d] on the anchor of that point (`AugmentedLM.training_loss`'s
delays), k counts from there (the k-th token is x[t+d+k]) and the base is scored on the same tokens. The
points t are those of d = 0, so every delay sees the very same coprocessor output; a target past the end of
its sequence is not scored.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from dca.errors import DataError
from dca.model import AugmentedLM
from dca.resources import load_texts
from dca.training.data import sample_positions, split_texts, tokenize_and_pack

KS = (1, 2, 4, 8, 16, 32)
# PAPER.md Table 1 (Gemma-2 2B): relative perplexity change (%) at each of KS, by latent count
PAPER_TABLE1 = {8: [-1.53, -1.67, -1.39, -1.22, -0.85, -0.55], 16: [-2.48, -2.41, -1.98, -1.56, -1.08, -0.64],
                32: [-3.28, -3.15, -2.66, -2.11, -1.50, -0.88], 64: [-3.94, -3.70, -3.17, -2.61, -1.88, -1.20]}


@dataclass
class PositionReport:
    ks: list[int]
    base_ppl: list[float]
    augmented_ppl: list[float]
    rel_change: list[float]  # fraction: -0.02 is a 2% lower perplexity
    ci_low: list[float]
    ci_high: list[float]
    num_sequences: int
    num_groups: int
    # per sequence, summed over its points: the augmented NLL and the scored tokens at each k ([S][K]), so that two
    # reports on the same points can be compared sequence by sequence (`paired_change`)
    sequence_nll: list[list[float]] | None = None
    sequence_counts: list[list[float]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PositionReport:
        return cls(**data)

    def markdown(self, title: str = "relative perplexity change") -> str:
        lines = [f"| k | base ppl | augmented ppl | {title} | 95% CI |", "|---|---|---|---|---|"]
        for i, k in enumerate(self.ks):
            lines.append(f"| {k} | {self.base_ppl[i]:.3f} | {self.augmented_ppl[i]:.3f} | "
                         f"{100 * self.rel_change[i]:+.2f}% | [{100 * self.ci_low[i]:+.2f}, "
                         f"{100 * self.ci_high[i]:+.2f}] |")
        return "\n".join(lines)


@torch.no_grad()
def token_losses_by_distance(model: AugmentedLM, sequences: torch.Tensor, positions: torch.Tensor,
                             num_ahead: int, batch_size: int = 4, progress: bool = False,
                             autocast_bf16: bool = False,
                             latent_delay: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence sums over groups: (augmented NLL [S, K], base NLL [S, K], counts [S, K])."""
    device = model.device
    was_training = model.training
    model.eval()
    aug, base, count = [], [], []
    for start in tqdm(range(0, len(sequences), batch_size), desc="eval", disable=not progress, leave=False):
        points = positions[start : start + batch_size].to(device)
        delays = torch.full_like(points, latent_delay) if latent_delay else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            out = model.training_loss(sequences[start : start + batch_size].to(device), points,
                                      with_baseline=True, num_ahead=num_ahead, delays=delays)
        aug.append(out.token_losses.sum(1).float().cpu())
        base.append(out.baseline_token_losses.sum(1).float().cpu())
        count.append(out.target_mask.sum(1).float().cpu())
    model.train(was_training)
    return torch.cat(aug), torch.cat(base), torch.cat(count)


def perplexity_by_position(model: AugmentedLM, sequences: torch.Tensor, positions: torch.Tensor,
                           ks: tuple[int, ...] = KS, batch_size: int = 4, bootstrap: int = 1000, seed: int = 0,
                           progress: bool = False, autocast_bf16: bool = False,
                           latent_delay: int = 0) -> PositionReport:
    """Relative perplexity change of the k-th token after each augmentation point, for k in `ks`."""
    if min(ks) < 1:
        raise ValueError(f"distances k must be >= 1, got {ks}")
    aug, base, count = token_losses_by_distance(model, sequences, positions, max(ks), batch_size, progress,
                                                autocast_bf16, latent_delay)
    columns = [k - 1 for k in ks]
    aug, base, count = aug[:, columns], base[:, columns], count[:, columns]

    rel, low, high = bootstrapped_change(aug, base, count, bootstrap, seed)
    n = count.sum(0).clamp(min=1)
    return PositionReport(
        ks=list(ks),
        base_ppl=[math.exp(v) for v in (base.sum(0) / n).tolist()],
        augmented_ppl=[math.exp(v) for v in (aug.sum(0) / n).tolist()],
        rel_change=rel,
        ci_low=low,
        ci_high=high,
        num_sequences=len(sequences),
        num_groups=int(positions.numel()),
        sequence_nll=aug.tolist(),
        sequence_counts=count.tolist(),
    )


def bootstrapped_change(nll: torch.Tensor, reference_nll: torch.Tensor, count: torch.Tensor, bootstrap: int = 1000,
                        seed: int = 0) -> tuple[list[float], list[float], list[float]]:
    """Relative perplexity change of `nll` against `reference_nll` ([S, K] per-sequence sums over the same points,
    `count` tokens each) at each k, and its 95 % interval from resampling whole sequences with their points."""

    def rel(rows: torch.Tensor) -> torch.Tensor:
        n = count[rows].sum(0).clamp(min=1)
        return torch.exp((nll[rows].sum(0) - reference_nll[rows].sum(0)) / n) - 1

    sequences = len(nll)
    generator = torch.Generator().manual_seed(seed)
    everything = torch.arange(sequences)
    draws = torch.stack([rel(torch.randint(0, sequences, (sequences,), generator=generator))
                         for _ in range(bootstrap)]) if bootstrap else rel(everything)[None]
    return rel(everything).tolist(), draws.quantile(0.025, dim=0).tolist(), draws.quantile(0.975, dim=0).tolist()


def paired_change(report: PositionReport, reference: PositionReport, bootstrap: int = 1000,
                  seed: int = 0) -> tuple[list[float], list[float], list[float]]:
    """Relative perplexity change of one augmented model against another scored on the same points (negative:
    `report`'s model is better), with a 95 % interval that resamples sequences for both at once (paired)."""
    if report.sequence_nll is None or reference.sequence_nll is None:
        raise ValueError("paired_change needs per-sequence losses (reports written before they were kept lack them)")
    if report.ks != reference.ks or report.sequence_counts != reference.sequence_counts:
        raise ValueError("paired_change needs two reports on the same sequences, points and distances k")
    return bootstrapped_change(torch.tensor(report.sequence_nll), torch.tensor(reference.sequence_nll),
                               torch.tensor(report.sequence_counts), bootstrap, seed)


def untrained_like(model: AugmentedLM) -> AugmentedLM:
    """The coprocessor of `model`'s configuration at initialisation (same `init_seed`), on the same decoder.

    Table 1 shows it beside the trained one: what the latent mapping alone does at step 0, so that what
    training adds can be read off. (A LoRA adapter starts at zero whatever its seed; soft tokens, scratch
    weights and the gate start from the config.)
    """
    return AugmentedLM.from_decoder(model.decoder, model.coprocessor.config).eval()


def trained_vs_untrained_markdown(trained: PositionReport, untrained: PositionReport) -> str:
    """One Table 1 with the trained coprocessor and the same configuration untrained, k by k."""
    lines = ["| k | base ppl | trained | 95% CI | untrained (step 0) | 95% CI |", "|---|---|---|---|---|---|"]
    for i, k in enumerate(trained.ks):
        cells = [f"{100 * r.rel_change[i]:+.2f}% | [{100 * r.ci_low[i]:+.2f}, {100 * r.ci_high[i]:+.2f}]"
                 for r in (trained, untrained)]
        lines.append(f"| {k} | {trained.base_ppl[i]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def held_out_eval_set(model_tokenizer, data: str, held_out_fraction: float, sequences: int, seq_len: int,
                      positions: int, max_k: int, seed: int = 12345,
                      min_position: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed held-out sequences and augmentation points t >= `min_position` that leave `max_k` tokens after each."""
    _, held_out = split_texts(load_texts(data), held_out_fraction)
    seqs = tokenize_and_pack(held_out, model_tokenizer, seq_len)[:sequences]
    if len(seqs) < sequences:
        raise DataError(f"only {len(seqs)} held-out sequences of {seq_len} tokens in {data!r}, asked for {sequences}")
    generator = torch.Generator().manual_seed(seed)
    return seqs, sample_positions(len(seqs), seq_len - max_k + 1, positions, generator, min_position)


def add_held_out_arguments(parser: argparse.ArgumentParser, *, sequences: int) -> None:
    """The options of `held_out_eval_set` (model, corpus, split, sequences, length, points), for scripts that score
    coprocessors outside `dca eval` on the points it would use."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wiki")
    parser.add_argument("--held-out-fraction", type=float, default=0.05)
    parser.add_argument("--sequences", type=int, default=sequences)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--positions", type=int, default=4, help="augmentation points per sequence")
    parser.add_argument("--min-position", type=int, default=15)
