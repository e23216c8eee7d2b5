"""Training data: plain text -> packed token sequences -> batches with sampled insertion points.

Everything is a pure function of (seed, index), so a resumed run sees exactly the batches an
uninterrupted run would have seen, and held-out evaluation is the same for every run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerBase

from dca.errors import DataError


def is_held_out(text: str, fraction: float) -> bool:
    """Split by a hash of the document itself: stable across runs, corpus order and corpus growth."""
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return digest % 1_000_000 < fraction * 1_000_000


def split_texts(texts: Iterable[str], held_out_fraction: float) -> tuple[list[str], list[str]]:
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    train, held_out = [], []
    for text in texts:
        (held_out if is_held_out(text, held_out_fraction) else train).append(text)
    return train, held_out


def pack(token_lists: Iterable[list[int]], seq_len: int, separator_id: int | None) -> torch.Tensor:
    """Concatenate documents (separated by `separator_id`) and cut into [num_seqs, seq_len]; drop the tail."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        if separator_id is not None:
            stream.append(separator_id)
    usable = len(stream) // seq_len * seq_len
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, seq_len)


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer starts every text with one (Gemma's do, SmolLM2's do not), else None."""
    ids = tokenizer("a")["input_ids"]
    return ids[0] if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else None


def tokenize_and_pack(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Documents joined by EOS and cut into [num_seqs, seq_len]. A model whose tokenizer starts every text with
    BOS gets BOS at position 0 of every sequence: without it Gemma-3 forms no attention sink and looks twice as
    hard at its last tokens (results/duplicate-attention), far from the inputs it was trained on."""
    token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = leading_bos(tokenizer)
    if bos is None:
        return pack(token_lists, seq_len, tokenizer.eos_token_id)
    body = pack(token_lists, seq_len - 1, tokenizer.eos_token_id)
    return torch.cat([torch.full((len(body), 1), bos, dtype=body.dtype), body], 1)


def sample_positions(batch: int, seq_len: int, num_positions: int, generator: torch.Generator,
                     min_position: int = 0) -> torch.Tensor:
    """[batch, P] distinct sorted insertion points t in [min_position, seq_len - 2] (t + 1 must exist)."""
    choices = seq_len - 1 - min_position
    if num_positions > choices or num_positions < 1:
        raise ValueError(f"cannot sample {num_positions} distinct positions from [{min_position}, {seq_len - 2}]")
    rows = [torch.randperm(choices, generator=generator)[:num_positions].sort().values for _ in range(batch)]
    return torch.stack(rows) + min_position


def sample_delays(positions: torch.Tensor, seq_len: int, max_delay: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, P] delays d, uniform in 0..max_delay, each cut to seq_len - 2 - t (x[t+d+1] must exist)."""
    delays = torch.randint(0, max_delay + 1, positions.shape, generator=generator)
    return torch.minimum(delays, seq_len - 2 - positions)


class BatchSchedule:
    """Micro-batch k of a run: which sequences, where to augment them and, with `max_delay`, how late the latents
    arrive (`AugmentedLM.training_loss`'s delays). A function of (seed, k) only."""

    def __init__(self, sequences: torch.Tensor, batch_size: int, num_positions: int, seed: int, max_delay: int = 0,
                 min_position: int = 0):
        if len(sequences) < batch_size:
            raise DataError(f"only {len(sequences)} training sequences for a batch of {batch_size}: "
                             "use more text, a shorter seq_len or a smaller batch")
        self.sequences, self.batch_size, self.num_positions, self.seed = sequences, batch_size, num_positions, seed
        self.max_delay, self.min_position = max_delay, min_position  # "overwrite" samples t >= N-1 by default
        self.batches_per_epoch = len(sequences) // batch_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input_ids [B, T], positions [B, P], delays [B, P] or None without `max_delay`)."""
        epoch, offset = divmod(index, self.batches_per_epoch)
        epoch_generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.sequences), generator=epoch_generator)
        rows = order[offset * self.batch_size : (offset + 1) * self.batch_size]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        positions = sample_positions(self.batch_size, self.sequences.shape[1], self.num_positions, generator,
                                     self.min_position)
        # drawn after the positions, from the same generator: without delays the batches are those of before
        delays = None
        if self.max_delay:
            delays = sample_delays(positions, self.sequences.shape[1], self.max_delay, generator)
        return self.sequences[rows], positions, delays
