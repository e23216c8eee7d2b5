"""Why does Gemma-3-270M re-read duplicated tokens so much worse than SmolLM2-135M? (issue 11, item 3)

Under dca's default mapping an untrained coprocessor appends exact copies of the last N prompt tokens,
at their own positions, after x[t]. In the decoder's first layer a copy has the same key and value as
its original, so a query that put attention mass m on those N tokens now puts 2m / (1 + m) on them and
scales everything else by 1 / (1 + m): the more a model looks at its recent tokens, the more the copies
shift its attention. This measures m, layer by layer, for the query of the first token after the
insertion point (the one scored at k = 1), on held-out Wikipedia, for both models; and the attention on
the first token (the "sink"), which the copies take mass from.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/duplicate_attention.py --bos --out results/duplicate-attention
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dca.atomic import write_figure, write_file
from dca.resources import load_model, load_texts
from dca.training.data import split_texts, tokenize_and_pack


def recent_mass(model_name: str, num_latents: int, sequences: int, seq_len: int, points: list[int],
                bos: bool = False) -> dict:
    model, tokenizer = load_model(model_name)
    model.set_attn_implementation("eager")  # attention weights are only returned by the eager path
    _, held_out = split_texts(load_texts("wiki"), 0.05)
    ids = tokenize_and_pack(held_out, tokenizer, seq_len - bos)[:sequences]
    if bos:  # dca packs documents without a BOS token; Gemma's documentation says its models need one
        ids = torch.cat([torch.full((len(ids), 1), tokenizer.bos_token_id), ids], 1)
    recent, sink = [], []  # per point: [layers] mean over sequences and heads
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    for t in points:  # query of x[t+1]: the first token after an insertion after x[t]
        attn = torch.stack([a[:, :, t + 1, : t + 2] for a in out.attentions])  # [L, B, H, t+2]
        recent.append(attn[..., t + 1 - num_latents: t + 1].sum(-1).mean((1, 2)))
        sink.append(attn[..., 0].mean((1, 2)))
    recent_by_layer = torch.stack(recent).mean(0)
    doubled = 2 * recent_by_layer / (1 + recent_by_layer)
    return {"model": model_name + (" + BOS" if bos else ""), "layers": len(out.attentions), "num_latents": num_latents,
            "recent_mass_by_layer": recent_by_layer.tolist(), "sink_mass_by_layer": torch.stack(sink).mean(0).tolist(),
            "recent_mass_mean": recent_by_layer.mean().item(), "first_layer_after_copies": doubled[0].item(),
            "layer_types": getattr(model.config, "layer_types", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--num-latents", type=int, default=16)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bos", action="store_true", help="also measure with a BOS token at position 0")
    args = parser.parse_args()
    points = list(range(args.num_latents + 8, args.seq_len - 2, 12))
    results = [recent_mass(m, args.num_latents, args.sequences, args.seq_len, points, bos)
               for m in args.models for bos in ((False, True) if args.bos else (False,))]
    args.out.mkdir(parents=True, exist_ok=True)
    write_file(args.out / "duplicate_attention.json", json.dumps(results, indent=2))
    lines = [f"| model | layers | mass on the last {args.num_latents} tokens (mean over layers) | first layer | "
             "first layer, after the copies | max over layers | sink mass (mean) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        by_layer = r["recent_mass_by_layer"]
        lines.append(f"| {r['model']} | {r['layers']} | {r['recent_mass_mean']:.3f} | {by_layer[0]:.3f} | "
                     f"{r['first_layer_after_copies']:.3f} | {max(by_layer):.3f} | "
                     f"{sum(r['sink_mass_by_layer']) / r['layers']:.3f} |")
    write_file(args.out / "duplicate_attention.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(results, args.out / "duplicate_attention.png", args.num_latents)


def _plot(results: list[dict], path: Path, num_latents: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for r in results:
        layers = len(r["recent_mass_by_layer"])
        depth = [i / max(layers - 1, 1) for i in range(layers)]
        ax.plot(depth, r["recent_mass_by_layer"], "o-", ms=3, label=f"{r['model']}: last {num_latents} tokens")
        ax.plot(depth, r["sink_mass_by_layer"], "x--", ms=3, label=f"{r['model']}: first token")
    ax.set_xlabel("layer (0 = first, 1 = last)")
    ax.set_ylabel("attention mass of the k = 1 query")
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_figure(path, fig)


if __name__ == "__main__":
    main()
