"""Collect `dca eval --latent-delay d` reports (results/delay/eval-d{d}/eval.json) into one table.

    .venv/bin/python scripts/delay_report.py results/delay

Writes results/delay/delay.json and delay.md: for every coprocessor and delay d, the relative perplexity change
of the k-th token after the (late) insertion point, with its 95 % bootstrap interval, and the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dca.atomic import write_file

PAPER = {0: 31.43, 1: 27.2, 2: 27.1, 3: 26.9}  # GSM8K, Gemma-2 2B, 64 latents, trained without delay (App. A.5)


def main(folder: str) -> None:
    root = Path(folder)
    reports = {}
    for path in sorted(root.glob("eval-d*/eval.json")):
        result = json.loads(path.read_text())
        reports[int(result["args"]["latent_delay"])] = result
    if not reports:
        raise SystemExit(f"no eval-d*/eval.json under {root}")
    delays = sorted(reports)
    names = list(reports[delays[0]]["table1"])
    ks = reports[delays[0]]["table1"][names[0]]["ks"]
    table = {name: {d: reports[d]["table1"][name] for d in delays} for name in names}
    if all("table1_untrained" in reports[d] for d in delays):  # the first one's configuration at initialisation
        table[f"{names[0]} untrained"] = {d: reports[d]["table1_untrained"][names[0]] for d in delays}
        names.append(f"{names[0]} untrained")
    lines = ["| coprocessor | latents late (d) | " + " | ".join(f"k={k}" for k in ks) + f" | mean k=1..{ks[-1]} |",
             "|---|---|" + "---|" * (len(ks) + 1)]
    for name in names:
        for d in delays:
            r = table[name][d]
            cells = [f"{100 * v:+.2f}% [{100 * lo:+.1f}, {100 * hi:+.1f}]"
                     for v, lo, hi in zip(r["rel_change"], r["ci_low"], r["ci_high"], strict=True)]
            mean = sum(r["rel_change"]) / len(r["rel_change"])
            lines.append(f"| {name} | {d} | " + " | ".join(cells) + f" | {100 * mean:+.2f}% |")
    base = "\n".join(f"- d={d}: " + ", ".join(f"k={k}: {p:.2f}" for k, p in zip(ks, table[names[0]][d]["base_ppl"],
                                                                                 strict=True)) for d in delays)
    paper = " / ".join(f"{PAPER[d]}" for d in delays if d in PAPER)
    commands = "\n".join(f"    {reports[d]['command']}" for d in delays)
    md = ("# Latents arriving late: perplexity by position\n\nRelative perplexity change of the k-th token after "
          "the insertion point (the coprocessor's output computed from x[0..t], inserted after x[t+d] on the anchor "
          "of x[t+d]: under the default `latent_anchor=\"replay\"` the embeddings of x[t+d-N+1 .. t+d]; the base "
          "model scored on the same tokens), 95 % bootstrap interval over sequences.\n\n" + "\n".join(lines)
          + f"\n\nBase perplexity by k:\n{base}\n\nThe paper (App. A.5, Gemma-2 2B, GSM8K accuracy, trained without "
          f"delay) at d = {', '.join(str(d) for d in delays if d in PAPER)}: {paper}.\n\nCommands:\n\n{commands}\n")
    write_file(root / "delay.md", md.encode())
    write_file(root / "delay.json", json.dumps({"ks": ks, "delays": delays, "table": table,
                                                "commands": {d: reports[d]["command"] for d in delays}},
                                               indent=2).encode())
    print(md)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/delay")
