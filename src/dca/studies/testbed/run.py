"""`dca testbed`: run every variant of the design (see the package docstring) and write the report."""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from dca.atomic import write_file
from dca.checks import check_choice, check_int, check_number, check_writable_dir
from dca.config import help_meta
from dca.errors import ArgumentError
from dca.model import AugmentedLM
from dca.studies.testbed import models
from dca.studies.testbed.report import SWEEP, markdown, plot, summarise
from dca.studies.testbed.tasks import TASKS, Example, make_splits, units
from dca.studies.testbed.tokenizer import Tokenizer

AUGMENTED = (("pause", 16),) + tuple((kind, n) for kind in ("dca", "paper") for n in SWEEP)
VARIANTS = ("frozen", *(f"{kind}-{n}" for kind, n in AUGMENTED), "lora", "scratchpad")
# --quick: a smoke run of the same design at a fraction of the size (its numbers are not the result)
QUICK = {"seeds": 2, "pretrain_steps": 300, "steps": 60, "train_size": 4000, "test_size": 200}


@dataclass
class TestbedArgs:
    """Arguments of `dca testbed`."""

    __test__ = False  # not a pytest class

    tasks: list[str] = field(default_factory=lambda: ["chase"], metadata=help_meta(
        f"tasks to run, of {tuple(TASKS)}"))
    seeds: int = field(default=3, metadata=help_meta("seeds (data, decoder and training order) per task"))
    pretrain_steps: int = field(default=2000, metadata=help_meta("steps that pretrain the decoder before freezing"))
    steps: int = field(default=300, metadata=help_meta("the training budget of every variant (steps)"))
    train_size: int = field(default=20000, metadata=help_meta("training questions per task and seed"))
    test_size: int = field(default=500, metadata=help_meta("held-out questions per task and seed"))
    batch_size: int = field(default=64, metadata=help_meta("questions per step, every phase"))
    lr: float = field(default=3e-3, metadata=help_meta("AdamW learning rate, every phase"))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata=help_meta(
        "variants to train (the frozen decoder is always scored)"))
    quick: bool = field(default=False, metadata=help_meta(
        f"a smoke run at a fraction of the size ({QUICK}; replaces those options)"))
    out: str = field(default="results/testbed", metadata=help_meta("report folder"))
    threads: int = field(default=1, metadata=help_meta("torch CPU threads"))
    latency_questions: int = field(default=8, metadata=help_meta("questions answered one at a time for the latency"))

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, list) or not self.tasks:
            raise ArgumentError("tasks", f"must be a non-empty list, got {self.tasks!r}")
        for task in self.tasks:
            check_choice("tasks", task, tuple(TASKS))
        if len(set(self.tasks)) != len(self.tasks):
            raise ArgumentError("tasks", f"has repeats: {self.tasks}")
        for name in ("seeds", "pretrain_steps", "steps", "train_size", "test_size", "batch_size", "threads",
                     "latency_questions"):
            check_int(name, getattr(self, name))
        check_number("lr", self.lr, low=0, low_open=True, high=1.0)
        if not isinstance(self.variants, list) or not self.variants:
            raise ArgumentError("variants", f"must be a non-empty list, got {self.variants!r}")
        for variant in self.variants:
            check_choice("variants", variant, VARIANTS)
        self.variants = [v for v in VARIANTS if v in self.variants or v == "frozen"]  # the report's order
        if self.quick:
            for name, value in QUICK.items():
                setattr(self, name, value)

    def command(self) -> str:
        """The command line that reproduces this run."""
        if self.quick:
            return f"OMP_NUM_THREADS=1 dca testbed --quick --tasks {' '.join(self.tasks)} --out {self.out}"
        parts = ["OMP_NUM_THREADS=1 dca testbed", "--tasks", *self.tasks]
        for f in dataclasses.fields(self):
            if f.name == "variants" and self.variants != list(VARIANTS):
                parts += ["--variants", *self.variants]
            elif f.name not in ("tasks", "quick", "variants"):
                parts += [f"--{f.name.replace('_', '-')}", str(getattr(self, f.name))]
        return " ".join(parts)


def run_seed(args: TestbedArgs, task: str, seed: int) -> dict:
    """Pretrain and freeze a decoder, then train and score every variant at the same budget."""
    train, test = make_splits(task, seed, args.train_size, args.test_size)
    tokenizer = Tokenizer(units(task))
    recipe = models.Recipe(batch_size=args.batch_size, lr=args.lr)
    ids, scored = models.encode(tokenizer, train, worked=False)
    prompt_len = len(tokenizer.encode(train[0].prompt, bos=True))
    num_ahead = len(tokenizer.encode(train[0].answer))
    tag = f"{task} seed {seed}"

    decoder = models.build_decoder(len(tokenizer), seed)
    pre = models.train_decoder(decoder, ids, scored, args.pretrain_steps, recipe, 1000 + seed, f"{tag}: pretrain")
    decoder.requires_grad_(False)
    probe = train[: args.test_size]
    pre["train_accuracy"] = models.score(decoder.generate, tokenizer, probe, latency_items=1)["accuracy"]
    frozen = models.score(decoder.generate, tokenizer, test, latency_items=args.latency_questions)
    pre["test_accuracy"] = frozen["accuracy"]
    variants = {"frozen": {**frozen, "trainable_params": 0, "train_seconds": 0.0}}
    print(f"  {tag}: pretrained decoder, train {100 * pre['train_accuracy']:.1f} %, "
          f"test {100 * frozen['accuracy']:.1f} % ({pre['seconds']:.0f} s)", flush=True)

    configs = {}
    budget_seed = 2000 + seed  # every variant of this seed sees these batches, in this order
    for kind, n in AUGMENTED:
        config, made = models.coprocessor_config(kind, n, num_ahead)
        config = dataclasses.replace(config, init_seed=seed)
        name = f"{kind}-{n}"
        configs[name] = {"config": config.to_dict(), "made_by": made}
        if name not in args.variants:
            continue
        model = AugmentedLM.from_decoder(decoder, config)
        params = models.trainable_count(model.coprocessor)
        stats = models.train_augmented(model, ids, prompt_len, args.steps, recipe, budget_seed, f"{tag}: {name}")
        variants[name] = {**models.score(model.generate, tokenizer, test, latency_items=args.latency_questions),
                          "trainable_params": params, "train_seconds": stats["seconds"], "training": stats}
        print(f"  {tag}: {name:9s} {100 * variants[name]['accuracy']:5.1f} % ({stats['seconds']:.0f} s)", flush=True)

    if "lora" in args.variants:
        run_lora(args, decoder, tokenizer, ids, scored, test, recipe, budget_seed, tag, variants)
    if "scratchpad" in args.variants:
        run_scratchpad(args, decoder, tokenizer, train, test, recipe, budget_seed, tag, variants)
    return {"task": task, "seed": seed, "pretrained": pre, "variants": variants, "configs": configs,
            "prompt_tokens": prompt_len, "answer_tokens": num_ahead}


def run_lora(args: TestbedArgs, decoder: PreTrainedModel, tokenizer: Tokenizer, ids: torch.Tensor,
             scored: torch.Tensor, test: list[Example], recipe: models.Recipe, budget_seed: int, tag: str,
             variants: dict) -> None:
    """A LoRA on the decoder itself, about as many parameters as the N = 16 coprocessor of dca's config."""
    config, _ = models.coprocessor_config("dca", 16, 1)
    target = models.trainable_count(AugmentedLM.from_decoder(decoder, config).coprocessor)
    lora, rank = models.lora_decoder(decoder, target)
    stats = models.train_decoder(lora, ids, scored, args.steps, recipe, budget_seed, f"{tag}: lora")
    variants["lora"] = {**models.score(lora.generate, tokenizer, test, latency_items=args.latency_questions),
                        "trainable_params": models.trainable_count(lora), "train_seconds": stats["seconds"],
                        "training": stats, "rank": rank}
    print(f"  {tag}: lora r{rank:<4d} {100 * variants['lora']['accuracy']:5.1f} %", flush=True)


def run_scratchpad(args: TestbedArgs, decoder: PreTrainedModel, tokenizer: Tokenizer, train: list[Example],
                   test: list[Example], recipe: models.Recipe, budget_seed: int, tag: str, variants: dict) -> None:
    """The pretrained decoder, every weight fine-tuned on the worked steps at the same budget."""
    worked_ids, worked_scored = models.encode(tokenizer, train, worked=True)
    pad = copy.deepcopy(decoder).requires_grad_(True)
    stats = models.train_decoder(pad, worked_ids, worked_scored, args.steps, recipe, budget_seed, f"{tag}: scratchpad")
    variants["scratchpad"] = {**models.score(pad.generate, tokenizer, test, worked=True,
                                             latency_items=args.latency_questions),
                              "trainable_params": models.trainable_count(pad), "train_seconds": stats["seconds"],
                              "training": stats}
    print(f"  {tag}: scratchpad {100 * variants['scratchpad']['accuracy']:5.1f} %", flush=True)


def run_testbed(args: TestbedArgs) -> dict:
    """Every task and seed; writes report.json, report.md and accuracy_vs_n.png to `args.out`."""
    started = time.time()
    out = check_writable_dir("out", args.out)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        runs = {task: [run_seed(args, task, seed) for seed in range(args.seeds)] for task in args.tasks}
    finally:
        torch.set_num_threads(previous)
    summaries = {task: summarise(task_runs) for task, task_runs in runs.items()}
    seconds = time.time() - started
    result = {"command": args.command(), "args": dataclasses.asdict(args), "wall_seconds": seconds,
              "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s), shared with other jobs",
              "torch": torch.__version__, "summary": summaries, "runs": runs}
    write_file(out / "report.json", json.dumps(result, indent=2, allow_nan=False))
    plot(summaries, out / "accuracy_vs_n.png")
    body = "\n".join(markdown(task, summaries[task], runs[task]) for task in args.tasks)
    write_file(out / "report.md", f"# dca testbed\n\n`{args.command()}`\n\n"
               f"Wall time {seconds / 60:.1f} min on {result['machine']}. Accuracy: exact match of the whole "
               f"answer under greedy generation on {args.test_size} held-out questions per seed; intervals are "
               f"95 % t-intervals over {args.seeds} seed(s). Design: `dca.studies.testbed` (module docstring).\n\n"
               f"{body}\n![accuracy against N](accuracy_vs_n.png)\n")
    print(f"report: {out}/report.md, report.json, accuracy_vs_n.png ({seconds / 60:.1f} min)", flush=True)
    return result

