"""Do the overwrite coprocessor's near gain and pause tokens' far gain add up? Both trained modules, stacked.

At each held-out point t the overwrite coprocessor rewrites the last N cache entries of x[0..t], then the trained
pause tokens are appended after them (at the positions and with the text offset they were trained with), and the
frozen decoder reads on. Nothing is trained here: the question is whether the two gains, learned separately, are
complementary (the stack ahead of both at every k) or compete for the same thing. Scored per k like Table 1, with
the stack paired against each part; each part alone is also checked against `dca eval`'s one-pass scoring.

    .venv/bin/python scripts/overwrite_plus_pause.py --overwrite runs/long-cpu-1200/overwrite-n16/adapter \
        --pause runs/long-cpu-1200/pause-n16/adapter --out results/long-cpu/budget-1200/overwrite-plus-pause/wiki
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dca import AugmentedLM
from dca.atomic import write_file
from dca.cache import fork_cache
from dca.eval.evaluate import KS, add_held_out_arguments, bootstrapped_change, held_out_eval_set, perplexity_by_position
from dca.resources import load_model

NAMES = ("overwrite", "pause tokens", "overwrite + pause tokens")


def _losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def losses_at(decoder, overwrite: AugmentedLM, pause: AugmentedLM, seq: torch.Tensor, t: int,
              max_k: int) -> dict[str, torch.Tensor]:
    """NLL of x[t+1 .. t+max_k] ([max_k]) for the frozen decoder and each augmentation of x[0..t]."""
    prompt, text, targets = seq[None, : t + 1], seq[None, t + 1 : t + max_k], seq[t + 1 : t + 1 + max_k]
    frozen = decoder(seq[None, : t + max_k]).logits[0, t:]

    def read_on(cache, mask, first_logits, start):  # the text after the augmentation, from the cache it left
        positions = torch.arange(start, start + text.shape[1])[None]
        out = decoder(text, past_key_values=cache, attention_mask=torch.cat([mask, torch.ones_like(text)], 1),
                      position_ids=positions)
        return _losses(torch.cat([first_logits, out.logits[0]]), targets)

    rewritten, appended = overwrite.augment(prompt), pause.augment(prompt)
    stacked = fork_cache(rewritten.past_key_values)  # the pause tokens go after the rewritten entries, on a copy
    mask = torch.cat([rewritten.attention_mask, torch.ones(1, appended.latents.shape[1], dtype=torch.long)], 1)
    out = decoder(inputs_embeds=appended.latents, past_key_values=stacked, attention_mask=mask,
                  position_ids=appended.latent_position_ids, logits_to_keep=1)
    return {"frozen": _losses(frozen, targets),
            "overwrite": read_on(rewritten.past_key_values, rewritten.attention_mask, rewritten.logits,
                                 int(rewritten.next_position_ids)),
            "pause tokens": read_on(appended.past_key_values, appended.attention_mask, appended.logits,
                                    int(appended.next_position_ids)),
            "overwrite + pause tokens": read_on(stacked, mask, out.logits[:, -1],
                                                int(appended.next_position_ids))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overwrite", required=True, help="a saved coprocessor with latent_positions='overwrite'")
    parser.add_argument("--pause", required=True, help="saved pause tokens")
    add_held_out_arguments(parser, sequences=64)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", required=True, help="folder for overwrite_plus_pause.{json,md}")
    args = parser.parse_args()
    decoder, tokenizer = load_model(args.model)
    overwrite = AugmentedLM.from_pretrained(args.overwrite, decoder).eval()
    pause = AugmentedLM.from_pretrained(args.pause, decoder).eval()
    if overwrite.coprocessor.config.latent_positions != "overwrite" or pause.coprocessor.config.method != "pause":
        parser.error("--overwrite must overwrite and --pause must be pause tokens")
    max_k = max(KS)
    seqs, points = held_out_eval_set(tokenizer, args.data, args.held_out_fraction, args.sequences, args.seq_len,
                                     args.positions, max_k, min_position=args.min_position)
    sums = {name: torch.zeros(len(seqs), max_k) for name in ("frozen", *NAMES)}
    for i in tqdm(range(len(seqs)), desc="sequences"):
        for t in points[i].tolist():
            for name, losses in losses_at(decoder, overwrite, pause, seqs[i], t, max_k).items():
                sums[name][i] += losses
    columns = [k - 1 for k in KS]
    count = torch.full((len(seqs), len(KS)), float(points.shape[1]))
    nll = {name: s[:, columns] for name, s in sums.items()}
    change = {name: bootstrapped_change(nll[name], nll["frozen"], count, args.bootstrap) for name in NAMES}
    paired = {f"{NAMES[2]} vs {b}": bootstrapped_change(nll[NAMES[2]], nll[b], count, args.bootstrap)
              for b in NAMES[:2]}
    # each part alone, scored by dca eval's one-pass machinery on the same points: the per-point loop must agree
    check = {name: perplexity_by_position(model, seqs, points, bootstrap=0).rel_change
             for name, model in zip(NAMES[:2], (overwrite, pause), strict=True)}
    for name, rel in check.items():
        torch.testing.assert_close(torch.tensor(change[name][0]), torch.tensor(rel), rtol=2e-3, atol=2e-4)
    command = ".venv/bin/python " + shlex.join(sys.argv)
    result = {"command": command, "args": vars(args), "points": list(points.shape), "k": list(KS),
              "change": change, "paired": paired, "one_pass_check": check}
    out = Path(args.out)
    write_file(out / "overwrite_plus_pause.json", json.dumps(result, indent=2))

    def cell(triple, i):
        rel, low, high = (100 * v[i] for v in triple)
        bold = "**" if high < 0 else ""
        return f"{bold}{rel:+.2f} % [{low:+.1f}, {high:+.1f}]{bold}"

    table = {**change, **paired}
    lines = ["# The overwrite coprocessor and pause tokens, stacked\n", f"Reproduce: `{command}`\n",
             f"{points.shape[0]} held-out sequences of {args.seq_len} tokens of {args.data}, {points.numel()} points "
             f"at t >= {args.min_position}; relative perplexity change, 95 % bootstrap interval over sequences (bold: "
             "clear of zero, below it); the last two columns pair the stack against each part on the same points. "
             "Each part alone agrees with `dca eval`'s one-pass scoring on these points.\n",
             "| k | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    lines += [f"| {k} | " + " | ".join(cell(v, i) for v in table.values()) + " |" for i, k in enumerate(KS)]
    write_file(out / "overwrite_plus_pause.md", "\n".join(lines) + "\n")
    print("\n".join(lines[-len(KS) - 2:]))


if __name__ == "__main__":
    main()
