"""Token-level scoring with and without cache augmentation: log-likelihoods and greedy generation.

Everything here calls the coprocessor exactly as the paper's benchmarks do: once, at the end of the
context (the prompt), after which the unchanged decoder scores or generates the continuation.

`loglikelihood_ids` runs each distinct context once (plain, or augmented with N latents) and then
scores every continuation of that context from its own copy of the resulting cache: a forward pass
extends a cache in place, so two choices must never share one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from dca.cache import fork_cache
from dca.masks import prefix_position_ids
from dca.model import AugmentedLM

Pair = tuple[Sequence[int], Sequence[int]]  # (context token ids, continuation token ids)


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """What an empty context becomes (lm-evaluation-harness: BOS if the tokenizer has one, else EOS)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return int(token)


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids the way lm-evaluation-harness splits them.

    Trailing whitespace of the context moves to the continuation; then context+continuation is
    encoded whole and the continuation is whatever follows the context's own encoding. So the
    continuation tokens are exactly those a model reading the full text would see, and the latents
    go right after the context's last token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        cont = tokenizer(continuation, add_special_tokens=False).input_ids
        prefix = prefix_token_id(tokenizer)
        return (cont[:1], cont[1:]) if cont[:1] == [prefix] else ([prefix], cont)
    whole = tokenizer(context + continuation).input_ids
    ctx = tokenizer(context).input_ids
    return list(ctx), list(whole[len(ctx):])


def _left_pad(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _run_contexts(model: AugmentedLM, contexts: Sequence[Sequence[int]], augment: bool):
    """Cache, next-token logits [B, V], cache mask [B, L(+N)] and the next position id [B, 1] after each
    context (left-padded)."""
    ids, mask = _left_pad(contexts, model.device)
    if augment:
        out = model.augment(ids, mask)
        return out.past_key_values, out.logits, out.attention_mask, out.next_position_ids
    cache = DynamicCache()  # full-length layers, like `augment` builds: rows can be indexed freely
    out = model.decoder(input_ids=ids, attention_mask=mask, position_ids=prefix_position_ids(mask),
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1], mask, mask.sum(1, keepdim=True)


@torch.no_grad()
def _score_continuations(model: AugmentedLM, cache: DynamicCache, first_logits: torch.Tensor, past_mask: torch.Tensor,
                         next_pos: torch.Tensor, rows: torch.Tensor,
                         continuations: Sequence[Sequence[int]]) -> list[tuple[float, bool]]:
    """Sum of log-probabilities (and whether each token is the argmax) of continuations after cache rows."""
    device = model.device
    width = max(len(c) for c in continuations)
    targets = torch.zeros(len(continuations), width, dtype=torch.long)
    valid = torch.zeros_like(targets, dtype=torch.bool)
    for i, cont in enumerate(continuations):
        targets[i, : len(cont)], valid[i, : len(cont)] = torch.tensor(cont, dtype=torch.long), True
    targets, valid = targets.to(device), valid.to(device)
    logits = first_logits[rows][:, None]  # the context's last position (or last latent) predicts token 0
    if width > 1:
        forked = fork_cache(cache)
        forked.reorder_cache(rows)  # new tensors per row: this copy is extended, never `cache` itself
        past_mask = past_mask[rows]
        # real continuation tokens follow the context directly (after latents that may take no position);
        # padding trails them
        position_ids = next_pos[rows] + torch.arange(width - 1, device=device)
        out = model.decoder(input_ids=targets[:, :-1], attention_mask=torch.cat([past_mask, valid[:, :-1].long()], 1),
                            position_ids=position_ids, past_key_values=forked, use_cache=True)
        logits = torch.cat([logits, out.logits], dim=1)
    results = []
    for row, cont in enumerate(continuations):  # one row at a time: float32 [W, vocab], not [R, W, vocab]
        logprobs = F.log_softmax(logits[row, : len(cont)].float(), dim=-1)
        target = targets[row, : len(cont)]
        results.append((float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())))
    return results


def loglikelihood_ids(model: AugmentedLM, requests: Sequence[Pair], *, augment: bool,
                      batch_size: int = 8, progress: str | None = None) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) for each (context ids, continuation ids) request.

    With `augment`, the coprocessor runs once at the end of each distinct context and the
    continuation is scored from the augmented cache (its first token with `augment`'s logits).
    `batch_size` bounds both the contexts per prefix pass and the continuations per scoring pass;
    `progress`, if given, labels a progress bar over the context batches.
    """
    if augment and model.coprocessor is None:
        raise ValueError("augment=True needs a coprocessor; this AugmentedLM is a plain base model")
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError(f"request {i} has an empty context or continuation ({len(ctx)}, {len(cont)} tokens): "
                             "a continuation can vanish when the tokenizer merges it into the context")
        by_context.setdefault(tuple(int(t) for t in ctx), []).append(i)
    keys = sorted(by_context, key=len, reverse=True)  # similar lengths share a batch: less padding
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in tqdm(range(0, len(keys), batch_size), desc=progress, disable=progress is None, leave=False):
        chunk = keys[start: start + batch_size]
        cache, first_logits, mask, next_pos = _run_contexts(model, chunk, augment)
        jobs = [(row, i) for row, key in enumerate(chunk) for i in by_context[key]]
        for j in range(0, len(jobs), batch_size):
            part = jobs[j: j + batch_size]
            rows = torch.tensor([row for row, _ in part], device=model.device)
            scores = _score_continuations(model, cache, first_logits, mask, next_pos, rows,
                                          [requests[i][1] for _, i in part])
            for (_, i), score in zip(part, scores, strict=True):
                results[i] = score
    return results


class _StopOnStrings(StoppingCriteria):
    """Stops a row once its generated text (never the prompt or latent placeholders) holds a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]):
        self.tokenizer, self.stops, self.start = tokenizer, list(stops), None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.start is None:  # first call: exactly one new token so far
            self.start = input_ids.shape[1] - 1
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def truncate_at(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def generate_texts(model: AugmentedLM, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]], *,
                   augment: bool, max_new_tokens: int, stop: Sequence[str] = (), batch_size: int = 8,
                   progress: str | None = None, **generate_kwargs) -> list[str]:
    """Decoded continuations of prompt ids (greedy unless told otherwise), cut at the first stop string.

    Batches are left-padded; with `augment` the coprocessor runs once at each prompt's end
    (`AugmentedLM.generate`). Rows are sorted by length so batches pad little.
    """
    if augment and model.coprocessor is None:
        raise ValueError("augment=True needs a coprocessor; this AugmentedLM is a plain base model")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generate_kwargs = {"do_sample": False, "pad_token_id": pad, **generate_kwargs}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    texts: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, leave=False):
        part = order[start: start + batch_size]
        ids, mask = _left_pad([prompts[i] for i in part], model.device)
        criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop)]) if stop else None
        out = model.generate(ids, mask, augment=augment, max_new_tokens=max_new_tokens,
                             stopping_criteria=criteria, **generate_kwargs)
        for i, text in zip(part, tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True), strict=True):
            texts[i] = truncate_at(text, stop)
    return texts
