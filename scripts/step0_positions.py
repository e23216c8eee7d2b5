"""Feasibility study: where should step-0 latents sit (position ids) and what should they be anchored to?

A straightforward sequential computation, independent of dca.masks / training_loss: for each held-out
augmentation point t (same set as `dca init-study`), run the decoder over x[0..t] into a cache, append N
latents with chosen position ids, then x[t+1 .. t+31] with chosen position ids, and compare the NLL of
x[t+k] with the plain decoder's. Prints the relative perplexity change at k = 1, 2, 4, 8, 16, 32.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/step0_positions.py [variant names, or name prefixes ending in *]

With no filter it runs every variant and writes results/step0-positions/step0_positions_<S>seqs.{json,md}
(with filters: ..._<S>seqs_subset.{json,md})
(S = $NUM_SEQS held-out sequences, default 8 as in init-study; 6 augmentation points each).
Positions: "after" = latents at t+1..t+N, text at t+N+1 (the current layout); "shared" = every latent
at pos(t); "own" = latent i at the position of x[t-N+1+i]. Under shared/own the text resumes at t+1.
Anchors: "dup x_t" = every latent anchored to emb(x_t); "replay" = emb(x[t-N+1+i]); "last only" =
emb(x_t) on the last latent, zeros before. "+ g" = g x the RMS-scaled output of an untrained
coprocessor (soft tokens at the mean embedding unless "sampled soft"; at positions t+1..t+N unless
"cop shared"/"cop own").
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from dca.cache import fork_cache
from dca.config import CoprocessorConfig
from dca.coprocessor import Coprocessor
from dca.eval.evaluate import KS, held_out_eval_set
from dca.resources import load_model

torch.set_grad_enabled(False)
K = max(KS)

decoder, tok = load_model("smollm2-135m")
decoder.eval()
embed = decoder.get_input_embeddings()
NUM_SEQS = int(__import__("os").environ.get("NUM_SEQS", "8"))
seqs, positions = held_out_eval_set(tok, "wiki", 0.05, NUM_SEQS, 192, 6, K)

_coprocessors: dict = {}


def coprocessor_for(n: int, soft_init: str) -> Coprocessor:
    key = (n, soft_init)
    if key not in _coprocessors:
        # unit-RMS-scaled (embed_rms) latents; the gate is applied by the variant
        _coprocessors[key] = Coprocessor(decoder, CoprocessorConfig(num_latents=n, latent_scale="embed_rms",
                                                                    soft_token_init=soft_init)).eval()
    return _coprocessors[key]


def run_variant(v: dict) -> tuple[list[float], list[float]]:
    """Returns per-k mean NLL (augmented) and per-k mean NLL (base), over all groups."""
    n = v.get("n", 16)
    gate = v.get("gate", 0.0)
    anchor = v["anchor"]  # "dup" | "replay" | "last_only" | "none"
    lat_pos_kind = v["lat_pos"]  # "after" | "shared" | "own" (replayed tokens at their own positions)
    text_pos_kind = v.get("text_pos", "after_latents" if lat_pos_kind == "after" else "t+1")
    cop_pos_kind = v.get("cop_pos", "after")  # coprocessor soft-token positions: "after" | "shared" | "own"
    soft_init = v.get("soft_init", "vocab_mean")
    aug_sum = torch.zeros(K, dtype=torch.float64)
    base_sum = torch.zeros(K, dtype=torch.float64)
    count = 0
    for s in range(len(seqs)):
        x = seqs[s : s + 1]
        base_logits = decoder(input_ids=x).logits[0].float()  # [T, V]
        base_nll = F.cross_entropy(base_logits[:-1], x[0, 1:], reduction="none")  # predicts x[i+1] at i
        for t in positions[s].tolist():
            prefix = x[:, : t + 1]
            cache = DynamicCache()
            decoder(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
            ids = torch.arange(t - n + 1, t + 1).clamp(min=0)
            if anchor == "dup":
                anc = embed(x[:, t]).expand(n, -1)[None]
            elif anchor == "replay":
                anc = embed(x[0, ids])[None]
            elif anchor == "last_only":
                anc = embed(x[0, ids])[None] * (torch.arange(n) == n - 1)[None, :, None]
            elif anchor == "none":
                anc = torch.zeros(1, n, embed.weight.shape[1])
            else:
                raise ValueError(anchor)
            lat = anc
            if gate != 0.0:
                cop = coprocessor_for(n, soft_init)
                cpos = {"after": torch.arange(t + 1, t + 1 + n), "shared": torch.full((n,), t),
                        "own": ids.clone()}[cop_pos_kind][None]
                out = cop(fork_cache(cache), torch.ones(1, t + 1 + n, dtype=torch.long), cpos)
                lat = anc + gate * out
            if lat_pos_kind == "after":
                lpos = torch.arange(t + 1, t + 1 + n)
            elif lat_pos_kind == "shared":
                lpos = torch.full((n,), t)
            elif lat_pos_kind == "own":
                lpos = ids.clone()
            else:
                raise ValueError(lat_pos_kind)
            text_start = t + 1 + n if text_pos_kind == "after_latents" else t + 1
            lo = decoder(inputs_embeds=lat, position_ids=lpos[None], past_key_values=cache, use_cache=True,
                         attention_mask=torch.ones(1, t + 1 + n, dtype=torch.long), logits_to_keep=1)
            cont = x[:, t + 1 : t + K]  # x[t+1 .. t+31] predicts x[t+2 .. t+32]
            co = decoder(input_ids=cont, position_ids=torch.arange(text_start, text_start + K - 1)[None],
                         attention_mask=torch.ones(1, t + 1 + n + K - 1, dtype=torch.long),
                         past_key_values=cache, use_cache=True)
            logits = torch.cat([lo.logits[0, -1:], co.logits[0]], 0).float()
            targets = x[0, t + 1 : t + 1 + K]
            aug_sum += F.cross_entropy(logits, targets, reduction="none").double()
            base_sum += base_nll[t : t + K].double()
            count += 1
    return (aug_sum / count).tolist(), (base_sum / count).tolist()


VARIANTS = {
    # reproduce the current init-study rows with this independent computation
    "after: replay, gate 0": dict(anchor="replay", lat_pos="after"),
    "after: replay + 0.1 (mean soft)": dict(anchor="replay", lat_pos="after", gate=0.1),
    "after: dup x_t, gate 0": dict(anchor="dup", lat_pos="after"),
    # the idea: latents at pos(t), text resumes at pos(t)+1
    "shared: dup x_t, gate 0": dict(anchor="dup", lat_pos="shared"),
    "shared: dup x_t + 0.1": dict(anchor="dup", lat_pos="shared", gate=0.1),
    "shared: dup x_t + 0.1, cop shared": dict(anchor="dup", lat_pos="shared", gate=0.1, cop_pos="shared"),
    "shared: dup x_t + 0.3": dict(anchor="dup", lat_pos="shared", gate=0.3),
    "shared: last only (zeros before), gate 0": dict(anchor="last_only", lat_pos="shared"),
    "shared: last only + 0.1": dict(anchor="last_only", lat_pos="shared", gate=0.1),
    "shared: replay, gate 0": dict(anchor="replay", lat_pos="shared"),
    "shared: replay + 0.1": dict(anchor="replay", lat_pos="shared", gate=0.1),
    "own: replay at own positions, gate 0": dict(anchor="replay", lat_pos="own"),
    "own: replay at own positions + 0.1": dict(anchor="replay", lat_pos="own", gate=0.1),
    "own: replay at own positions + 0.1, cop own": dict(anchor="replay", lat_pos="own", gate=0.1, cop_pos="own"),
    "own: replay at own positions + 0.05": dict(anchor="replay", lat_pos="own", gate=0.05),
    "own: replay at own positions + 0.05, cop own": dict(anchor="replay", lat_pos="own", gate=0.05, cop_pos="own"),
    "own: replay at own positions + 0.02, cop own": dict(anchor="replay", lat_pos="own", gate=0.02, cop_pos="own"),
    "own: replay at own positions + 0.3": dict(anchor="replay", lat_pos="own", gate=0.3),
    "own: replay at own positions + 0.1, sampled soft": dict(anchor="replay", lat_pos="own", gate=0.1,
                                                              soft_init="vocab_sample"),
    "own: replay at own positions, gate 0, N=4": dict(anchor="replay", lat_pos="own", n=4),
    "own: replay at own positions + 0.1, N=4": dict(anchor="replay", lat_pos="own", gate=0.1, n=4),
    "own: replay at own positions, gate 0, N=64": dict(anchor="replay", lat_pos="own", n=64),
    "own: replay at own positions + 0.1, N=64": dict(anchor="replay", lat_pos="own", gate=0.1, n=64),
    "shared: zero latents (gate 0)": dict(anchor="none", lat_pos="shared"),
    "shared: dup x_t, gate 0, N=4": dict(anchor="dup", lat_pos="shared", n=4),
    "shared: dup x_t + 0.1, N=4": dict(anchor="dup", lat_pos="shared", gate=0.1, n=4),
    "shared: dup x_t, gate 0, N=64": dict(anchor="dup", lat_pos="shared", n=64),
    "shared: dup x_t + 0.1, N=64": dict(anchor="dup", lat_pos="shared", gate=0.1, n=64),
}

if __name__ == "__main__":
    only = sys.argv[1:]
    results = {}
    rows = ["| variant (positions of latents, anchor, gate) | " + " | ".join(f"k={k}" for k in KS) + " |",
            "|---|" + "---|" * len(KS)]
    print("\n".join(rows))
    for name, v in VARIANTS.items():
        if only and not any(name == o or (o.endswith("*") and name.startswith(o[:-1])) for o in only):
            continue
        t0 = time.time()
        aug, base = run_variant(v)
        rel = [math.exp(aug[k - 1] - base[k - 1]) - 1 for k in KS]
        results[name] = {"variant": v, "rel_change": rel, "aug_nll": aug, "base_nll": base}
        rows.append(f"| {name} | " + " | ".join(f"{100 * r:+.1f}%" for r in rel) + " |")
        print(rows[-1] + f"  ({time.time() - t0:.0f}s)", flush=True)
    out = Path("results/step0-positions")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"step0_positions_{NUM_SEQS}seqs" + ("_subset" if only else "")
    if results:
        (out / f"{stem}.json").write_text(json.dumps({"sequences": NUM_SEQS, "results": results}, indent=2))
        (out / f"{stem}.md").write_text("\n".join(rows) + "\n")
