"""`dca demo`: the whole story on a real pretrained model and real held-out text, in minutes on a CPU.

1. The frozen model's perplexity on held-out text, and the same with its cache augmented by the
   coprocessor this project trained and ships (`coprocessors/`), by distance from the augmentation
   point in the paper's Table 1 layout, beside the same configuration untrained (what the latent
   mapping alone does, so what training adds can be read off); and one prompt answered with and
   without augmentation.
2. A short training run, so the pipeline can be seen working end to end.
3. A report folder: report.json, report.md and ppl_by_position.png.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dca.atomic import write_figure, write_file
from dca.checks import check_coprocessor, check_data_source, check_int, check_model_source, check_writable_dir
from dca.config import CoprocessorConfig, help_meta
from dca.eval.evaluate import (
    KS,
    PAPER_TABLE1,
    PositionReport,
    held_out_eval_set,
    perplexity_by_position,
    trained_vs_untrained_markdown,
    untrained_like,
)
from dca.model import AugmentedLM
from dca.resources import load_model
from dca.training.train import TrainArgs, train

REPO = Path(__file__).resolve().parents[3]
SHIPPED = Path("coprocessors") / "smollm2-135m-wiki"  # relative to the repository
PROMPT = "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was designed by"


@dataclass
class DemoArgs:
    """Arguments of `dca demo`."""

    coprocessor: str = field(default=str(SHIPPED), metadata=help_meta("a saved coprocessor for the model"))
    model: str = field(default="smollm2-135m", metadata=help_meta("the frozen decoder it was trained for"))
    data: str = field(default="wiki", metadata=help_meta("corpus whose held-out split is evaluated"))
    sequences: int = field(default=64, metadata=help_meta("held-out sequences to evaluate"))
    seq_len: int = field(default=128, metadata=help_meta("tokens per held-out sequence (the training length)"))
    positions: int = field(default=8, metadata=help_meta("augmentation points per sequence"))
    train_steps: int = field(default=12, metadata=help_meta("steps of the short live training run (0: skip)"))
    out: str = field(default="reports/demo", metadata=help_meta("report folder"))

    def __post_init__(self) -> None:
        for name in ("sequences", "positions"):
            check_int(name, getattr(self, name))
        check_int("seq_len", self.seq_len, minimum=2)
        check_int("train_steps", self.train_steps, minimum=0)

    def check_sources(self) -> None:
        check_coprocessor("coprocessor", self.coprocessor)
        check_model_source("model", self.model)
        check_data_source("data", self.data)
        check_writable_dir("out", self.out)


def resolve_coprocessor(path: str) -> Path:
    """A saved coprocessor's folder; the shipped ones are found from any working directory."""
    if not Path(path).is_dir() and (REPO / path).is_dir():
        return REPO / path
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no coprocessor at {path}: train one with `dca train` and pass its RUN/adapter")
    return Path(path)


def plot_positions(reports: dict[str, PositionReport], path: Path, title: str,
                   paper_latents: Sequence[int] = ()) -> None:
    """Relative perplexity change by k with its intervals, one line per report, and the paper's Table 1 column
    (dashed) for each of `paper_latents` it has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, report in reports.items():
        rel = [100 * v for v in report.rel_change]
        low = [100 * v for v in report.ci_low]
        high = [100 * v for v in report.ci_high]
        ax.plot(report.ks, rel, marker="o", label=name)
        ax.fill_between(report.ks, low, high, alpha=0.2)
    for n in (n for n in paper_latents if n in PAPER_TABLE1):
        ax.plot(KS, PAPER_TABLE1[n], linestyle="--", label=f"paper, Gemma-2 2B, {n} latents")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(KS), [str(k) for k in KS])
    ax.set_xlabel("k: tokens after the augmentation point")
    ax.set_ylabel("relative perplexity change (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(path, fig)


def answer(model: AugmentedLM, tokenizer, prompt: str, augment: bool, max_new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(ids, augment=augment, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_demo(args: DemoArgs) -> dict:
    started = time.time()
    args.check_sources()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/3] loading {args.model} and held-out {args.data} text", flush=True)
    decoder, tokenizer = load_model(args.model)
    model = AugmentedLM.from_pretrained(resolve_coprocessor(args.coprocessor), decoder)
    first = model.coprocessor.config.first_position  # "overwrite": t >= N-1, where all N latents replace real tokens
    seqs, positions = held_out_eval_set(tokenizer, args.data, 0.05, args.sequences, args.seq_len, args.positions,
                                        max(KS), min_position=first)
    config = model.coprocessor.config
    print(f"      coprocessor {args.coprocessor}: N={config.num_latents} latents, "
          f"{'LoRA r' + str(config.lora_rank) if config.uses_lora else config.init}; evaluating "
          f"{len(seqs)} x {args.seq_len} held-out tokens at {positions.numel()} augmentation points"
          f"{f' (t >= {first})' if first else ''}", flush=True)
    report = perplexity_by_position(model, seqs, positions, progress=True)
    untrained = perplexity_by_position(untrained_like(model), seqs, positions, progress=True)
    table = trained_vs_untrained_markdown(report, untrained)
    print(table)
    with_aug, without = answer(model, tokenizer, PROMPT, True), answer(model, tokenizer, PROMPT, False)
    print(f"\nprompt: {PROMPT!r}\n  base:      {without!r}\n  augmented: {with_aug!r}\n", flush=True)

    live = None
    if args.train_steps > 0:
        print(f"[2/3] a live {args.train_steps}-step training run (LoRA coprocessor, 8 latents)", flush=True)
        live_args = TrainArgs(model=args.model, data=args.data, out=str(out / "live-run"),
                              # today's default mapping, whatever the evaluated coprocessor was trained with
                              coprocessor=CoprocessorConfig(num_latents=8, num_ahead=8, lora_rank=8),
                              positions=4, seq_len=128, batch_size=2, steps=args.train_steps,
                              warmup_steps=2, lr=1e-3, eval_every=args.train_steps, eval_sequences=4,
                              save_every=args.train_steps, max_docs=3000)
        if (out / "live-run").exists():  # a fresh run each time, not a resume of the last demo
            import shutil

            shutil.rmtree(out / "live-run")
        train(live_args)
        records = [json.loads(x) for x in (out / "live-run" / "metrics.jsonl").read_text().splitlines()]
        live = {"args": asdict(live_args), "first": records[0], "last": records[-1]}

    print("[3/3] writing the report", flush=True)
    plot_positions({f"coprocessor ({config.num_latents} latents)": report, "same, untrained (step 0)": untrained},
                   out / "ppl_by_position.png", f"{args.model} on held-out {args.data}: augmented vs frozen model",
                   paper_latents=[config.num_latents])
    result = {"model": args.model, "data": args.data, "coprocessor": args.coprocessor,
              "coprocessor_config": config.to_dict(), "held_out": report.to_dict(),
              "held_out_untrained": untrained.to_dict(),
              "prompt": {"text": PROMPT, "base": without, "augmented": with_aug}, "live_training": live,
              "seconds": time.time() - started}
    write_file(out / "report.json", json.dumps(result, indent=2))
    write_file(out / "report.md",
        f"# dca demo: {args.model}, held-out {args.data}\n\n"
        f"Coprocessor `{args.coprocessor}` (N={config.num_latents}); {len(seqs)} held-out sequences of "
        f"{args.seq_len} tokens, {positions.numel()} augmentation points{f' at t >= {first}' if first else ''}. "
        f"Relative perplexity change; negative = "
        f"augmentation helps. *Untrained* is the same configuration at initialisation (same init_seed): what "
        f"the latent mapping does before training.\n\n"
        f"{table}\n\n![](ppl_by_position.png)\n\n"
        f"Prompt: `{PROMPT}`\n\n- base: `{without}`\n- augmented: `{with_aug}`\n")
    print(f"report: {out}/report.md, report.json, ppl_by_position.png ({result['seconds']:.0f} s)")
    return result
