"""`dca train`: train a coprocessor for a frozen model on plain text, the way the paper does.

The loop is ordinary -- AdamW, linear warm-up then cosine decay, gradient clipping and accumulation,
bf16 autocast where the device has it -- around the one-pass objective of `AugmentedLM`. What is
particular is resumability: the data order is a function of the step (`dca.training.data.BatchSchedule`)
and checkpoints hold the adapter, the optimiser, the scheduler and every RNG (`dca.training.checkpoint`),
so a run killed at any moment and started again ends with the weights of an uninterrupted run --
and a rerun with other arguments, model or data is refused rather than mixed in. A step whose loss
or gradient is not finite is skipped; too many in a row stop the run, keeping the last good checkpoint.

Under ``torchrun`` K processes train as one process with K x ``--batch-size`` would, up to float reduction
order (`dca.training.distributed`); rank 0 alone writes the run folder, which any number of processes resumes.

Run folder:  args.json · run.json (identity) · metrics.jsonl · checkpoint/ (latest) · adapter/ (final)
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dca.adapter import decoder_fingerprint
from dca.atomic import recover, write_file
from dca.attention import GroupAttention
from dca.checks import (
    check_data_source,
    check_device,
    check_int,
    check_literal_fields,
    check_model_source,
    check_number,
    check_writable_dir,
)
from dca.config import CoprocessorConfig, Preset, drop_legacy, earliest_point, help_meta, legacy_meta
from dca.errors import ArgumentError, DataError, TrainingDiverged
from dca.eval.evaluate import token_losses_by_distance
from dca.model import AugmentedLM
from dca.resources import load_model, load_texts
from dca.training import distributed
from dca.training.checkpoint import (
    METRICS_FILE,
    check_run_identity,
    checkpoint_step,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    tensor_digest,
    trim_metrics,
)
from dca.training.data import BatchSchedule, sample_positions, split_texts, tokenize_and_pack
from dca.training.distributed import Processes

# what does not change the trained weights: a rerun may differ in these and still resume
# (the learning-rate schedule depends on `steps`, so it is part of a run; bf16 is recorded as resolved)
# (how groups attend and whether activations are recomputed change float rounding only: a run may switch them)
NOT_IDENTITY = ("out", "model", "data", "eval_every", "eval_sequences", "save_every", "device", "bf16", "progress",
                "max_bad_steps", "group_attention", "activation_checkpointing",
                "preset")  # the preset only names where `coprocessor` started; its fields are the identity


@dataclass
class TrainArgs:
    """Arguments of `dca train` (and of `dca.training.train.train`)."""

    model: str = field(default="smollm2-135m", metadata=help_meta("builtin name, local folder or hub name"))
    data: str = field(default="wiki", metadata=help_meta("builtin corpus, local .txt/.jsonl file or folder, or a "
                                                     "datasets name"))
    out: str = field(default="runs/train", metadata=help_meta("run folder (resumed if it holds a checkpoint)"))
    coprocessor: CoprocessorConfig = field(default_factory=CoprocessorConfig)
    preset: Preset = field(default="dca", metadata=help_meta(
        "where the coprocessor's fields start: paper (the paper's literal method, CoprocessorConfig.paper) or dca "
        "(dca's own default); the command line applies it and any coprocessor option given overrides it"))
    positions: int = field(default=16, metadata=help_meta("P, insertion points sampled per sequence"))
    max_delay: int = field(default=0, metadata=legacy_meta(0) | help_meta(
        "delay-robust training: each group's latents, computed from x[0..t], are inserted after x[t+d], d drawn "
        "from 0..max_delay (what asynchronous augmentation does at inference); 0: no delay"))
    min_position: int | None = field(default=None, metadata=legacy_meta(None) | help_meta(
        "earliest insertion point t sampled (default: the layout's first_position, N-1 under 'overwrite', where "
        "every latent replaces a real token; earlier points read only the last t+1 latents; else 0)"))
    seq_len: int = field(default=256, metadata=help_meta("tokens per packed training sequence"))
    batch_size: int = field(default=4, metadata=help_meta("sequences per micro-batch and process (under torchrun "
                                                          "the global batch is this x the processes)"))
    grad_accum: int = field(default=1, metadata=help_meta("micro-batches per optimiser step"))
    steps: int = field(default=200, metadata=help_meta("optimiser steps"))
    lr: float = field(default=1e-4, metadata=help_meta("peak learning rate"))
    warmup_steps: int = field(default=20, metadata=help_meta("linear warm-up steps"))
    min_lr_ratio: float = field(default=0.1, metadata=help_meta("final learning rate as a fraction of the peak"))
    weight_decay: float = field(default=0.0, metadata=help_meta("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=help_meta("gradient clipping norm (> 0)"))
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
    group_attention: GroupAttention = field(default="auto", metadata=help_meta(
        "how the P groups attend: grouped (linear in P), flex (flex attention, CUDA), the dense reference mask, or "
        "auto (flex on CUDA, else grouped)"))
    activation_checkpointing: bool = field(default=False, metadata=help_meta(
        "keep only each layer's input in the group passes and recompute the rest in backward (less memory)"))
    max_bad_steps: int = field(default=5, metadata=help_meta("stop after this many consecutive steps whose loss or "
                                                              "gradient is not finite (each is skipped)"))

    def __post_init__(self) -> None:
        """Every value is checked here, before anything is loaded (`ArgumentError` names the argument)."""
        for name in ("positions", "batch_size", "grad_accum", "steps", "eval_every", "save_every", "eval_sequences",
                     "max_bad_steps"):
            check_int(name, getattr(self, name))
        check_int("seq_len", self.seq_len, minimum=2)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("max_delay", self.max_delay, minimum=0)
        if self.min_position is not None:
            check_int("min_position", self.min_position, minimum=0)
            if self.min_position > self.seq_len - 2:
                raise ArgumentError("min_position", f"({self.min_position}) must be below seq_len - 1 "
                                    f"({self.seq_len - 1}): a point needs a token after it")
        check_int("seed", self.seed, minimum=0)
        if self.max_docs is not None:
            check_int("max_docs", self.max_docs)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        check_number("held_out_fraction", self.held_out_fraction, low=0, high=1, low_open=True)
        if self.held_out_fraction == 1:
            raise ArgumentError("held_out_fraction", "must be below 1: nothing would be left to train on")
        if self.positions > self.seq_len - 1:
            raise ArgumentError("positions", f"({self.positions}) must be below seq_len ({self.seq_len})")
        if self.max_delay > self.seq_len - 2:
            raise ArgumentError("max_delay", f"({self.max_delay}) must be below seq_len - 1 ({self.seq_len - 1})")
        check_device("device", self.device)
        check_literal_fields(self)
        if isinstance(self.coprocessor, dict):  # from args.json
            self.coprocessor = CoprocessorConfig.from_dict(self.coprocessor)
        first = self.first_position()
        if self.coprocessor.appended_first and first < self.coprocessor.first_position:
            raise ArgumentError("min_position", f"({first}) must be at least R = {self.coprocessor.replaced_entries} "
                                "with appended_at='window': earlier, the appended latents read only each other, "
                                "zeros at the start, and the gradient overflows")
        if self.positions > self.seq_len - 1 - first:
            raise ArgumentError("positions", f"({self.positions}) must be at most seq_len - 1 - {first} = "
                                f"{self.seq_len - 1 - first}: points are sampled from t >= {first}")

    def first_position(self) -> int:
        """The earliest insertion point sampled: `min_position`, or the layout's (N-1 under "overwrite", else 0)."""
        return earliest_point(self.min_position, [self.coprocessor])

    def check_sources(self) -> None:
        """The model, the data and the run folder exist and can be used (cheap: nothing is loaded)."""
        check_model_source("model", self.model)
        check_data_source("data", self.data)
        check_writable_dir("out", self.out)

    def identity(self, world_size: int = 1) -> dict:
        """The arguments that shape the trained weights (model and data count by content, in `train`).

        The batch size is the global one, so K processes x batch B resume as one process x batch K*B.
        """
        identity = {k: v for k, v in drop_legacy(self, dataclasses.asdict(self)).items() if k not in NOT_IDENTITY}
        identity["coprocessor"] = self.coprocessor.to_dict()  # which leaves out its own legacy fields
        return {**identity, "batch_size": self.batch_size * world_size}


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


def prepare_data(args: TrainArgs, tokenizer, world_size: int = 1) -> TrainingData:
    texts = load_texts(args.data, limit=args.max_docs)
    train_texts, held_out_texts = split_texts(texts, args.held_out_fraction)
    if not held_out_texts:
        raise DataError(f"no held-out documents: {len(texts)} documents at held_out_fraction "
                        f"{args.held_out_fraction}")
    train_seqs = tokenize_and_pack(train_texts, tokenizer, args.seq_len)
    eval_seqs = tokenize_and_pack(held_out_texts, tokenizer, args.seq_len)[: args.eval_sequences]
    if len(eval_seqs) == 0:
        raise DataError("the held-out documents do not fill one sequence: lower seq_len or raise held_out_fraction")
    eval_positions = sample_positions(len(eval_seqs), args.seq_len, args.positions,
                                      torch.Generator().manual_seed(12345), args.first_position())
    # the global batch: every process takes its rows of it (`Processes.rows`)
    schedule = BatchSchedule(train_seqs, args.batch_size * world_size, args.positions, args.seed, args.max_delay,
                             args.first_position())
    return TrainingData(schedule, eval_seqs, eval_positions, train_seqs.numel())


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def evaluate(model: AugmentedLM, data: TrainingData, batch_size: int, bf16: bool) -> dict:
    aug, base, count = token_losses_by_distance(model, data.eval_sequences, data.eval_positions,
                                                model.coprocessor.config.num_ahead, batch_size,
                                                autocast_bf16=bf16)
    loss, base_loss = float(aug.sum() / count.sum()), float(base.sum() / count.sum())
    return {"eval_loss": loss, "eval_base_loss": base_loss, "eval_rel_ppl_change": math.exp(loss - base_loss) - 1}


# ---------------------------------------------------------------- the loop
def train(args: TrainArgs, callback: Callable[[int, dict], None] | None = None) -> Path:
    """Train (or resume) the run in `args.out`; returns the folder of the final adapter.

    Under torchrun every process calls this (and `callback`, with the same record); rank 0 alone writes the
    run folder, which every machine of a multi-node run must see (a shared file system).

    Raises:
        ArgumentError: a bad argument, or a run folder holding another run (before any training).
        TrainingDiverged: `max_bad_steps` consecutive non-finite steps; the last good checkpoint is kept.
    """
    args.check_sources()
    procs, device = distributed.setup(args.device)  # torchrun's environment and the device, before any loading
    try:
        adapter = _train(args, procs, device, callback)
        procs.barrier()  # the group ends when every process is done with it
        return adapter
    finally:
        procs.close()


def _open_run(args: TrainArgs, run_dir: Path, world_size: int) -> int | None:
    """The step of the run's checkpoint, once the arguments are known to be the run's (rank 0: it writes)."""
    done = checkpoint_step(run_dir)  # also finishes a checkpoint save that a kill interrupted
    if done is not None and args.steps < done:
        raise ArgumentError("steps", f"is {args.steps}, but the run in {run_dir} has already done {done} steps: "
                                     f"pass --steps {done} or more to finish it, or use another --out")
    check_run_identity(run_dir, args.identity(world_size))  # arguments first: refused before anything is loaded
    recover(run_dir / "adapter")
    return done


def _train(args: TrainArgs, procs: Processes, device: torch.device, callback) -> Path:
    run_dir = Path(args.out)
    done = procs.on_main(lambda: _open_run(args, run_dir, procs.world_size))
    bf16 = args.bf16 if args.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    decoder, tokenizer = load_model(args.model, device=device)
    data = prepare_data(args, tokenizer, procs.world_size)

    def record_run() -> None:  # rank 0
        check_run_identity(run_dir, {"decoder_fingerprint": decoder_fingerprint(decoder), "bf16": bf16,
                                     "train_tokens_sha256": tensor_digest(data.schedule.sequences)})
        write_file(run_dir / "args.json", json.dumps(dataclasses.asdict(args), indent=2).encode())

    procs.on_main(record_run)
    if done is not None:
        model, state = load_checkpoint(run_dir, decoder)
    else:
        model, state = AugmentedLM.from_decoder(decoder, args.coprocessor), None
    model.group_attention, model.activation_checkpointing = args.group_attention, args.activation_checkpointing
    model.train()
    procs.wrap(model)  # DDP or FSDP2 under torchrun; the optimiser then holds what they train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args))
    start_step = 0
    if state is not None:
        procs.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["step"]
    # no step twice, no half-written line
    step_0_logged = procs.on_main(lambda: any(r["step"] == 0 for r in trim_metrics(run_dir / METRICS_FILE,
                                                                                    start_step)))

    log = open(run_dir / METRICS_FILE, "a") if procs.is_main else None  # noqa: SIM115 -- open for the whole run
    trainable = sum(p.numel() for p in params)  # a sharded parameter counts whole
    if procs.is_main:
        print(f"[dca train] {args.model} on {args.data}: {len(data.schedule.sequences)} train sequences of "
              f"{args.seq_len} tokens ({data.train_tokens:,} tokens), {len(data.eval_sequences)} held-out; "
              f"{trainable:,} trainable parameters; device {device}{' bf16' if bf16 else ''}{procs.describe()}"
              f"{f'; resuming at step {start_step}' if start_step else ''}", file=sys.stderr)
    if not step_0_logged:
        _log(log, {"step": 0, **_evaluate(procs, data, args.batch_size, bf16)})
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps,
               disable=not (args.progress and procs.is_main), desc="train", dynamic_ncols=True)
    bad_steps, last_saved = 0, start_step
    for step in bar:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = base_sum = targets = 0.0
        for micro in range(args.grad_accum):
            input_ids, positions, delays = data.schedule[step * args.grad_accum + micro]
            input_ids, positions = procs.rows(input_ids), procs.rows(positions)
            delays = None if delays is None else procs.rows(delays).to(device)
            with procs.gradient_sync(micro == args.grad_accum - 1):
                with autocast(device, bf16):
                    out = procs.run(AugmentedLM.training_loss, input_ids.to(device), positions.to(device),
                                    with_baseline=True, delays=delays)
                (procs.loss(out) / args.grad_accum).backward()
            loss_sum += float(out.token_losses.detach().sum())
            base_sum += float(out.baseline_token_losses.sum())
            targets += out.num_targets
        loss_sum, base_sum, targets = procs.sum(loss_sum, base_sum, targets)  # every rank logs the same numbers
        grad_norm = procs.clip_grad_norm(params, args.max_grad_norm)
        finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            bad_steps = 0
            if not procs.all_finite(params):
                raise TrainingDiverged(f"step {step + 1}: the optimiser step made the weights non-finite (learning "
                                       f"rate {scheduler.get_last_lr()[0]:.3g}); the checkpoint of step {last_saved} "
                                       "is kept: lower --lr and start a new --out")
        else:
            bad_steps += 1
            if procs.is_main:
                bar.write(f"step {step + 1}: {'loss' if not math.isfinite(loss_sum) else 'gradient norm'} is not "
                          f"finite; optimiser step skipped ({bad_steps} in a row, at most {args.max_bad_steps})",
                          file=sys.stderr)
        scheduler.step()  # a skipped step still uses up its batch and its place in the schedule
        tokens = args.grad_accum * args.batch_size * procs.world_size * args.seq_len
        record = {"step": step + 1, "loss": loss_sum / targets, "base_loss": base_sum / targets,
                  "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_s": tokens / (time.perf_counter() - started), **({} if finite else {"skipped": True})}
        if bad_steps >= args.max_bad_steps:
            _log(log, record)
            raise TrainingDiverged(
                f"step {step + 1}: {bad_steps} optimiser steps in a row had a non-finite loss or gradient, so training "
                f"stopped; the checkpoint of step {last_saved} is kept. Likely cause: a learning rate too high "
                f"({args.lr:g}) or bf16 overflow; lower --lr (or pass --no-bf16) and start a new --out")
        bar.set_postfix(loss=f"{record['loss']:.3f}", base=f"{record['base_loss']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record.update(_evaluate(procs, data, args.batch_size, bf16))
            if procs.is_main:
                bar.write(f"step {step + 1}: held-out loss {record['eval_loss']:.4f} vs base "
                          f"{record['eval_base_loss']:.4f} ({100 * record['eval_rel_ppl_change']:+.2f}% perplexity)")
        _log(log, record)
        if ((step + 1) % args.save_every == 0 or step + 1 == args.steps) and finite:  # none within a bad streak
            procs.save(lambda state, step=step: save_checkpoint(run_dir, model, optimizer, scheduler, step + 1,
                                                                optimizer_state=state), optimizer)
            last_saved = step + 1
        if callback is not None:
            callback(step + 1, record)
    bar.close()
    if log is not None:
        log.close()
    return procs.save(lambda _: model.save_pretrained(run_dir / "adapter"))


def _evaluate(procs: Processes, data: TrainingData, batch_size: int, bf16: bool) -> dict:
    """`evaluate` on every rank, through the wrapper (FSDP2 gathers each layer as it runs); no gradients."""
    with torch.no_grad():
        return procs.run(evaluate, data, batch_size, bf16)


def _log(handle, record: dict) -> None:
    """One JSON line (rank 0 only: the others have no handle); non-finite numbers are written as null."""
    if handle is None:
        return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    handle.write(json.dumps(clean, allow_nan=False) + "\n")
    handle.flush()
