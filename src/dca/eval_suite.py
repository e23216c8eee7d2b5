"""`dca eval`: the paper's tables for one or more saved coprocessors, beside the frozen model.

* Table 1 -- relative perplexity change by distance k from the augmentation point, with bootstrap
  confidence intervals, on held-out text (`dca.evaluate`).
* Table 2 -- benchmarks, the coprocessor called once at the end of each prompt; base and augmented
  scores come from the same items in the same run (`dca.benchmarks`).

Writes eval.json, eval.md and plots into `--out`; the exact command is recorded in each.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dca.demo import SHIPPED, plot_positions
from dca.evaluate import KS, PositionReport, perplexity_by_position
from dca.init_study import held_out_eval_set
from dca.model import AugmentedLM
from dca.resources import load_model

# PAPER.md Table 1 (Gemma-2 2B), relative perplexity change (%) by latent count
PAPER_TABLE1 = {8: [-1.53, -1.67, -1.39, -1.22, -0.85, -0.55], 16: [-2.48, -2.41, -1.98, -1.56, -1.08, -0.64],
                32: [-3.28, -3.15, -2.66, -2.11, -1.50, -0.88], 64: [-3.94, -3.70, -3.17, -2.61, -1.88, -1.20]}


@dataclass
class EvalArgs:
    """Arguments of `dca eval`."""

    coprocessors: list[str] = field(default_factory=lambda: [str(SHIPPED)],
                                    metadata={"help": "saved coprocessors (folders) to evaluate"})
    model: str = field(default="smollm2-135m", metadata={"help": "the frozen decoder they were trained for"})
    data: str = field(default="wiki", metadata={"help": "corpus whose held-out split is scored (Table 1)"})
    held_out_fraction: float = field(default=0.05, metadata={"help": "must match training's"})
    sequences: int = field(default=32, metadata={"help": "held-out sequences (0 skips Table 1)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per held-out sequence"})
    positions: int = field(default=8, metadata={"help": "augmentation points per sequence"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the intervals"})
    benchmarks: list[str] = field(default_factory=list, metadata={"help": "benchmark names (see dca.benchmarks)"})
    limit: int | None = field(default=100, metadata={"help": "items per benchmark (a seeded subset)"})
    seed: int = field(default=0, metadata={"help": "seed of the benchmark subsets"})
    batch_size: int = field(default=4, metadata={"help": "sequences per forward pass"})
    out: str = field(default="results/eval", metadata={"help": "report folder"})


def _label(path: str) -> str:
    return Path(path).name if Path(path).name not in ("adapter", "") else Path(path).parent.name


def table1_markdown(reports: dict[str, PositionReport], latents: dict[str, int]) -> str:
    names = list(reports)
    header = "| k | " + " | ".join(f"{n} (N={latents[n]})" for n in names)
    paper_ns = sorted({latents[n] for n in names if latents[n] in PAPER_TABLE1})
    header += "".join(f" | paper N={n}" for n in paper_ns) + " |"
    lines = [header, "|---" * (1 + len(names) + len(paper_ns)) + "|"]
    for i, k in enumerate(KS):
        cells = [f"{100 * reports[n].rel_change[i]:+.2f}% [{100 * reports[n].ci_low[i]:+.1f}, "
                 f"{100 * reports[n].ci_high[i]:+.1f}]" for n in names]
        cells += [f"{PAPER_TABLE1[n][i]:+.2f}%" for n in paper_ns]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    first = reports[names[0]]
    lines.append("")
    lines.append("Base perplexity by k: " + ", ".join(f"k={k}: {p:.2f}" for k, p in zip(KS, first.base_ppl,
                                                                                       strict=True)))
    return "\n".join(lines)


def run_eval(args: EvalArgs) -> dict:
    command = "dca eval " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else repr(asdict(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    decoder, tokenizer = load_model(args.model)
    models = {_label(p): AugmentedLM.from_pretrained(p, decoder) for p in args.coprocessors}
    latents = {name: m.coprocessor.config.num_latents for name, m in models.items()}
    result: dict = {"command": command, "args": asdict(args), "coprocessors": {
        name: m.coprocessor.config.to_dict() for name, m in models.items()}}
    sections = [f"# dca eval\n\nReproduce: `{command}`\n"]

    if args.sequences > 0:
        seqs, positions = held_out_eval_set(tokenizer, args.data, args.held_out_fraction, args.sequences,
                                            args.seq_len, args.positions, max(KS))
        reports = {name: perplexity_by_position(m, seqs, positions, batch_size=args.batch_size,
                                                bootstrap=args.bootstrap, progress=True)
                   for name, m in models.items()}
        result["table1"] = {name: r.to_dict() for name, r in reports.items()}
        plot_positions(reports, out / "ppl_by_position.png", f"{args.model}, held-out {args.data}")
        sections.append(f"## Perplexity by position (Table 1 protocol)\n\n{len(seqs)} held-out sequences of "
                        f"{args.seq_len} tokens, {positions.numel()} augmentation points; relative change of "
                        f"the k-th token's perplexity, 95% bootstrap interval over sequences.\n\n"
                        f"{table1_markdown(reports, latents)}\n\n![](ppl_by_position.png)\n")

    if args.benchmarks:
        from dca.benchmarks import run_benchmarks

        table2 = run_benchmarks(models, tokenizer, args.benchmarks, limit=args.limit, seed=args.seed,
                                batch_size=args.batch_size)
        result["table2"] = table2["results"]
        sections.append(table2["markdown"])

    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "eval.md").write_text("\n".join(sections))
    print("\n".join(sections))
    print(f"\nwritten to {out}/eval.md, eval.json")
    return result
