"""The held-out check of training runs against step, from their metrics.jsonl (one line per run).

    .venv/bin/python scripts/plot_runs.py --out results/long-cpu/held_out_by_step.png \
        "overwrite, 300 steps=results/long-cpu/runs/overwrite-n16" ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dca.atomic import write_figure  # noqa: E402


def held_out_by_step(run: Path) -> tuple[list[int], list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    checks = [(row["step"], 100 * row["eval_rel_ppl_change"]) for row in rows if "eval_rel_ppl_change" in row]
    return [step for step, _ in checks], [change for _, change in checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER (a folder with metrics.jsonl)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--ylim", type=float, nargs=2, default=None, help="the y range, in percent")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(11, 4.5))
    colours = plt.get_cmap("tab20" if len(args.runs) > 10 else "tab10")  # past 10 curves the default cycle repeats
    for i, spec in enumerate(args.runs):
        label, _, folder = spec.rpartition("=")
        steps, changes = held_out_by_step(Path(folder))
        ax.plot(steps, changes, marker="o", label=label, color=colours(i))
    ax.axhline(0, color="grey", linewidth=0.8)
    if args.ylim:
        ax.set_ylim(*args.ylim)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out perplexity change, %")
    ax.set_title("training's held-out check (mean over the ahead tokens)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # beside the curves, not over them
    fig.tight_layout()
    write_figure(args.out, fig)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
