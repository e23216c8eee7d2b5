"""Where the text after an augmentation point looks: the attention mass on the N latent cache entries, by k.

For each held-out point t, each coprocessor augments x[0..t]; the decoder then reads x[t+1 ..] from that cache with
eager attention, and the mass each query puts on the latents' entries (mean over heads and layers) is recorded by the
token it predicts, k = 2 .. max_k (k = 1 is predicted from the last latent itself). The frozen decoder's row is the
mass on the entries of the last N prompt tokens: what "overwrite" replaces, and where appended latents would sit.

    .venv/bin/python scripts/latent_attention.py --coprocessors runs/a/adapter runs/b/adapter --out results/x
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import matplotlib
import torch

from dca import AugmentedLM
from dca.atomic import write_figure, write_file
from dca.eval.eval_suite import coprocessor_labels
from dca.eval.evaluate import add_held_out_arguments, held_out_eval_set
from dca.resources import load_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def mass_on(attentions: tuple[torch.Tensor, ...], keys: slice) -> torch.Tensor:
    """[layers, queries]: each query's attention mass on `keys`, averaged over heads (batch of one)."""
    return torch.stack([a[0, :, :, keys].sum(-1).mean(0) for a in attentions])


@torch.no_grad()
def latent_mass(model: AugmentedLM | None, decoder, seq: torch.Tensor, t: int, n: int, max_k: int) -> torch.Tensor:
    """[layers, max_k - 1]: mass on the latents (or, for the frozen decoder, on the last n prompt entries)."""
    prompt, after = seq[None, : t + 1], seq[None, t + 1 : t + max_k]
    if model is None:
        cache = decoder(prompt, use_cache=True).past_key_values
        mask, start, keys = torch.ones(1, t + 1, dtype=torch.long), t + 1, slice(t + 1 - n, t + 1)
    else:
        out = model.augment(prompt)
        cache, mask, start = out.past_key_values, out.attention_mask, int(out.next_position_ids)
        entries = mask.shape[1]
        keys = slice(entries - n, entries)  # under either layout the latents are the cache's last n entries
    positions = torch.arange(start, start + after.shape[1])[None]
    mask = torch.cat([mask, torch.ones_like(after)], dim=1)
    out = decoder(after, past_key_values=cache, attention_mask=mask, position_ids=positions, output_attentions=True)
    return mass_on(out.attentions, keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coprocessors", nargs="+", help="LABEL=FOLDER of saved coprocessors")
    add_held_out_arguments(parser, sequences=32)
    parser.add_argument("--max-k", type=int, default=32)
    parser.add_argument("--out", required=True, help="folder for latent_attention.{json,md,png}")
    parser.add_argument("--replot", action="store_true", help="redraw the table and plot from the JSON in --out")
    args = parser.parse_args()
    if args.replot:
        return report(json.loads((Path(args.out) / "latent_attention.json").read_text()), Path(args.out))
    if not args.coprocessors:
        parser.error("--coprocessors is required (unless --replot)")
    decoder, tokenizer = load_model(args.model)
    decoder.set_attn_implementation("eager")  # the only implementation that returns attention weights
    seqs, points = held_out_eval_set(tokenizer, args.data, args.held_out_fraction, args.sequences, args.seq_len,
                                     args.positions, args.max_k, min_position=args.min_position)
    models: dict[str, AugmentedLM] = {}
    for spec in args.coprocessors:
        label, _, folder = spec.rpartition("=")
        models[label or coprocessor_labels([folder])[0]] = AugmentedLM.from_pretrained(folder, decoder).eval()
    n = {label: m.coprocessor.config.num_latents for label, m in models.items()}
    rows: dict[str, torch.Tensor] = {}
    for label, model in [("frozen decoder (last N prompt entries)", None), *models.items()]:
        width = n[label] if model is not None else max(n.values())
        masses = [latent_mass(model, decoder, seq, int(t), width, args.max_k)
                  for seq, ts in zip(seqs, points, strict=True) for t in ts]
        rows[label] = torch.stack(masses).mean(0)  # [layers, max_k - 1]
        print(f"{label}: mean mass {100 * rows[label].mean():.1f} %", flush=True)
    ks = list(range(2, args.max_k + 1))
    command = ".venv/bin/python " + shlex.join(sys.argv)
    result = {"command": command, "args": vars(args), "points": [len(seqs), points.shape[1]], "k": ks, "mass": {
        label: {"by_k": mass.mean(0).tolist(), "by_layer_and_k": mass.tolist()} for label, mass in rows.items()}}
    write_file(Path(args.out) / "latent_attention.json", json.dumps(result, indent=2))
    report(result, Path(args.out))


def report(result: dict, out: Path) -> None:
    """latent_attention.md (a table at k = 2, 4, 8, 16, 32) and .png (by k; by layer at k >= 16) from the JSON."""
    ks, rows, args = result["k"], result["mass"], result["args"]
    shown = [k for k in (2, 4, 8, 16, 32) if k in ks]
    lines = [f"# Attention mass on the latents, by k\n\nReproduce: `{result['command']}`\n",
             f"{result['points'][0]} sequences x {result['points'][1]} points at t >= {args['min_position']} of "
             f"{args['data']}; mean over heads and layers, in % of each query's attention\n",
             "| k | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    lines += [f"| {k} | " + " | ".join(f"{100 * r['by_k'][ks.index(k)]:.1f}" for r in rows.values()) + " |"
              for k in shown]
    write_file(out / "latent_attention.md", "\n".join(lines) + "\n")
    fig, (by_k, by_layer) = plt.subplots(1, 2, figsize=(12, 4.5))
    far = [i for i, k in enumerate(ks) if k >= 16] or list(range(len(ks)))
    for label, r in rows.items():
        by_k.plot(ks, [100 * m for m in r["by_k"]], marker=".", label=label)
        by_layer.plot([100 * sum(layer[i] for i in far) / len(far) for layer in r["by_layer_and_k"]], marker=".",
                      label=label)
    by_k.set(xlabel="k (the token predicted)", ylabel="attention mass on the latents, %", xscale="log",
             title=f"by k (mean over layers), {args['data']}")
    by_k.set_xticks(shown, [str(k) for k in shown])
    by_k.minorticks_off()
    by_layer.set(xlabel="decoder layer", ylabel="%", title=f"by layer, k = {ks[far[0]]} .. {ks[far[-1]]}")
    by_k.legend(fontsize="small")
    fig.tight_layout()
    write_figure(out / "latent_attention.png", fig)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
