"""`CoprocessorConfig`: every choice that shapes a coprocessor, validated at construction.

PAPER.md leaves several choices to the implementer; each one is a field here, so it is written down
with the trained adapter and can be measured rather than guessed:

* ``soft_token_attention`` -- soft tokens attend to each other causally (like any decoder) or fully.
* ``latent_source`` -- latents are the coprocessor's hidden states after its final norm, or before it.
* ``latent_scale`` / ``latent_anchor`` / ``gate_init`` -- how latents are mapped into the decoder's
  input-embedding space, and what an untrained coprocessor writes there.
* ``soft_token_init`` -- what the trainable soft tokens start as.
* ``latent_positions`` -- the position ids of the latents (and soft tokens), and where the text
  after them resumes: latents at t+1 .. t+N and text at t+N+1 (``"after"``, what the unchanged
  decoder does when it simply continues from an augmented cache), or latents that consume no
  position (``"shared"``, ``"replay"``) and text at t+1; or latents that replace the cache entries of
  x[t-N+1 .. t] at those tokens' positions (``"overwrite"``: no duplicates, and text at t+1).
* ``num_overwritten`` -- under "overwrite", how many latents replace tokens; the rest are appended after t
  (``appended_at="point"``) or before the rewritten tokens (``"window"``).

Two presets: `CoprocessorConfig.paper()` is the paper's literal method (latents are the coprocessor's
final states after its final norm, written as they are at t+1 .. t+N, weights from the decoder);
`CoprocessorConfig.dca()` is dca's own default (those states rescaled and gated on top of a replay
of the last N prompt tokens, in place of those tokens' cache entries), chosen because an untrained one is
exactly the frozen decoder.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from dca.checks import check_choice, check_int, check_literal_fields, check_number
from dca.errors import ArgumentError

Method = Literal["coprocessor", "pause"]
Init = Literal["decoder", "scratch"]
SoftTokenAttention = Literal["causal", "full"]
LatentSource = Literal["final_norm", "pre_norm"]
LatentScale = Literal["none", "embed_rms", "learned", "gated"]
SoftTokenInit = Literal["vocab_sample", "vocab_mean", "normal"]
LatentAnchor = Literal["none", "last_token", "replay"]
LatentPositions = Literal["after", "shared", "replay", "overwrite"]  # dca.masks lays each out
AppendedAt = Literal["point", "window"]  # where "overwrite"'s N - R appended latents go: after x[t], or before x[t-R+1]
Preset = Literal["dca", "paper"]
METHODS, LATENT_SOURCES, LATENT_POSITIONS, PRESETS = map(get_args, (Method, LatentSource, LatentPositions, Preset))
# The paper's literal method, field by field: dca's defaults differ in latent_scale, latent_anchor, latent_positions
PAPER_FIELDS: dict[str, Any] = {"latent_source": "final_norm", "latent_scale": "none", "latent_anchor": "none",
                                "latent_positions": "after", "init": "decoder"}


def help_meta(help_text: str) -> dict[str, Any]:
    """Dataclass field metadata that `dca.cli` turns into an argument's help (a ``Literal`` field's annotation gives
    its choices)."""
    return {"help": help_text}


def legacy_meta(value: object) -> dict[str, object]:
    """Field metadata of an option added after runs and adapters existed: at `value` (what those did) it is left out
    of a run's identity and of a saved config, so that they resume and compare as before."""
    return {"legacy": value}


def drop_legacy(instance: Any, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (fields of the dataclass `instance`) without those at their `legacy_meta` value."""
    legacy = {f.name: f.metadata["legacy"] for f in dataclasses.fields(instance) if "legacy" in f.metadata}
    return {k: v for k, v in data.items() if not (k in legacy and v == legacy[k])}


@dataclass
class CoprocessorConfig:
    """How the coprocessor is built and what it feeds the frozen decoder.

    Attributes:
        method: ``"coprocessor"`` (the method) or ``"pause"``: the paper's pause-token baseline (its
            Table 3), N trainable input-independent embeddings written after the prompt. A pause
            "coprocessor" has no transformer: its latents are its soft tokens, so the fields about
            weights and latent mapping (init, lora_*, soft_token_attention, latent_*, gate_init)
            do not apply to it.
        num_latents: N, latent embeddings written into the cache per augmentation.
        num_ahead: A, teacher-forced tokens after each augmentation point that carry the loss.
        init: ``"decoder"`` copies the decoder's weights (the paper's default), ``"scratch"``
            initialises the same architecture randomly (the paper's ablation).
        lora_rank: if set, the coprocessor is the decoder's weights plus a peft LoRA adapter of this
            rank (the base weights are shared with the frozen decoder, not copied).
        lora_alpha: LoRA scaling numerator; defaults to ``2 * lora_rank``.
        lora_target_modules: peft ``target_modules``; ``"all-linear"`` adapts every linear layer.
        soft_token_attention: ``"causal"`` or ``"full"`` attention among the N soft tokens.
        latent_source: read latents after the coprocessor's final norm or just before it.
        latent_scale: ``"none"`` feeds hidden states as they are; ``"embed_rms"`` rescales each
            latent to the RMS of the decoder's token embeddings (each token's RMS, as the embedding
            layer scales it, averaged over the vocabulary); ``"learned"`` does the same and
            then multiplies by a trainable per-channel gain initialised at 1; ``"gated"`` multiplies
            the ``"embed_rms"`` latents by a trainable scalar gate initialised at ``gate_init``.
        latent_anchor: what the coprocessor's output is added to. ``"none"``: nothing;
            ``"last_token"``: the embedding of x[t] on the last latent (zeros on the others);
            ``"replay"``: the embeddings of the last N prompt tokens x[t-N+1 .. t] (clamped at the
            first token). Latents inserted late, after x[s] (asynchronous augmentation, training
            with delays), take the anchor of s: x[s-N+1 .. s], x[s]. With ``latent_positions="replay"``
            and ``gate_init=0`` (the defaults) an untrained coprocessor makes the decoder re-read its
            last N tokens in place: far less harm than other mappings, but not none (README, "Start
            without doing harm": on SmolLM2-135M, N=8, +5.8 % at k=2 with an interval above zero; on
            Gemma-3-270M, N=16, +4.9 % at k=1 and +5.7 % at k=32, where it was +71 % at k=1 before
            sequences started with Gemma's BOS token).
        gate_init: initial value of the trainable scalar gate of ``latent_scale="gated"``. At 0 only
            the gate learns in the first step; the coprocessor is trained from the second on.
        soft_token_init: ``"vocab_sample"`` copies N random rows of the embedding table,
            ``"vocab_mean"`` starts all soft tokens at the mean embedding (plus tiny noise),
            ``"normal"`` draws them with the embedding table's standard deviation.
        init_seed: seeds the soft-token (and scratch-weight) initialisation.
        latent_positions: position ids of the N latents after token t, used alike by the soft
            tokens in the coprocessor and by the latents in the decoder. ``"after"``: t+1 .. t+N,
            and the text resumes at t+N+1. ``"shared"``: all at pos(t). ``"replay"``: latent i at the
            position of x[t-N+1+i], the token it replays under ``latent_anchor="replay"`` (so with
            a zero gate the latents are exact copies of the last N prompt tokens, at their own
            positions). Under "shared" and "replay" the text resumes at pos(t)+1: the latents take
            N cache entries but no positions (an untrained "replay" coprocessor re-reads its last N tokens
            in place: small harm, measured in README, "Start without doing harm"). Unset, it is
            ``"overwrite"`` for a coprocessor with the replay anchor and ``"after"`` otherwise -- pause
            tokens sit between prompt and answer, as in the paper. Configs saved before this field existed
            load as ``"after"``, what they were trained with.
            ``"overwrite"`` (the default): latent i at the position of x[t-N+1+i], as "replay", but its
            cache entry *replaces* that token's: the decoder sees x[0..t-N] and the N latents, never the
            originals of x[t-N+1 .. t], and the text resumes at pos(t)+1 (the coprocessor still reads all of
            x[0..t]). With the replay anchor and ``gate_init=0`` the latents are the embeddings of those tokens
            at their own positions and cache slots, so an untrained coprocessor is an exact no-op on any model
            and for any N, and no token is read twice. A point with r < N real tokens up to it (a prompt shorter
            than N, at inference and in training) keeps only the last r latents; `dca train` samples t >= N-1 by
            default (`first_position`). Pause tokens are refused
            (they would erase the last N tokens and carry nothing of them).
        num_overwritten: under "overwrite", R <= N: only R latents replace x[t-R+1 .. t]; the other N - R are
            appended, each with a trainable offset of its own (from zero) in place of an anchor.
        appended_at: where those N - R go. ``"point"``: after the R, at pos(t)+1 .. pos(t)+N-R (the text
            resumes after them). ``"window"``: before the R, as if N - R entries were inserted before x[t-R+1]:
            they sit at the R's first N - R positions and the R (and the text) move N - R positions on, so the
            last latent is still the one in place of x[t] and the text is as near it as under R = N.
    """

    method: Method = field(default="coprocessor", metadata=help_meta("coprocessor, or the pause-token baseline"))
    num_latents: int = field(default=16, metadata=help_meta("N, latents per augmentation"))
    num_ahead: int = field(default=16, metadata=help_meta("A, ahead tokens scored after each augmentation"))
    init: Init = field(default="decoder", metadata=help_meta("coprocessor weights at start"))
    lora_rank: int | None = field(default=None, metadata=help_meta("LoRA rank (unset: train the full coprocessor)"))
    lora_alpha: float | None = field(default=None, metadata=help_meta("LoRA alpha (default 2 x rank)"))
    lora_target_modules: str | list[str] = field(default="all-linear", metadata=help_meta("peft target_modules"))
    soft_token_attention: SoftTokenAttention = field(default="causal", metadata=help_meta("among soft tokens"))
    latent_source: LatentSource = field(default="final_norm", metadata=help_meta("where latents are read"))
    latent_scale: LatentScale = field(default="gated", metadata=help_meta("latents -> embedding space"))
    latent_anchor: LatentAnchor = field(default="replay", metadata=help_meta("what latents are added to"))
    gate_init: float = field(default=0.0, metadata=help_meta("start value of the 'gated' latent scale"))
    soft_token_init: SoftTokenInit = field(default="vocab_mean", metadata=help_meta("soft tokens at start"))
    init_seed: int = field(default=0, metadata=help_meta("seeds soft tokens and scratch weights"))
    latent_positions: LatentPositions | None = field(default=None, metadata=help_meta(
        "position ids of latents (default: overwrite with the replay anchor, else after)"))
    num_overwritten: int | None = field(default=None, metadata=legacy_meta(None) | help_meta(
        "under overwrite: latents that replace prompt entries (default all N; the rest are appended after t)"))
    appended_at: AppendedAt = field(default="point", metadata=legacy_meta("point") | help_meta(
        "under overwrite with num_overwritten < N: the appended latents follow x[t] (point) or come before the "
        "replacing ones (window)"))

    def __post_init__(self) -> None:
        if self.latent_positions is None:
            replaying = self.method == "coprocessor" and self.latent_anchor == "replay"
            self.latent_positions = "overwrite" if replaying else "after"
        check_int("num_latents", self.num_latents)
        check_int("num_ahead", self.num_ahead)
        check_literal_fields(self)
        check_number("gate_init", self.gate_init)
        if self.method == "pause" and self.lora_rank is not None:
            raise ArgumentError("lora_rank", "must be unset for pause tokens: they have no transformer to adapt")
        if self.lora_rank is not None:
            check_int("lora_rank", self.lora_rank)
            if self.init == "scratch":
                raise ArgumentError("lora_rank", "cannot be combined with init='scratch': LoRA adapts the "
                                    "decoder's weights")
        if self.lora_alpha is not None:
            check_number("lora_alpha", self.lora_alpha, low=0, low_open=True)
        check_int("init_seed", self.init_seed, minimum=0)
        if self.method == "pause" and self.latent_positions == "overwrite":
            raise ArgumentError("latent_positions", "cannot be 'overwrite' for pause tokens: they would replace the "
                                "last N prompt tokens and carry nothing of them")
        if self.num_overwritten is not None:
            if self.latent_positions != "overwrite":
                raise ArgumentError("num_overwritten", f"applies to latent_positions='overwrite' only, got "
                                    f"{self.latent_positions!r}")
            check_int("num_overwritten", self.num_overwritten)
            if self.num_overwritten > self.num_latents:
                raise ArgumentError("num_overwritten", f"must be at most num_latents={self.num_latents}, got "
                                    f"{self.num_overwritten}")
        if self.appended_at != "point" and not (self.replaced_entries and self.added_entries):
            raise ArgumentError("appended_at", "applies to latent_positions='overwrite' with num_overwritten < "
                                f"num_latents only (it places the appended latents), got {self.appended_at!r}")

    @classmethod
    def paper(cls, **overrides: Any) -> CoprocessorConfig:
        """The paper's literal method: latents are the coprocessor's final hidden states after its final
        norm, written as they are (no rescaling, no anchor) at positions t+1 .. t+N, the coprocessor
        initialised from the decoder. `overrides` set any other field (or replace one of these)."""
        return cls(**{**PAPER_FIELDS, **overrides})

    @classmethod
    def dca(cls, **overrides: Any) -> CoprocessorConfig:
        """dca's default (our own choice, not the paper's): rescaled, gated latents added to a replay of the
        last N prompt tokens, in place of their cache entries; the same as ``CoprocessorConfig(**overrides)``."""
        return cls(**overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CoprocessorConfig:
        """``CoprocessorConfig.paper`` or ``.dca`` by name, with `overrides`."""
        check_choice("preset", name, PRESETS)
        return getattr(cls, name)(**overrides)

    @property
    def uses_lora(self) -> bool:
        return self.lora_rank is not None

    @property
    def positions_taken(self) -> int:
        """Position ids the latents consume: the text after them resumes this much later (under "overwrite", the
        N - R appended latents')."""
        if self.latent_positions == "overwrite":
            return self.num_latents - self.replaced_entries
        return self.num_latents if self.latent_positions == "after" else 0

    @property
    def replaced_entries(self) -> int:
        """Prompt cache entries the latents replace (the last R = `num_overwritten`, by default N, under "overwrite"):
        the cache grows by N minus this."""
        if self.latent_positions != "overwrite":
            return 0
        return self.num_latents if self.num_overwritten is None else self.num_overwritten

    @property
    def appended_first(self) -> bool:
        """Whether the N - R appended latents come first in each group, before the R that replace x[t-R+1 .. t]
        (``appended_at="window"``), so that the last latent is still the one in place of x[t]."""
        return self.appended_at == "window"

    @property
    def anchored_latents(self) -> slice:
        """Which of a group's N latents (in cache order) stand for prompt tokens -- replay their embeddings
        (`latent_anchor`) and, under "overwrite", replace them: all N, or the R of `num_overwritten`."""
        replacing = self.replaced_entries or self.num_latents
        return slice(self.num_latents - replacing, self.num_latents) if self.appended_first else slice(0, replacing)

    @property
    def appended_latents(self) -> slice:
        """The others: the N - R that "overwrite" with `num_overwritten` appends (each with a trainable offset)."""
        anchored = self.anchored_latents
        return slice(0, anchored.start) if anchored.start else slice(anchored.stop, self.num_latents)

    @property
    def added_entries(self) -> int:
        """Cache entries one augmentation adds: N, less those it replaces (none under "overwrite" with R = N)."""
        return self.num_latents - self.replaced_entries

    def kept_entries(self, prompt_length: int) -> int:
        """Prompt cache entries that stay when the latents are written after `prompt_length` tokens: all, less the
        last R under "overwrite" (none of a prompt shorter than R, which is left-padded to R)."""
        return max(prompt_length - self.replaced_entries, 0)

    @property
    def first_position(self) -> int:
        """The earliest insertion point training samples and evaluation scores by default: R-1 under "overwrite"
        (where every replacing latent replaces a real token; earlier points work, and read only the last t+1 of
        them), R with the appended latents first (where they read at least x[0]: at t = R-1 they would read only each
        other, zeros at init, whose hidden states stay zero in every layer and whose gradients, through one RMS norm
        after another, overflow), else 0."""
        return max(self.replaced_entries - 1, 0) + self.appended_first

    def to_dict(self) -> dict[str, Any]:
        return drop_legacy(self, dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoprocessorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"CoprocessorConfig: unknown fields {unknown} (known: {sorted(known)})")
        # saved before latent_positions existed: trained with latents at t+1 .. t+N
        return cls(**{"latent_positions": "after", **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def earliest_point(min_position: int | None, configs: Iterable[CoprocessorConfig]) -> int:
    """The earliest augmentation point trained on or scored: `min_position` when given, else the latest
    `first_position` of `configs`, so that every coprocessor is measured on the same points."""
    return min_position if min_position is not None else max((c.first_position for c in configs), default=0)
