"""`dca init-study`: how much does an *untrained* coprocessor hurt, for each way of writing latents?

Feeding the coprocessor's final hidden states to the decoder as input embeddings makes the next
token 10^5 times less likely at step 0; a user would wait hours for training to merely undo that.
This study measures the alternatives (`latent_scale`, `latent_anchor`, `gate_init`, soft-token
init, `latent_positions`) by the Table 1 protocol at step 0, on held-out text, and writes a table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dca.atomic import write_file
from dca.checks import check_data_source, check_int, check_model_source, check_number, check_writable_dir
from dca.config import PAPER_FIELDS, CoprocessorConfig, earliest_point, help_meta
from dca.errors import ArgumentError
from dca.eval.evaluate import KS, held_out_eval_set, perplexity_by_position
from dca.model import AugmentedLM
from dca.resources import load_model

# Every variant is spelled out against this fixed base, not against CoprocessorConfig's defaults: the
# defaults moved (to the replay anchor with a 0.1 gate) after the study was written, which silently
# turned every row into a different mapping than its name says.
BASE: dict = {"latent_scale": "embed_rms", "latent_anchor": "none", "gate_init": 0.0,
              "soft_token_init": "vocab_sample", "latent_positions": "after"}

VARIANTS: dict[str, dict] = {
    "paper preset": {**PAPER_FIELDS, "soft_token_init": "vocab_mean"},  # CoprocessorConfig.paper(), field by field
    "hidden states as embeddings (naive)": {"latent_scale": "none"},
    "rescaled to embedding RMS": {"latent_scale": "embed_rms"},
    "rescaled, read before final norm": {"latent_scale": "embed_rms", "latent_source": "pre_norm"},
    "zero latents (gate 0)": {"latent_scale": "gated", "gate_init": 0.0},
    "last token, zeros before (gate 0)": {"latent_scale": "gated", "latent_anchor": "last_token"},
    "last token + 0.1 x latents": {"latent_scale": "gated", "latent_anchor": "last_token", "gate_init": 0.1},
    "replay last N tokens (gate 0)": {"latent_scale": "gated", "latent_anchor": "replay"},
    "replay + 0.1 x latents": {"latent_scale": "gated", "latent_anchor": "replay", "gate_init": 0.1},
    "replay + 0.3 x latents": {"latent_scale": "gated", "latent_anchor": "replay", "gate_init": 0.3},
    "replay + 0.1 x latents, mean soft tokens": {"latent_scale": "gated", "latent_anchor": "replay",
                                                 "gate_init": 0.1, "soft_token_init": "vocab_mean"},
    "all at pos(t): replay + 0.1 x latents": {"latent_scale": "gated", "latent_anchor": "replay", "gate_init": 0.1,
                                              "soft_token_init": "vocab_mean", "latent_positions": "shared"},
    "replay at own positions (gate 0)": {"latent_scale": "gated", "latent_anchor": "replay", "gate_init": 0.0,
                                         "latent_positions": "replay"},
    "replay at own positions + 0.05 x latents": {"latent_scale": "gated", "latent_anchor": "replay",
                                                 "gate_init": 0.05, "soft_token_init": "vocab_mean",
                                                 "latent_positions": "replay"},
    "replay at own positions + 0.1 x latents": {"latent_scale": "gated", "latent_anchor": "replay",
                                                "gate_init": 0.1, "soft_token_init": "vocab_mean",
                                                "latent_positions": "replay"},
    # issue 11: no duplicates -- only the last latent re-reads x[t] (at pos(t)); the N-1 before it are zero
    # embeddings, so N changes the number of latents and nothing else
    "last token at pos(t), zeros before at their own positions (gate 0)": {
        "latent_scale": "gated", "latent_anchor": "last_token", "latent_positions": "replay"},
    "last token at pos(t), zeros before at pos(t) (gate 0)": {
        "latent_scale": "gated", "latent_anchor": "last_token", "latent_positions": "shared"},
    # issue 11: no duplicates -- the latents replace the cache entries of x[t-N+1 .. t] (at gate 0: an exact no-op)
    "overwrite last N tokens (gate 0)": {"latent_scale": "gated", "latent_anchor": "replay",
                                         "latent_positions": "overwrite"},
    "overwrite last N tokens + 0.1 x latents": {"latent_scale": "gated", "latent_anchor": "replay", "gate_init": 0.1,
                                                "soft_token_init": "vocab_mean", "latent_positions": "overwrite"},
}


@dataclass
class InitStudyArgs:
    """Arguments of `dca init-study`."""

    model: str = field(default="smollm2-135m", metadata=help_meta("builtin name, local folder or hub name"))
    data: str = field(default="wiki", metadata=help_meta("corpus; its held-out split is used"))
    num_latents: int = field(default=16, metadata=help_meta("N"))
    sequences: int = field(default=8, metadata=help_meta("held-out sequences"))
    seq_len: int = field(default=192, metadata=help_meta("tokens per sequence"))
    positions: int = field(default=6, metadata=help_meta("augmentation points per sequence"))
    min_position: int | None = field(default=None, metadata=help_meta(
        "earliest augmentation point (default: N-1 when an 'overwrite' variant is measured, where every latent "
        "replaces a real token, else 0); every variant is measured at the same points"))
    held_out_fraction: float = field(default=0.05, metadata=help_meta("as in dca train"))
    variants: list[str] = field(default_factory=list, metadata=help_meta("names of the mappings to measure "
                                                                           "(default: all of VARIANTS)"))
    out: str = field(default="results/init-study", metadata=help_meta("folder for JSON and markdown"))

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ArgumentError("variants", f"has unknown names {unknown}; known: {list(VARIANTS)}")
        for name in ("num_latents", "sequences", "positions"):
            check_int(name, getattr(self, name))
        check_int("seq_len", self.seq_len, minimum=2)
        check_number("held_out_fraction", self.held_out_fraction, low=0, high=1, low_open=True)
        if self.min_position is not None:
            check_int("min_position", self.min_position, minimum=0)

    def measured(self) -> list[str]:
        """The variants to measure, in VARIANTS' order."""
        return [name for name in VARIANTS if not self.variants or name in self.variants]

    def config(self, name: str) -> CoprocessorConfig:
        """Variant `name` as a configuration: BASE with its overrides, N latents."""
        return CoprocessorConfig(num_latents=self.num_latents, num_ahead=max(KS), **{**BASE, **VARIANTS[name]})

    def first_position(self) -> int:
        """The earliest augmentation point: `min_position`, or N-1 if a measured variant overwrites (else 0)."""
        return earliest_point(self.min_position, [self.config(name) for name in self.measured()])


def run_init_study(args: InitStudyArgs) -> dict:
    check_model_source("model", args.model)
    check_data_source("data", args.data)
    check_writable_dir("out", args.out)
    decoder, tokenizer = load_model(args.model)
    seqs, positions = held_out_eval_set(tokenizer, args.data, args.held_out_fraction, args.sequences, args.seq_len,
                                        args.positions, max(KS), min_position=args.first_position())
    results = {}
    for name in args.measured():
        model = AugmentedLM.from_decoder(decoder, args.config(name))
        report = perplexity_by_position(model, seqs, positions, bootstrap=200)
        results[name] = {"config": {**BASE, **VARIANTS[name]}, **report.to_dict()}
        print(f"{name:45s} " + " ".join(f"{100 * r:+10.1f}%" for r in report.rel_change), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "init_study.json", json.dumps({"args": vars(args), "first_position": args.first_position(),
                                                   "results": results}, indent=2))
    header = "| latents at step 0 | " + " | ".join(f"k={k}" for k in KS) + " |"
    rows = [header, "|---|" + "---|" * len(KS)]
    for name, r in results.items():
        rows.append(f"| {name} | " + " | ".join(f"{100 * v:+.1f}%" for v in r["rel_change"]) + " |")
    write_file(out / "init_study.md", "\n".join(rows) + "\n")
    print("\n".join(rows))
    return results
