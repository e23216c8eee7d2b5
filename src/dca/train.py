"""`dca train`: train a coprocessor for a frozen model on plain text, the way the paper does.

The loop is ordinary -- AdamW, linear warm-up then cosine decay, gradient clipping and accumulation,
bf16 autocast where the device has it -- around the one-pass objective of `AugmentedLM`. What is
particular is resumability: the data order is a function of the step (`dca.data.BatchSchedule`)
and checkpoints hold the adapter, the optimiser, the scheduler and every RNG, written atomically,
so a run killed at any moment and started again ends with the weights of an uninterrupted run.

Run folder:  args.json · metrics.jsonl · checkpoint/ (latest, for resuming) · adapter/ (final)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dca.adapter import load_adapter
from dca.config import CoprocessorConfig, help_meta
from dca.data import BatchSchedule, sample_positions, split_texts, tokenize_and_pack
from dca.evaluate import token_losses_by_distance
from dca.model import AugmentedLM
from dca.resources import load_model, load_texts


@dataclass
class TrainArgs:
    """Arguments of `dca train` (and of `dca.train.train`)."""

    model: str = field(default="smollm2-135m", metadata=help_meta("builtin name, local folder or hub name"))
    data: str = field(default="wiki", metadata=help_meta("builtin corpus, local .txt/.jsonl file or folder, or a "
                                                     "datasets name"))
    out: str = field(default="runs/train", metadata=help_meta("run folder (resumed if it holds a checkpoint)"))
    coprocessor: CoprocessorConfig = field(default_factory=CoprocessorConfig)
    positions: int = field(default=16, metadata=help_meta("P, insertion points sampled per sequence"))
    seq_len: int = field(default=256, metadata=help_meta("tokens per packed training sequence"))
    batch_size: int = field(default=4, metadata=help_meta("sequences per micro-batch"))
    grad_accum: int = field(default=1, metadata=help_meta("micro-batches per optimiser step"))
    steps: int = field(default=200, metadata=help_meta("optimiser steps"))
    lr: float = field(default=1e-4, metadata=help_meta("peak learning rate"))
    warmup_steps: int = field(default=20, metadata=help_meta("linear warm-up steps"))
    min_lr_ratio: float = field(default=0.1, metadata=help_meta("final learning rate as a fraction of the peak"))
    weight_decay: float = field(default=0.0, metadata=help_meta("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=help_meta("gradient clipping norm"))
    held_out_fraction: float = field(default=0.05, metadata=help_meta("documents kept out of training"))
    max_docs: int | None = field(default=None, metadata=help_meta("use only the first documents of the corpus"))
    eval_every: int = field(default=50, metadata=help_meta("held-out evaluation every this many steps"))
    eval_sequences: int = field(default=64, metadata=help_meta("held-out sequences per evaluation (16 proved too few "
                                                                 "to trust)"))
    save_every: int = field(default=50, metadata=help_meta("checkpoint every this many steps"))
    seed: int = field(default=0, metadata=help_meta("seed for data order, positions and initialisation"))
    device: str = field(default="auto", metadata=help_meta("auto, cpu, cuda, cuda:1, ..."))
    bf16: bool | None = field(default=None, metadata=help_meta("bf16 autocast (default: where the device supports it)"))
    progress: bool = field(default=True, metadata=help_meta("show a progress bar"))

    def __post_init__(self) -> None:
        for name in ("positions", "seq_len", "batch_size", "grad_accum", "steps", "eval_every", "save_every",
                     "eval_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.lr <= 0:
            raise ValueError("need warmup_steps >= 0, 0 <= min_lr_ratio <= 1 and lr > 0")
        if self.positions > self.seq_len - 1:
            raise ValueError(f"positions ({self.positions}) must be below seq_len ({self.seq_len})")
        if isinstance(self.coprocessor, dict):  # from args.json
            self.coprocessor = CoprocessorConfig.from_dict(self.coprocessor)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_factor(step: int, args: TrainArgs) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < args.warmup_steps:
        return (step + 1) / (args.warmup_steps + 1)
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainingData:
    schedule: BatchSchedule
    eval_sequences: torch.Tensor
    eval_positions: torch.Tensor
    train_tokens: int


def prepare_data(args: TrainArgs, tokenizer) -> TrainingData:
    texts = load_texts(args.data, limit=args.max_docs)
    train_texts, held_out_texts = split_texts(texts, args.held_out_fraction)
    if not held_out_texts:
        raise ValueError(f"no held-out documents: {len(texts)} documents at held_out_fraction "
                         f"{args.held_out_fraction}")
    train_seqs = tokenize_and_pack(train_texts, tokenizer, args.seq_len)
    eval_seqs = tokenize_and_pack(held_out_texts, tokenizer, args.seq_len)[: args.eval_sequences]
    if len(eval_seqs) == 0:
        raise ValueError("the held-out documents do not fill one sequence: lower seq_len or raise held_out_fraction")
    eval_positions = sample_positions(len(eval_seqs), args.seq_len, args.positions,
                                      torch.Generator().manual_seed(12345))
    schedule = BatchSchedule(train_seqs, args.batch_size, args.positions, args.seed)
    return TrainingData(schedule, eval_seqs, eval_positions, train_seqs.numel())


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def evaluate(model: AugmentedLM, data: TrainingData, batch_size: int, bf16: bool) -> dict:
    aug, base, count = token_losses_by_distance(model, data.eval_sequences, data.eval_positions,
                                                model.coprocessor.config.num_ahead, batch_size,
                                                autocast_bf16=bf16)
    loss, base_loss = float(aug.sum() / count.sum()), float(base.sum() / count.sum())
    return {"eval_loss": loss, "eval_base_loss": base_loss, "eval_rel_ppl_change": math.exp(loss - base_loss) - 1}


# ---------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model: AugmentedLM, optimizer, scheduler, step: int) -> None:
    """Write checkpoint/ atomically: a complete new checkpoint or the previous one, never a mix."""
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=run_dir))
    try:
        model.save_pretrained(staging / "adapter")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state()}, staging / "trainer_state.pt")
        final, old = run_dir / "checkpoint", run_dir / ".checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_same_run(run_dir: Path, args: TrainArgs) -> None:
    saved = json.loads((run_dir / "args.json").read_text())
    # fields added to CoprocessorConfig since the run started take their defaults
    saved["coprocessor"] = CoprocessorConfig.from_dict(saved.get("coprocessor", {})).to_dict()
    ignore = {"steps", "eval_every", "save_every", "progress", "device"}
    changed = {k: (saved.get(k), v) for k, v in dataclasses.asdict(args).items()
               if k not in ignore and saved.get(k) != v}
    if changed:
        raise ValueError(f"{run_dir} holds a run with other arguments {changed} (saved, now): "
                         "use another --out, or the same arguments to resume")


# ---------------------------------------------------------------- the loop
def train(args: TrainArgs, callback: Callable[[int, dict], None] | None = None) -> Path:
    """Train (or resume) the run in `args.out`; returns the folder of the final adapter."""
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    resuming = (run_dir / "checkpoint" / "trainer_state.pt").is_file()
    if resuming:
        _check_same_run(run_dir, args)
    device = resolve_device(args.device)
    bf16 = args.bf16 if args.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    decoder, tokenizer = load_model(args.model, device=device)
    data = prepare_data(args, tokenizer)
    if resuming:
        model = load_adapter(run_dir / "checkpoint" / "adapter", decoder)
    else:
        model = AugmentedLM.from_decoder(decoder, args.coprocessor)
        (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args))
    start_step = 0
    if resuming:
        # on the CPU: RNG states must stay there; load_state_dict moves the optimiser's state to the parameters
        state = torch.load(run_dir / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_step = state["step"]

    log = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 -- kept open for the whole run
    trainable = sum(p.numel() for p in params)
    print(f"[dca train] {args.model} on {args.data}: {len(data.schedule.sequences)} train sequences of "
          f"{args.seq_len} tokens ({data.train_tokens:,} tokens), {len(data.eval_sequences)} held-out; "
          f"{trainable:,} trainable parameters; device {device}{' bf16' if bf16 else ''}"
          f"{f'; resuming at step {start_step}' if resuming else ''}", file=sys.stderr)
    if start_step == 0:
        _log(log, {"step": 0, **evaluate(model, data, args.batch_size, bf16)})
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not args.progress,
               desc="train", dynamic_ncols=True)
    for step in bar:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = base_sum = targets = 0.0
        for micro in range(args.grad_accum):
            input_ids, positions = data.schedule[step * args.grad_accum + micro]
            with autocast(device, bf16):
                out = model.training_loss(input_ids.to(device), positions.to(device), with_baseline=True)
            (out.loss / args.grad_accum).backward()
            loss_sum += float(out.token_losses.detach().sum())
            base_sum += float(out.baseline_token_losses.sum())
            targets += out.num_targets
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
        optimizer.step()
        scheduler.step()
        tokens = args.grad_accum * args.batch_size * args.seq_len
        record = {"step": step + 1, "loss": loss_sum / targets, "base_loss": base_sum / targets,
                  "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_s": tokens / (time.perf_counter() - started)}
        bar.set_postfix(loss=f"{record['loss']:.3f}", base=f"{record['base_loss']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record.update(evaluate(model, data, args.batch_size, bf16))
            bar.write(f"step {step + 1}: held-out loss {record['eval_loss']:.4f} vs base {record['eval_base_loss']:.4f}"
                      f" ({100 * record['eval_rel_ppl_change']:+.2f}% perplexity)")
        _log(log, record)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(run_dir, model, optimizer, scheduler, step + 1)
        if callback is not None:
            callback(step + 1, record)
    bar.close()
    log.close()
    return model.save_pretrained(run_dir / "adapter")


def _log(handle, record: dict) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()
