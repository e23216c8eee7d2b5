"""`dca compare`: coprocessors scored by separate `dca eval` runs, paired against each other on their shared points.

`dca eval` pairs the coprocessors it scores together ("a vs b" in eval.md). A run scored later -- another seed,
a longer budget -- is paired with those already scored from the per-sequence losses each eval.json keeps:

    dca compare --columns runs/a/eval.json:overwrite-n16 runs/b/eval.json:pause-n16=pause --out results/a-vs-b

Pairing is only meaningful on the same sequences and points, so the columns are checked to be: the arguments
that choose the points agree where both files record them, and so do the frozen decoder's perplexities at every k
and the scored tokens of every sequence. Anything else is refused before any resampling.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from dca.atomic import write_file
from dca.checks import check_int, check_writable_dir, read_json_file
from dca.cli import invoked_command
from dca.config import help_meta
from dca.errors import ArgumentError
from dca.eval.eval_suite import paired_markdown, paired_table
from dca.eval.evaluate import PositionReport
from dca.studies.demo import plot_positions

# `dca eval` arguments that choose the sequences and the points (a min_position left at its default resolves from
# the coprocessors' configs, which is why the base perplexities are compared as well)
POINT_ARGS = ("model", "data", "held_out_fraction", "sequences", "seq_len", "positions", "min_position", "point_seed",
              "ks")
BASE_TOLERANCE = 1e-4  # relative: the frozen decoder on the same points, in another run (another batch grouping)


@dataclass
class Column:
    """One coprocessor's Table 1 from one eval.json, under the label it gets in the comparison."""

    label: str
    path: str
    name: str
    report: PositionReport
    args: dict


@dataclass
class CompareArgs:
    """Arguments of `dca compare`."""

    columns: list[str] = field(default_factory=list, metadata=help_meta(
        "two or more EVAL_JSON:NAME[=LABEL]: coprocessor NAME of a `dca eval` report, relabelled LABEL (to pair "
        "two runs that gave their coprocessors one name)"))
    bootstrap: int = field(default=1000, metadata=help_meta("bootstrap resamples for the intervals"))
    out: str | None = field(default=None, metadata=help_meta(
        "report folder for compare.md and compare.json (default: print the table only)"))

    def __post_init__(self) -> None:
        check_int("bootstrap", self.bootstrap)
        if len(self.columns) < 2:
            raise ArgumentError("columns", f"needs at least two EVAL_JSON:NAME columns to pair, got {self.columns}")
        labels = [parse_column(column)[2] for column in self.columns]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ArgumentError("columns", f"name {', '.join(twice)} twice: give each column its own label "
                                "(EVAL_JSON:NAME=LABEL)")
        if self.out is not None:
            check_writable_dir("out", self.out)


def parse_column(column: str) -> tuple[str, str, str]:
    """EVAL_JSON:NAME[=LABEL] -> (path, name, label); the label defaults to the name."""
    path, _, name = column.rpartition(":")
    name, _, label = name.partition("=")
    if not path or not name:
        raise ArgumentError("columns", f"{column!r} is not EVAL_JSON:NAME[=LABEL]")
    return path, name, label or name


def load_column(column: str) -> Column:
    """The named coprocessor's Table 1 from a `dca eval` report, refused unless it kept per-sequence losses."""
    path, name, label = parse_column(column)
    data = read_json_file("columns", path, "a JSON report of `dca eval`")
    table = data.get("table1") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ArgumentError("columns", f"{path} holds no Table 1 (a `dca eval` report with --sequences > 0)")
    if name not in table:
        raise ArgumentError("columns", f"{path} has no coprocessor {name!r}; it has {', '.join(table)}")
    try:
        report = PositionReport.from_dict(table[name])
    except TypeError as err:
        raise ArgumentError("columns", f"{path}: {name} is not a Table 1 column: {err}") from None
    if report.sequence_nll is None or report.sequence_counts is None:
        raise ArgumentError("columns", f"{path}: {name} has no per-sequence losses (a report from before they "
                            "were kept): score it again with `dca eval` to pair it")
    k = len(report.ks)
    rows = [report.base_ppl, *report.sequence_nll, *report.sequence_counts]
    if (len(report.sequence_nll) != len(report.sequence_counts) or not report.sequence_nll
            or any(not isinstance(row, list) or len(row) != k for row in rows)):
        raise ArgumentError("columns", f"{path}: {name} is damaged: its per-sequence losses are not one row of "
                            f"{k} values per sequence")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for row in rows for v in row):
        raise ArgumentError("columns", f"{path}: {name} holds a non-finite or non-numeric loss")
    return Column(label, path, name, report, data.get("args") or {})


def check_same_points(columns: list[Column]) -> None:
    """Every column against the first: the same sequences, points and k, or a one-line error saying what differs."""
    first = columns[0]
    for other in columns[1:]:
        where = f"{other.path}:{other.label} and {first.path}:{first.label}"
        for arg in POINT_ARGS:
            if arg in first.args and arg in other.args and first.args[arg] != other.args[arg]:
                raise ArgumentError("columns", f"{where} were scored on other points: {arg} "
                                    f"{other.args[arg]!r} vs {first.args[arg]!r}")
        a, b = other.report, first.report
        if a.ks != b.ks:
            raise ArgumentError("columns", f"{where} have other distances k: {a.ks} vs {b.ks}")
        if a.sequence_counts != b.sequence_counts:
            raise ArgumentError("columns", f"{where} scored other tokens ({a.num_sequences} vs {b.num_sequences} "
                                "sequences, or other points in them)")
        for k, x, y in zip(a.ks, a.base_ppl, b.base_ppl, strict=True):
            if not math.isclose(x, y, rel_tol=BASE_TOLERANCE):
                raise ArgumentError("columns", f"{where} were scored on other text: the frozen decoder's perplexity "
                                    f"at k = {k} is {x:.4f} vs {y:.4f}")


def summary(report: PositionReport) -> dict:
    """A column's Table 1 without its per-sequence losses: those stay in the eval.json it came from."""
    return {k: v for k, v in report.to_dict().items() if k not in ("sequence_nll", "sequence_counts")}


def run_compare(args: CompareArgs) -> dict:
    """Pair every two columns ("a vs b": a's perplexity against b's, k by k, 95 % interval from resampling sequences
    for both at once); prints the table, and writes compare.md, compare.json and compare.png into `args.out` if given.

    Raises:
        ArgumentError: a column that cannot be read, or columns not scored on the same points (before any resampling).
    """
    columns = [load_column(column) for column in args.columns]
    check_same_points(columns)
    paired = paired_table({c.label: c.report for c in columns}, args.bootstrap)
    table = paired_markdown(paired)
    print(table)
    command = invoked_command("compare", args)
    result = {"command": command, "columns": {c.label: f"{c.path}:{c.name}" for c in columns},
              "table1": {c.label: summary(c.report) for c in columns}, "table1_paired": paired}
    if args.out is not None:
        out = Path(args.out)
        write_file(out / "compare.json", json.dumps(result, indent=2))
        write_file(out / "compare.md", f"# dca compare\n\nReproduce: `{command}`\n\n{table}\n\n"
                   "![paired change by k](compare.png)\n")
        plot_positions({pair: SimpleNamespace(**change) for pair, change in paired.items()}, out / "compare.png",
                       "a vs b: a's perplexity against b's on the same points, paired 95% intervals")
    return result
