"""One batched `AugmentedLM.generate` call for rows that each sample, stop and stream on their own.

Rows of a batch may differ in everything but `augment`: their prompts are left-padded to one width, and

* sampling is done per row by `RowSampler`, a logits processor that draws the row's token with the row's own
  `torch.Generator` (seeded from the request) and hands `generate` a one-hot score, so `generate` itself runs
  greedy. A seeded row therefore draws the same tokens whichever batch it lands in (up to float rounding of
  the logits across batch shapes), and rows with different temperatures, top-p or top-k share a batch;
* stopping is done per row by `RowStopping`, a stopping criterion that sees each new token, decodes the row's
  text, looks for its stop strings, end-of-sequence token, token budget and cancel flag, and passes new text
  to the row's callback as it comes. `generate` ends when every row is done.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dca.model import AugmentedLM


@dataclass(frozen=True)
class Sampling:
    """How a row picks its tokens. temperature 0 is greedy; top_k 0 is off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None: a fresh random seed

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Row:
    """One continuation to produce: a prompt, how to sample and when to stop, and where its text goes."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # called with each new piece of text (from the worker thread)
    is_cancelled: Callable[[], bool] = lambda: False
    # filled in while it runs
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already given to on_text
    finish_reason: str | None = None  # "stop", "length" or "cancelled"

    def _flush(self, upto: int) -> None:
        if upto > self.sent and self.on_text is not None:
            self.on_text(self.text[self.sent:upto])
        self.sent = max(self.sent, upto)


class RowSampler(LogitsProcessor):
    """Each sampling row draws its token with its own generator; greedy rows keep their scores (argmax)."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.generators = []
        for row in rows:
            seed = row.sampling.seed if row.sampling.seed is not None else secrets.randbits(63)
            self.generators.append(torch.Generator().manual_seed(seed))
        self.warpers = [_warpers(row.sampling) for row in rows]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for i, row in enumerate(self.rows):
            if row.sampling.greedy or row.finish_reason is not None:
                continue
            warped = self.warpers[i](input_ids[i:i + 1], scores[i:i + 1].float())
            probs = torch.softmax(warped, dim=-1)[0].cpu()
            token = int(torch.multinomial(probs, 1, generator=self.generators[i]))
            out[i] = float("-inf")
            out[i, token] = 0.0
        return out


def _warpers(sampling: Sampling) -> LogitsProcessorList:
    # transformers' own warpers, in the order its sampling applies them
    warpers = LogitsProcessorList()
    if not sampling.greedy and sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers


class RowStopping(StoppingCriteria):
    """Per-row bookkeeping after every new token; returns which rows are done."""

    def __init__(self, rows: list[Row], tokenizer: PreTrainedTokenizerBase, eos_ids: set[int],
                 tokenizer_lock: threading.Lock | None = None):
        self.rows, self.tokenizer, self.eos_ids = rows, tokenizer, eos_ids
        self.lock = tokenizer_lock or contextlib.nullcontext()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, new, strict=True):
            if row.finish_reason is None:
                with self.lock:  # a fast tokenizer used from two threads at once can fail ("Already borrowed")
                    _advance(row, token, self.tokenizer, self.eos_ids)
        return torch.tensor([row.finish_reason is not None for row in self.rows], device=input_ids.device)


def _advance(row: Row, token: int, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]) -> None:
    if row.is_cancelled():
        row.finish_reason = "cancelled"
        return
    if token in eos_ids:
        row.finish_reason = "stop"
        row._flush(len(row.text))
        return
    row.tokens.append(token)
    row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    for stop in row.stop:
        at = row.text.find(stop, max(0, row.sent - len(stop)))
        if at >= 0:
            row.text, row.finish_reason = row.text[:at], "stop"
            break
    if row.finish_reason is None and len(row.tokens) >= row.max_tokens:
        row.finish_reason = "length"
    if row.finish_reason is not None:
        row._flush(len(row.text))
        return
    # hold back what may still become a stop string, or an unfinished multi-byte character
    upto = len(row.text) - max((len(s) - 1 for s in row.stop), default=0)
    while upto > row.sent and row.text[upto - 1] == "\ufffd":
        upto -= 1
    row._flush(upto)


def eos_token_ids(model: AugmentedLM, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = model.decoder.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return input_ids.to(device), mask.to(device)


def generate_rows(model: AugmentedLM, tokenizer: PreTrainedTokenizerBase, rows: list[Row],
                  augment: bool | str = True, tokenizer_lock: threading.Lock | None = None, store: Any = None) -> None:
    """Continue every row in one `generate` call; each row's tokens, text and finish_reason are filled in.

    `augment` goes to `AugmentedLM.generate` unchanged; `tokenizer_lock` is held while the tokenizer decodes. With a
    `store` (`dca.serve.store.ContextStore`), augmented rows whose prompt starts with a stored document run one by
    one from its stored augmented cache (`generate(store=...)` takes one prompt); the others share one call.
    """
    if store is not None and augment is True and model.coprocessor is not None:
        stored = [row for row in rows if store.stored_prefix(model, torch.tensor(row.prompt_ids)) is not None]
        for row in stored:
            _generate_rows(model, tokenizer, [row], augment, tokenizer_lock, store)
        rows = [row for row in rows if all(row is not s for s in stored)]
    if rows:
        _generate_rows(model, tokenizer, rows, augment, tokenizer_lock, None)


def _generate_rows(model: AugmentedLM, tokenizer: PreTrainedTokenizerBase, rows: list[Row], augment: bool | str,
                   tokenizer_lock: threading.Lock | None, store: Any) -> None:
    input_ids, mask = left_pad([row.prompt_ids for row in rows], tokenizer.pad_token_id, model.device)
    eos = eos_token_ids(model, tokenizer)
    model.generate(input_ids, mask, augment=augment, store=store, max_new_tokens=max(row.max_tokens for row in rows),
                   do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=sorted(eos) or None, logits_processor=LogitsProcessorList([RowSampler(rows)]),
                   stopping_criteria=StoppingCriteriaList([RowStopping(rows, tokenizer, eos, tokenizer_lock)]))
    for row in rows:  # generate can end at max_new_tokens before a row's own criterion saw its last token
        if row.finish_reason is None:
            row.finish_reason = "length"
            row._flush(len(row.text))
