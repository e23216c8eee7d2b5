"""The testbed's report: 95 % intervals over seeds, paired differences, markdown and the accuracy-vs-N plot."""

from __future__ import annotations

import math
from pathlib import Path

from dca.atomic import write_figure
from dca.studies.testbed.tasks import CHANCE

# two-sided 95 % quantiles of Student's t by degrees of freedom (no scipy dependency)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
SWEEP = (1, 4, 16)
PAIRS = (("dca-16", "pause-16"), ("paper-16", "pause-16"), ("dca-16", "frozen"), ("paper-16", "frozen"),
         ("dca-16", "dca-1"), ("paper-16", "paper-1"), ("lora", "frozen"), ("dca-16", "lora"))


def interval(values: list[float]) -> dict:
    """Mean and 95 % t-interval over seeds (a single seed has no interval)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def summarise(runs: list[dict]) -> dict:
    """Per variant: accuracy interval over seeds, mean cost; paired differences by seed."""
    variants: dict[str, dict] = {}
    for run in runs:
        for name, result in run["variants"].items():
            entry = variants.setdefault(name, {"accuracy": [], "by_difficulty": {}, "train_seconds": [],
                                               "latency_ms": [], "trainable_params": result["trainable_params"]})
            entry["accuracy"].append(result["accuracy"])
            entry["train_seconds"].append(result["train_seconds"])
            entry["latency_ms"].append(result["latency_ms"])
            for k, v in result["by_difficulty"].items():
                entry["by_difficulty"].setdefault(k, []).append(v)
    summary = {name: {"accuracy": interval(e["accuracy"]), "per_seed": e["accuracy"],
                      "by_difficulty": {k: sum(v) / len(v) for k, v in e["by_difficulty"].items()},
                      "train_seconds": sum(e["train_seconds"]) / len(e["train_seconds"]),
                      "latency_ms": sum(e["latency_ms"]) / len(e["latency_ms"]),
                      "trainable_params": e["trainable_params"]} for name, e in variants.items()}
    pairs = {}
    for a, b in PAIRS:
        if a in variants and b in variants:
            diffs = [x - y for x, y in zip(variants[a]["accuracy"], variants[b]["accuracy"], strict=True)]
            pairs[f"{a} - {b}"] = interval(diffs)
    return {"variants": summary, "paired_differences": pairs}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ci(stat: dict, signed: bool = False) -> str:
    """An accuracy's interval is shown clipped to [0, 100] %; a difference's as it is."""
    mean = f"{100 * stat['mean']:+.1f}" if signed else _pct(stat["mean"])
    if stat["low"] is None:
        return mean
    low, high = (stat["low"], stat["high"]) if signed else (max(0.0, stat["low"]), min(1.0, stat["high"]))
    return f"{mean} [{_pct(low)}, {_pct(high)}]"


def markdown(task: str, summary: dict, runs: list[dict]) -> str:
    pre = [r["pretrained"] for r in runs]
    lines = [f"### Task `{task}`\n",
             "Pretrained decoder (frozen from here on), mean over seeds: train accuracy "
             f"{_pct(sum(p['train_accuracy'] for p in pre) / len(pre))} %, test accuracy "
             f"{_pct(sum(p['test_accuracy'] for p in pre) / len(pre))} %, "
             f"{pre[0]['steps']} steps ({sum(p['seconds'] for p in pre) / len(pre):.0f} s).\n",
             "| variant | trainable params | test accuracy % [95 % CI] | per seed | by difficulty % | "
             "train s | latency ms |", "|---|---|---|---|---|---|---|"]
    for name, v in summary["variants"].items():
        seeds = ", ".join(_pct(a) for a in v["per_seed"])
        by = " / ".join(f"{k}: {_pct(a)}" for k, a in v["by_difficulty"].items())
        lines.append(f"| {name} | {v['trainable_params']:,} | {_ci(v['accuracy'])} | {seeds} | {by} | "
                     f"{v['train_seconds']:.1f} | {v['latency_ms']:.1f} |")
    lines += ["", "Paired differences (same seed), accuracy points [95 % CI]:", "",
              "| comparison | difference |", "|---|---|"]
    lines += [f"| {name} | {_ci(stat, signed=True)} |" for name, stat in summary["paired_differences"].items()]
    return "\n".join(lines) + "\n"


def plot(summaries: dict[str, dict], path: Path) -> None:
    """Accuracy against N for both coprocessor configs, with pause tokens and the baselines beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5.6 * len(summaries), 4.2), squeeze=False)
    for ax, (task, summary) in zip(axes[0], summaries.items(), strict=True):
        variants = summary["variants"]

        def bars(names: list[str], variants: dict = variants) -> tuple[list[float], list[list[float]]]:
            stats = [variants[n]["accuracy"] for n in names]
            means = [100 * s["mean"] for s in stats]
            low = [max(0.0, s["low"]) if s["low"] is not None else s["mean"] for s in stats]
            high = [min(1.0, s["high"]) if s["high"] is not None else s["mean"] for s in stats]
            err = [[100 * (s["mean"] - lo) for s, lo in zip(stats, low, strict=True)],
                   [100 * (hi - s["mean"]) for s, hi in zip(stats, high, strict=True)]]
            return means, err

        for kind, marker in (("dca", "o"), ("paper", "s")):
            names = [f"{kind}-{n}" for n in SWEEP if f"{kind}-{n}" in variants]
            means, err = bars(names)
            ax.errorbar([int(n.split("-")[1]) for n in names], means, yerr=err, marker=marker, capsize=3,
                        label=f"coprocessor ({kind} config)")
        if "pause-16" in variants:
            means, err = bars(["pause-16"])
            ax.errorbar([16], means, yerr=err, marker="^", color="gray", capsize=3, linestyle="none",
                        label="pause tokens")
        for name, style in (("frozen", ":"), ("lora", "--"), ("scratchpad", "-.")):
            if name in variants:
                ax.axhline(100 * variants[name]["accuracy"]["mean"], linestyle=style, color="black",
                           linewidth=0.9, label=name)
        if task in CHANCE:
            ax.axhline(100 * CHANCE[task], color="red", linewidth=0.6, alpha=0.6, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(SWEEP), [str(n) for n in SWEEP])
        ax.set_xlabel("N, latents (pause tokens: 16)")
        ax.set_ylabel("test answer accuracy (%)")
        ax.set_title(f"task {task}: mean of seeds, 95 % CI", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_figure(path, fig)
