"""`dca eval`: the paper's tables for one or more saved coprocessors, beside the frozen model.

* Table 1 -- relative perplexity change by distance k from the augmentation point, with bootstrap
  confidence intervals, on held-out text (`dca.eval.evaluate`).
* Table 2 -- benchmarks, the coprocessor called once at the end of each prompt; base and augmented
  scores come from the same items in the same run (`dca.eval.benchmarks`).

Writes eval.json, eval.md and plots into `--out`; the exact command is recorded in each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from dca.adapter import read_adapter_config
from dca.atomic import write_figure, write_file
from dca.checks import (
    check_coprocessor,
    check_data_source,
    check_device,
    check_int,
    check_model_source,
    check_number,
    check_writable_dir,
    resolve_device,
)
from dca.cli import invoked_command
from dca.config import earliest_point, help_meta
from dca.errors import ArgumentError, ResourceError
from dca.eval.benchmarks import BENCHMARKS, Benchmark, Item, score_generation, score_multiple_choice
from dca.eval.evaluate import (
    KS,
    PAPER_TABLE1,
    PositionReport,
    held_out_eval_set,
    paired_change,
    perplexity_by_position,
    untrained_like,
)
from dca.model import AugmentedLM
from dca.resources import load_model
from dca.studies.demo import SHIPPED, plot_positions, resolve_coprocessor


@dataclass
class EvalArgs:
    """Arguments of `dca eval`."""

    coprocessors: list[str] = field(default_factory=lambda: [str(SHIPPED)],
                                    metadata=help_meta("saved coprocessors (folders) to evaluate"))
    model: str = field(default="smollm2-135m", metadata=help_meta("the frozen decoder they were trained for"))
    data: str = field(default="wiki", metadata=help_meta("corpus whose held-out split is scored (Table 1)"))
    held_out_fraction: float = field(default=0.05, metadata=help_meta("must match training's"))
    sequences: int = field(default=32, metadata=help_meta("held-out sequences (0 skips Table 1)"))
    seq_len: int = field(default=256, metadata=help_meta("tokens per held-out sequence"))
    positions: int = field(default=8, metadata=help_meta("augmentation points per sequence"))
    min_position: int | None = field(default=None, metadata=help_meta(
        "earliest augmentation point t (default: the latest first_position of the coprocessors, N-1 under "
        "'overwrite', where every latent replaces a real token)"))
    point_seed: int = field(default=12345, metadata=help_meta(
        "seed of the augmentation points (another seed, another draw of points on the same sequences)"))
    ks: list[int] = field(default_factory=lambda: list(KS), metadata=help_meta("distances k of Table 1"))
    latent_delay: int = field(default=0, metadata=help_meta(
        "Table 1 with latents arriving this many tokens late (asynchronous augmentation): computed from x[0..t], "
        "inserted after x[t+d] on the anchor of x[t+d], k counted from there"))
    bootstrap: int = field(default=1000, metadata=help_meta("bootstrap resamples for the intervals"))
    untrained: bool = field(default=True, metadata=help_meta(
        "Table 1 also shows each coprocessor's configuration untrained (at initialisation, same init_seed)"))
    benchmarks: list[str] = field(default_factory=list, metadata=help_meta("benchmark names (see dca.eval.benchmarks)"))
    limit: int | None = field(default=100, metadata=help_meta("items per benchmark (a seeded subset)"))
    seed: int = field(default=0, metadata=help_meta("seed of the benchmark subsets"))
    batch_size: int = field(default=4, metadata=help_meta("sequences per forward pass"))
    max_new_tokens: int = field(default=256, metadata=help_meta("generation budget per answer (GSM8K)"))
    device: str = field(default="auto", metadata=help_meta("auto, cpu, cuda, cuda:1, ..."))
    out: str = field(default="results/eval", metadata=help_meta("report folder"))

    def __post_init__(self) -> None:
        """Every value is checked here, before anything is loaded (`ArgumentError` names the argument)."""
        check_int("sequences", self.sequences, minimum=0)
        for name in ("positions", "bootstrap", "batch_size", "max_new_tokens"):
            check_int(name, getattr(self, name))
        check_int("seq_len", self.seq_len, minimum=2)
        check_int("seed", self.seed, minimum=0)
        check_int("latent_delay", self.latent_delay, minimum=0)
        if self.min_position is not None:
            check_int("min_position", self.min_position, minimum=0)
        check_int("point_seed", self.point_seed, minimum=0)
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ArgumentError("ks", f"must be distances >= 1, got {self.ks}")
        if self.latent_delay >= max(self.ks):
            raise ArgumentError("latent_delay", f"({self.latent_delay}) must be below the largest k ({max(self.ks)}): "
                                "the points are those of no delay, which leave max(ks) tokens after them")
        if self.limit is not None:
            check_int("limit", self.limit)
        check_number("held_out_fraction", self.held_out_fraction, low=0, high=1, low_open=True)
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise ArgumentError("benchmarks", f"has unknown names {unknown}; known: {', '.join(BENCHMARKS)}")
        if not self.coprocessors:
            raise ArgumentError("coprocessors", "is empty: name at least one saved coprocessor")
        coprocessor_labels(self.coprocessors)
        if self.sequences == 0 and not self.benchmarks:
            raise ArgumentError("sequences", "is 0 and no --benchmarks are given: there is nothing to evaluate")
        check_device("device", self.device)

    def check_sources(self) -> None:
        """The model, the data, every coprocessor folder and the report folder (cheap: nothing is loaded)."""
        configs = [read_adapter_config(check_coprocessor("coprocessors", path))["coprocessor"]
                   for path in self.coprocessors]
        first = earliest_point(self.min_position, configs)
        if self.sequences and first + max(self.ks) + self.positions > self.seq_len:
            raise ArgumentError("seq_len", f"({self.seq_len}) leaves fewer than positions={self.positions} points "
                                f"t >= {first} (the earliest point) with t + {max(self.ks)} inside it")
        check_model_source("model", self.model)
        if self.sequences:
            check_data_source("data", self.data)
        check_writable_dir("out", self.out)


def coprocessor_labels(paths: Sequence[str]) -> list[str]:
    """Each coprocessor's name in the tables: its folder (the run's, for `RUN/adapter`), with as many parent folders
    as it takes to tell apart coprocessors of one name (`runs/a/overwrite-n16`, `runs/b/overwrite-n16`)."""
    parts = [p.parts[:-1] if p.name == "adapter" else p.parts for p in map(Path, paths)]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(folders[-d:]) for folders, d in zip(parts, depth, strict=True)]
        clashes = [i for i, label in enumerate(labels) if labels.count(label) > 1]
        if not clashes:
            return labels
        if all(depth[i] >= len(parts[i]) for i in clashes):
            raise ArgumentError("coprocessors", f"names {paths[clashes[0]]!r} twice")
        depth = [d + (i in clashes and d < len(parts[i])) for i, d in enumerate(depth)]


def table1_markdown(reports: dict[str, PositionReport], latents: dict[str, int],
                    untrained: dict[str, PositionReport] | None = None) -> str:
    """Each coprocessor's column, followed by its configuration untrained (if given), then the paper's."""
    names = list(reports)
    untrained = untrained or {}
    columns = []
    for n in names:
        columns.append((reports[n], f"{n} (N={latents[n]})"))
        if n in untrained:
            columns.append((untrained[n], f"{n} untrained"))
    header = "| k | " + " | ".join(label for _, label in columns)
    paper_ns = sorted({latents[n] for n in names if latents[n] in PAPER_TABLE1})
    header += "".join(f" | paper N={n}" for n in paper_ns) + " |"
    lines = [header, "|---" * (1 + len(columns) + len(paper_ns)) + "|"]
    ks = reports[names[0]].ks
    for i, k in enumerate(ks):
        cells = [f"{100 * r.rel_change[i]:+.2f}% [{100 * r.ci_low[i]:+.1f}, {100 * r.ci_high[i]:+.1f}]"
                 for r, _ in columns]
        cells += [f"{PAPER_TABLE1[n][KS.index(k)]:+.2f}%" if k in KS else "" for n in paper_ns]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    first = reports[names[0]]
    lines.append("")
    lines.append("Base perplexity by k: " + ", ".join(f"k={k}: {p:.2f}" for k, p in zip(ks, first.base_ppl,
                                                                                       strict=True)))
    return "\n".join(lines)


def paired_table(reports: dict[str, PositionReport], bootstrap: int) -> dict[str, dict[str, list[float]]]:
    """Every pair of coprocessors on the same points, "a vs b": the relative perplexity change of a against b."""
    names = list(reports)
    table = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            rel, low, high = paired_change(reports[a], reports[b], bootstrap)
            table[f"{a} vs {b}"] = {"ks": reports[a].ks, "rel_change": rel, "ci_low": low, "ci_high": high}
    return table


def paired_markdown(paired: dict[str, dict[str, list[float]]]) -> str:
    pairs = list(paired)
    lines = ["| k | " + " | ".join(pairs) + " |", "|---" * (1 + len(pairs)) + "|"]
    for i, k in enumerate(paired[pairs[0]]["ks"]):
        lines.append(f"| {k} | " + " | ".join(f"{100 * p['rel_change'][i]:+.2f}% [{100 * p['ci_low'][i]:+.1f}, "
                                               f"{100 * p['ci_high'][i]:+.1f}]" for p in paired.values()) + " |")
    return "\n".join(lines)


def run_eval(args: EvalArgs) -> dict:
    """Table 1 and Table 2 for every coprocessor; eval.json and eval.md are rewritten as each part
    finishes, so a failure late in a run loses nothing already computed.

    Raises:
        ArgumentError: a bad argument or a missing model, corpus or coprocessor (before any scoring).
        ResourceError: benchmark data that is not installed (before any scoring).
    """
    command = invoked_command("eval", args)
    args.check_sources()
    out = Path(args.out)
    try:
        items = {name: BENCHMARKS[name].load(args.limit, args.seed) for name in args.benchmarks}
    except ModuleNotFoundError as err:
        raise ResourceError(str(err)) from None
    decoder, tokenizer = load_model(args.model, device=resolve_device("device", args.device))
    models = {label: AugmentedLM.from_pretrained(resolve_coprocessor(path), decoder)
              for label, path in zip(coprocessor_labels(args.coprocessors), args.coprocessors, strict=True)}
    latents = {name: m.coprocessor.config.num_latents for name, m in models.items()}
    result: dict = {"command": command, "args": asdict(args), "coprocessors": {
        name: m.coprocessor.config.to_dict() for name, m in models.items()}}
    sections = [f"# dca eval\n\nReproduce: `{command}`\n"]

    def write_report(final: bool = False) -> None:
        write_file(out / "eval.json", json.dumps(result, indent=2).encode())
        write_file(out / "eval.md", "\n".join(sections + ([] if final else ["\n*(in progress)*\n"])).encode())

    if args.sequences > 0:
        # by default "overwrite" is scored where all N latents replace real tokens (t >= N-1); every model, same points
        first = earliest_point(args.min_position, [m.coprocessor.config for m in models.values()])
        seqs, positions = held_out_eval_set(tokenizer, args.data, args.held_out_fraction, args.sequences,
                                            args.seq_len, args.positions, max(args.ks), seed=args.point_seed,
                                            min_position=first)
        reports = {name: perplexity_by_position(m, seqs, positions, tuple(args.ks), batch_size=args.batch_size,
                                                bootstrap=args.bootstrap, progress=True,
                                                latent_delay=args.latent_delay)
                   for name, m in models.items()}
        result["table1"] = {name: r.to_dict() for name, r in reports.items()}
        untrained: dict[str, PositionReport] = {}
        if args.untrained:  # one untrained model per distinct configuration
            by_config: dict[str, PositionReport] = {}
            for name, m in models.items():
                key = m.coprocessor.config.to_json()
                if key not in by_config:
                    by_config[key] = perplexity_by_position(
                        untrained_like(m), seqs, positions, tuple(args.ks), batch_size=args.batch_size,
                        bootstrap=args.bootstrap, progress=True, latent_delay=args.latent_delay)
                untrained[name] = by_config[key]
            result["table1_untrained"] = {name: r.to_dict() for name, r in untrained.items()}
        plot_positions({**reports, **{f"{n}, untrained": r for n, r in untrained.items()}},
                       out / "ppl_by_position.png", f"{args.model}, held-out {args.data}",
                       paper_latents=sorted(set(latents.values())))
        late = f", latents {args.latent_delay} tokens late" if args.latent_delay else ""
        untrained_note = (" *Untrained* is the same configuration at initialisation (same init_seed): what the "
                          "latent mapping does before training." if untrained else "")
        sections.append(f"## Perplexity by position (Table 1 protocol)\n\n{len(seqs)} held-out sequences of "
                        f"{args.seq_len} tokens, {positions.numel()} augmentation points"
                        f"{f' at t >= {first}' if first else ''}{late}; relative change of "
                        f"the k-th token's perplexity, 95% bootstrap interval over sequences."
                        f"{untrained_note}\n\n"
                        f"{table1_markdown(reports, latents, untrained)}\n\n![](ppl_by_position.png)\n")
        if len(reports) > 1:
            result["table1_paired"] = paired_table(reports, args.bootstrap)
            sections.append("### Coprocessors against each other, on the same points\n\n\"a vs b\": the relative "
                            "change of a's perplexity against b's (negative: a is better), 95% interval from "
                            "resampling sequences for both at once.\n\n"
                            f"{paired_markdown(result['table1_paired'])}\n")
        write_report()

    if args.benchmarks:
        result["table2"] = {}
        table1_sections = list(sections)
        for name in args.benchmarks:  # one at a time, each written as soon as it is scored
            table2 = run_benchmarks(models, tokenizer, [name], items=items, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens)
            result["table2"].update(table2["results"])
            sections = [*table1_sections, benchmarks_markdown(result["table2"], args.seed)]
            write_report()
        if plot_accuracy_by_latents(result, out / "accuracy_by_latents.png"):
            sections.append("![](accuracy_by_latents.png)\n")

    write_report(final=True)
    print("\n".join(sections))
    print(f"\nwritten to {out}/eval.md, eval.json")
    return result


# ------------------------------------------------------------------ Table 2
def _score(model: AugmentedLM, tokenizer: PreTrainedTokenizerBase, bench: Benchmark, items: Sequence[Item], *,
           augment: bool, batch_size: int, max_new_tokens: int, label: str) -> dict:
    progress = f"{bench.name}: {label}"
    if bench.kind == "multiple_choice":
        mc = score_multiple_choice(model, tokenizer, items, augment=augment, batch_size=batch_size,
                                   progress=progress)
        return {"acc": mc.accuracy, "acc_norm": mc.accuracy_norm, "loglikelihoods": mc.loglikelihoods,
                "correct": mc.correct}
    gen = score_generation(model, tokenizer, items, augment=augment, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, stop=bench.stop, progress=progress)
    return {"exact_match": gen.accuracy, "completions": gen.completions, "predictions": gen.predictions,
            "correct": {"exact_match": gen.correct}}


def run_benchmarks(models: AugmentedLM | dict[str, AugmentedLM], tokenizer: PreTrainedTokenizerBase,
                   names: Sequence[str], *, items: dict[str, Sequence[Item]] | None = None, limit: int | None = 100,
                   seed: int = 0, batch_size: int = 8, max_new_tokens: int = 256) -> dict:
    """Table 2: the frozen decoder ("base") and each coprocessor, all on the same seeded items.

    `models` share one decoder; each with a coprocessor is scored augmented (once at every prompt's
    end). `items` replaces the packaged data per benchmark name. Returns {"results", "markdown"}.
    """
    models = {"augmented": models} if isinstance(models, AugmentedLM) else dict(models)
    first = next(iter(models.values()))
    if any(m.decoder is not first.decoder for m in models.values()):
        raise ValueError("run_benchmarks compares coprocessors of one decoder: pass models sharing it")
    results = {}
    for name in names:
        if name not in BENCHMARKS:
            raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        bench = BENCHMARKS[name]
        chosen = list(items[name]) if items and name in items else bench.load(limit, seed)
        row = {"num_shots": bench.num_shots, "split": bench.split, "n": len(chosen), "ids": [i.id for i in chosen],
               "metrics": list(bench.metrics)}
        kwargs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
        row["base"] = _score(first, tokenizer, bench, chosen, augment=False, label="base", **kwargs)
        for label, model in models.items():
            if model.coprocessor is not None:
                row[label] = _score(model, tokenizer, bench, chosen, augment=True, label=label, **kwargs)
        results[name] = row
    return {"results": results, "markdown": benchmarks_markdown(results, seed)}


def _interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% half-width (normal approximation) of per-item scores, in points."""
    n = max(len(values), 1)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return 100 * mean, 100 * 1.96 * (var / n) ** 0.5


def plot_accuracy_by_latents(result: dict, path: Path) -> bool:
    """Each benchmark's accuracy against the latent count N (the paper's Table 2 as a picture).

    `result` is an eval.json. Coprocessors are dots joined through their mean at each N, pause tokens
    crosses, the frozen model a dashed line; bars are 95% intervals. Draws nothing and returns False
    unless the coprocessors span at least two latent counts.
    """
    table2, configs = result.get("table2"), result.get("coprocessors", {})
    latents = {name: c["num_latents"] for name, c in configs.items()}
    if not table2 or len({n for name, n in latents.items() if configs[name]["method"] == "coprocessor"}) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table2), figsize=(2.5 * len(table2), 3.0), squeeze=False, sharex=True)
    for ax, (bench, row) in zip(axes[0], table2.items(), strict=True):
        metric = row["metrics"][0]
        base, _ = _interval([float(c) for c in row["base"]["correct"][metric]])
        ax.axhline(base, linestyle="--", color="gray", label="frozen model")
        by_n: dict[int, list[float]] = {}
        for name, n in latents.items():
            if name not in row:
                continue
            mean, half = _interval([float(c) for c in row[name]["correct"][metric]])
            pause = configs[name]["method"] == "pause"
            ax.errorbar([n * 1.12 if pause else n], [mean], yerr=[half], fmt="x" if pause else "o",
                        color="C1" if pause else "C0", alpha=0.8, capsize=2)
            if not pause:
                by_n.setdefault(n, []).append(mean)
        ns = sorted(by_n)
        ax.plot(ns, [sum(by_n[n]) / len(by_n[n]) for n in ns], color="C0", label="coprocessor")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_title(f"{bench} ({metric})", fontsize=9)
        ax.set_xlabel("latents N", fontsize=8)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][0].plot([], [], "x", color="C1", label="pause tokens")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    write_figure(path, fig, dpi=110)
    return True


def benchmarks_markdown(results: dict, seed: int = 0) -> str:
    labels = list(dict.fromkeys(k for row in results.values() for k in row if k not in
                                ("num_shots", "split", "n", "ids", "metrics")))
    lines = ["## Benchmarks (Table 2 protocol)", "",
             f"Coprocessor called once at the end of each prompt; every column scores the same items (seeded subset, "
             f"seed {seed}). ± is a 95% interval; Δ is the paired difference to base, with its 95% interval.", "",
             "| benchmark | split | shots | n | metric | " + " | ".join(labels) + " |",
             "|---" * (5 + len(labels)) + "|"]
    for name, row in results.items():
        for metric in row.get("metrics", row["base"]["correct"]):
            base = row["base"]["correct"][metric]
            cells = []
            for label in labels:
                correct = [float(c) for c in row[label]["correct"][metric]] if label in row else []
                mean, half = _interval(correct)
                cell = f"{mean:.1f} ± {half:.1f}"
                if label != "base" and correct:
                    diff, diff_half = _interval([c - float(b) for c, b in zip(correct, base, strict=True)])
                    cell += f" (Δ {diff:+.1f} ± {diff_half:.1f})"
                cells.append(cell if correct else "–")
            lines.append(f"| {name} | {row['split']} | {row['num_shots']} | {row['n']} | {metric} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
