"""Coprocessors scored in separate `dca eval` runs on the same points, against each other (paired, per sequence).

    .venv/bin/python scripts/paired.py A/eval.json:NAME B/eval.json:NAME [C/eval.json:NAME ...]

A column may be relabelled, `A/eval.json:NAME=LABEL`, to pair two runs that gave their coprocessors one name (two
seeds of one command, say).

prints the markdown table `dca eval` writes for coprocessors scored together ("a vs b": the relative change of
a's perplexity against b's, 95 % interval from resampling sequences for both at once). Each file must come from
a `dca eval` that kept per-sequence losses (since session 8) on the same sequences, points and k.
"""

import argparse
import json

from dca.eval.eval_suite import paired_markdown, paired_table
from dca.eval.evaluate import PositionReport


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("columns", nargs="+", metavar="EVAL_JSON:NAME[=LABEL]")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    reports = {}
    for column in args.columns:
        path, _, name = column.rpartition(":")
        name, _, label = name.partition("=")
        label = label or name
        if label in reports:
            parser.error(f"{label} is named twice: give each column its own label (EVAL_JSON:NAME=LABEL)")
        reports[label] = PositionReport.from_dict(json.load(open(path))["table1"][name])
    print(paired_markdown(paired_table(reports, args.bootstrap)))


if __name__ == "__main__":
    main()
