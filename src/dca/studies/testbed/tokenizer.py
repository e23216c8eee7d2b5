"""A tiny word-level tokenizer built from a task's list of units: no files, no hub.

A unit is a character or a whole word (for ``chase``, one assignment ``x=y;`` or the question ``?x:``
is one token, so a lookup is one attention step rather than a previous-token head plus a match).
"""

from __future__ import annotations

import re

import torch

PAD, BOS = "<pad>", "<bos>"


class Tokenizer:
    """Greedy longest-unit tokenization over a fixed list of units, after <pad> (id 0) and <bos> (id 1)."""

    def __init__(self, units: list[str]):
        if len(set(units)) != len(units) or not all(units):
            raise ValueError("units must be distinct and non-empty")
        self.tokens = [PAD, BOS, *units]
        self.ids = {u: i for i, u in enumerate(self.tokens)}
        self.pad_id, self.bos_id = 0, 1
        self._pattern = re.compile("|".join(re.escape(u) for u in sorted(units, key=len, reverse=True)))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        pieces = self._pattern.findall(text)
        if "".join(pieces) != text:
            raise ValueError(f"text has characters outside the tokenizer's units: {text!r}")
        return ([self.bos_id] if bos else []) + [self.ids[p] for p in pieces]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.tokens[i] for i in ids if i > self.bos_id)

    def batch(self, texts: list[str], bos: bool = True) -> torch.Tensor:
        """[B, T] ids of texts right-padded with <pad>."""
        rows = [self.encode(t, bos=bos) for t in texts]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows])
