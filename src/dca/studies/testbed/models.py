"""The testbed's decoder, its training loops (pretraining, coprocessor / pause tokens, LoRA) and its scoring.

All loops share one recipe: AdamW, linear warmup then cosine decay, batches drawn by a generator
seeded per (seed, phase), so every variant of a seed sees the same batches in the same order.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from dca.config import CoprocessorConfig
from dca.model import AugmentedLM
from dca.studies.testbed.tasks import Example
from dca.studies.testbed.tokenizer import Tokenizer


@dataclass(frozen=True)
class Recipe:
    """How every phase trains: optimiser settings and batch size (one for all variants)."""

    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 20


def build_decoder(vocab_size: int, seed: int, layers: int = 2, hidden: int = 64) -> LlamaForCausalLM:
    """A small Llama built from a config (no download); `seed` fixes its initial weights."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None  # answers have a fixed length: never stop early
    model.generation_config.pad_token_id = 0
    return model


def encode(tokenizer: Tokenizer, examples: list[Example], worked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] ids of <bos> prompt target, right-padded; [B, T] bool: which tokens carry the loss)."""
    targets = [e.worked if worked else e.answer for e in examples]
    ids = tokenizer.batch([e.prompt + t for e, t in zip(examples, targets, strict=True)])
    start = len(tokenizer.encode(examples[0].prompt, bos=True))  # prompts all have one length
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[:, start:] = ids[:, start:] != tokenizer.pad_id
    return ids, scored


def batches(num_items: int, steps: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` index batches, a pure function of the seed (the same for every variant)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, num_items, (batch_size,), generator=generator)


def fit(params: list[torch.nn.Parameter], loss_fn: Callable[[torch.Tensor], torch.Tensor], num_items: int,
        steps: int, recipe: Recipe, seed: int, desc: str) -> dict:
    """Run the recipe for `steps` steps on `loss_fn(batch indices)`; returns losses and seconds."""
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    warmup = min(recipe.warmup, max(1, steps // 5))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses, started = [], time.perf_counter()
    bar = tqdm(batches(num_items, steps, recipe.batch_size, seed), total=steps, desc=desc, leave=False)
    for index in bar:
        loss = loss_fn(index)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss at step {len(losses)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return {"seconds": time.perf_counter() - started, "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None, "steps": steps}


def lm_loss(model: PreTrainedModel, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the scored tokens only."""
    logits = model(input_ids=ids[:, :-1]).logits
    return F.cross_entropy(logits[scored[:, 1:]], ids[:, 1:][scored[:, 1:]])


def train_decoder(model: PreTrainedModel, ids: torch.Tensor, scored: torch.Tensor, steps: int, recipe: Recipe,
                  seed: int, desc: str) -> dict:
    """Train every trainable weight of `model` on its scored tokens (pretraining, LoRA, scratchpad)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    stats = fit(params, lambda i: lm_loss(model, ids[i], scored[i]), len(ids), steps, recipe, seed, desc)
    model.eval()
    return stats


def train_augmented(model: AugmentedLM, ids: torch.Tensor, prompt_len: int, steps: int, recipe: Recipe,
                    seed: int, desc: str) -> dict:
    """Train a coprocessor (or pause tokens) with `training_loss` at the end of the question."""
    model.train()
    params = [p for p in model.coprocessor.parameters() if p.requires_grad]
    at_end = torch.full((recipe.batch_size, 1), prompt_len - 1)  # the last question token, <bos> counted

    def loss_fn(index: torch.Tensor) -> torch.Tensor:
        return model.training_loss(ids[index], at_end[: len(index)]).loss

    stats = fit(params, loss_fn, len(ids), steps, recipe, seed, desc)
    model.eval()
    return stats


def lora_decoder(decoder: PreTrainedModel, target_params: int) -> tuple[PreTrainedModel, int]:
    """A copy of `decoder` with a LoRA on every linear layer, of the rank closest to `target_params`."""
    from peft import LoraConfig, get_peft_model

    def build(rank: int) -> PreTrainedModel:
        return get_peft_model(copy.deepcopy(decoder), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                 target_modules="all-linear", lora_dropout=0.0))

    per_rank = trainable_count(build(1))
    rank = max(1, min(decoder.config.hidden_size, round(target_params / per_rank)))
    return build(rank), rank


def trainable_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def answers(generate: Callable[..., torch.Tensor], tokenizer: Tokenizer, examples: list[Example],
            worked: bool, chunk: int = 256) -> list[str]:
    """Greedy completions of every prompt: the answer (after the worked steps, for a scratchpad)."""
    length = max(len(tokenizer.encode(e.worked if worked else e.answer)) for e in examples)
    out = []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        ids = tokenizer.batch([e.prompt for e in part])
        new = generate(ids, max_new_tokens=length, do_sample=False, pad_token_id=tokenizer.pad_id)[:, ids.shape[1]:]
        for row, example in zip(new, part, strict=True):
            text = tokenizer.decode(row)
            if worked:
                text = text.split(">", 1)[1] if ">" in text else ""
            out.append(text[:len(example.answer)])
    return out


def score(generate: Callable[..., torch.Tensor], tokenizer: Tokenizer, examples: list[Example],
          worked: bool = False, latency_items: int = 8) -> dict:
    """Exact-match accuracy (overall and by difficulty) and the latency of answering one question."""
    started = time.perf_counter()
    predicted = answers(generate, tokenizer, examples, worked)
    batch_seconds = time.perf_counter() - started
    correct = [p == e.answer for p, e in zip(predicted, examples, strict=True)]
    by: dict[int, list[bool]] = {}
    for ok, example in zip(correct, examples, strict=True):
        by.setdefault(example.difficulty, []).append(ok)
    single = []
    for example in examples[:latency_items]:
        started = time.perf_counter()
        answers(generate, tokenizer, [example], worked)
        single.append(time.perf_counter() - started)
    single.sort()
    return {"accuracy": sum(correct) / len(correct),
            "by_difficulty": {str(k): sum(v) / len(v) for k, v in sorted(by.items())},
            "latency_ms": 1000 * single[len(single) // 2],
            "batched_ms_per_question": 1000 * batch_seconds / len(correct),
            "examples": [{"prompt": e.prompt, "answer": e.answer, "predicted": p}
                         for e, p in list(zip(examples, predicted, strict=True))[:3]]}


def coprocessor_config(kind: str, num_latents: int, num_ahead: int) -> tuple[CoprocessorConfig, str]:
    """(config, how it was made) for ``dca`` (dca's default), ``paper`` (the preset) or ``pause``."""
    if kind == "pause":
        return CoprocessorConfig(method="pause", num_latents=num_latents, num_ahead=num_ahead), "method='pause'"
    if kind == "dca":  # "overwrite": a question shorter than N keeps one latent per token, the last ones
        return CoprocessorConfig.dca(num_latents=num_latents, num_ahead=num_ahead), "CoprocessorConfig.dca()"
    return CoprocessorConfig.paper(num_latents=num_latents, num_ahead=num_ahead), "CoprocessorConfig.paper()"
