"""Coprocessors scored in separate `dca eval` runs on the same points, against each other (paired, per sequence).

    .venv/bin/python scripts/paired.py A/eval.json:NAME B/eval.json:NAME [C/eval.json:NAME ...]

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
    parser.add_argument("columns", nargs="+", metavar="EVAL_JSON:NAME")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    reports = {}
    for column in args.columns:
        path, _, name = column.rpartition(":")
        if name in reports:
            parser.error(f"{name} is named twice: each column needs its own coprocessor name")
        reports[name] = PositionReport.from_dict(json.load(open(path))["table1"][name])
    print(paired_markdown(paired_table(reports, args.bootstrap)))


if __name__ == "__main__":
    main()
