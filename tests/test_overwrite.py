"""``latent_positions="overwrite"``: the latents replace the cache entries of the prompt's last N tokens.

The one-pass objective (grouped and dense) equals the sequential computation here and the independent
reference in `test_independent_reference.py`; an untrained coprocessor (gate 0) is exactly the frozen
decoder on every family, sliding windows included -- which the default layout, appending N duplicates,
is not; inference (augment, the shared prefill, generate) writes what training scored.
"""

import pytest
import torch
from test_model import IMPLS, assert_matches_sequential
from tiny_models import FAMILIES, VOCAB, tiny_decoder
from transformers import DynamicCache

from dca import AugmentedLM, CoprocessorConfig
from dca.errors import ArgumentError
from dca.masks import prefix_allowed
from dca.training.train import TrainArgs

MODES = ("grouped", "dense")


def overwrite_model(family="llama", impl="eager", **config):
    config = {"num_latents": 3, "num_ahead": 4, "gate_init": 0.5, "latent_positions": "overwrite", **config}
    return AugmentedLM.from_decoder(tiny_decoder(family, impl), CoprocessorConfig(**config)).eval()


def test_the_decoders_groups_see_only_what_the_latents_do_not_replace():
    valid, pos = torch.ones(1, 8), torch.arange(8)[None]
    allowed = prefix_allowed(valid, pos, torch.tensor([[4]]), 3, sliding_window=None, replaced=2)[0, 0]  # sees x[0..2]
    assert allowed.long().tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]] * 3
    # member k sits in slot pos(t)+1+k-2 = 3+k: a window of 3 keeps slots 1+k .. 3+k
    windowed = prefix_allowed(valid, pos, torch.tensor([[4]]), 3, sliding_window=3, replaced=2)[0, 0]
    assert windowed.long().tolist() == [[0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0], [0] * 8]


@pytest.mark.parametrize(("family", "impl"), IMPLS)
def test_training_loss_equals_sequential(family, impl):
    model = overwrite_model(family, impl)
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 24))
    # t = N-1 (the group sees no original token), positions whose ahead window runs off the end
    for mode in MODES:
        model.group_attention = mode
        assert_matches_sequential(model, input_ids, torch.tensor([[2, 9, 21, 22], [3, 13, 17, 20]]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("extra", [{}, {"num_overwritten": 1}])  # R = 1 of N = 3: two latents appended after t
def test_training_loss_equals_sequential_with_padding_delays_and_lora(family, extra):
    model = overwrite_model(family, lora_rank=2, soft_token_attention="full", **extra)
    with torch.no_grad():
        for name, param in model.coprocessor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    torch.manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (3, 20))
    mask = torch.ones_like(input_ids)
    mask[0, 16:] = 0
    mask[1, :4] = 0
    positions = torch.tensor([[2, 7, 12], [6, 10, 15], [4, 9, 17]])
    delays = torch.tensor([[2, 0, 3], [1, 3, 2], [3, 1, 0]])
    for mode in MODES:
        model.group_attention = mode
        assert_matches_sequential(model, input_ids, positions, mask)
        assert_matches_sequential(model, input_ids, positions, mask, delays=delays)


@pytest.mark.parametrize(("family", "impl"), IMPLS)
@pytest.mark.parametrize("num_latents", [1, 3, 8])  # 8: more than the tiny Gemma windows (5 and 6 slots)
def test_an_untrained_coprocessor_is_exactly_the_frozen_decoder(family, impl, num_latents):
    model = overwrite_model(family, impl, num_latents=num_latents, gate_init=0.0)
    torch.manual_seed(4)
    input_ids = torch.randint(0, VOCAB, (2, 24))
    positions = torch.tensor([[num_latents - 1, 12, 20], [num_latents + 2, 15, 22]])
    for mode in MODES:
        model.group_attention = mode
        out = model.training_loss(input_ids, positions, with_baseline=True)
        torch.testing.assert_close(out.token_losses, out.baseline_token_losses, rtol=1e-5, atol=1e-5)
    prompt = input_ids[:1, :15]
    cache = DynamicCache()  # full length, as augment's
    plain = model.decoder(input_ids=prompt, past_key_values=cache, use_cache=True)
    augmented = model.augment(prompt)  # the latents recompute the entries they replace
    torch.testing.assert_close(augmented.logits, plain.logits[:, -1], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(augmented.past_key_values.layers, cache.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, rtol=1e-5, atol=1e-5)
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    frozen = model.decoder.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generated, frozen)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_default_that_appends_duplicates_is_not(family):
    """The property above fails for the replay layout: that is what "overwrite" mends."""
    model = overwrite_model(family, latent_positions="replay", gate_init=0.0)
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    out = model.training_loss(input_ids, torch.tensor([[2, 12, 20], [5, 15, 22]]), with_baseline=True)
    assert not torch.allclose(out.token_losses, out.baseline_token_losses, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("replaced", "appended_at"), [(3, "point"), (2, "point"), (1, "window")])
def test_augment_and_generate_write_what_training_scores(family, replaced, appended_at):
    model = overwrite_model(family, lora_rank=4, num_overwritten=replaced, appended_at=appended_at)
    with torch.no_grad():
        for param in model.coprocessor.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    torch.manual_seed(0)
    input_ids = torch.randint(6, VOCAB, (2, 9))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # six real tokens: enough for N = 3
    shared, plain = model.augment(input_ids, mask), model.augment_with_grad(input_ids, mask)  # one pass, two
    torch.testing.assert_close(shared.latents, plain.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.logits, plain.logits, rtol=1e-5, atol=1e-5)
    assert shared.attention_mask.shape[1] == 9 + 3 - replaced == shared.past_key_values.get_seq_length()
    # greedy decoding by hand from the augmented cache, against generate
    cache, past, position, logits, tokens = shared.past_key_values, shared.attention_mask, shared.next_position_ids, \
        shared.logits, []
    with torch.no_grad():
        for _ in range(5):
            tokens.append(logits.argmax(-1, keepdim=True))
            past = torch.cat([past, torch.ones_like(tokens[-1])], 1)
            logits = model.decoder(input_ids=tokens[-1], attention_mask=past, position_ids=position,
                                   past_key_values=cache, use_cache=True).logits[:, -1]
            position = position + 1
    out = model.generate(input_ids, mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out[:, 9:], torch.cat(tokens, 1))


@pytest.mark.parametrize(("family", "impl"), IMPLS)
@pytest.mark.parametrize("appended", [{}, {"num_overwritten": 5, "appended_at": "window"}])
def test_training_before_n_tokens_equals_sequential(family, impl, appended):
    """Points with r < R real tokens up to them (t < R-1, or fewer after left padding): the group's first R - r
    replacing latents (after the N - R appended ones, "window") replace nothing and are hidden, as `augment` hides
    those that replace its padding -- beside full groups of the same pass, with delays (which move a group past
    R-1) and windows smaller than N (Gemma)."""
    model = overwrite_model(family, impl, num_latents=8, lora_rank=2, **appended)
    with torch.no_grad():
        for name, param in model.coprocessor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # row 1: its t = 5 has 3 real tokens
    positions, delays = torch.tensor([[0, 3, 7, 12], [4, 5, 9, 14]]), torch.tensor([[0, 5, 2, 1], [3, 0, 1, 0]])
    for mode in MODES:
        model.group_attention = mode
        out = assert_matches_sequential(model, input_ids, positions, mask)
        assert_matches_sequential(model, input_ids, positions, mask, delays=delays)
    # the hiding matters: without it every short group's losses change, and no full group's
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr("dca.masks.padded_latents", lambda *args: None)
        unhidden = model.training_loss(input_ids, positions, mask).token_losses
    real = torch.tensor([[1, 4, 8, 13], [2, 3, 7, 12]])  # real tokens up to each point
    short = real < model.coprocessor.config.replaced_entries
    changed = (unhidden - out.token_losses).abs().amax(-1) > 1e-4
    assert torch.equal(changed, short)


def test_each_input_overwrite_cannot_use_is_refused_naming_it():
    with pytest.raises(ArgumentError, match="^latent_positions cannot"):
        CoprocessorConfig(method="pause", latent_positions="overwrite")
    with pytest.raises(ArgumentError, match="^positions "):
        TrainArgs(seq_len=20, positions=18, coprocessor=CoprocessorConfig(num_latents=4, latent_positions="overwrite"))


def test_appended_latents_are_counted_saved_and_validated():
    config = CoprocessorConfig(num_latents=5, num_overwritten=2)  # the default layout, "overwrite"
    assert CoprocessorConfig.from_dict(config.to_dict()) == config
    assert (config.replaced_entries, config.added_entries, config.positions_taken) == (2, 3, 3)
    assert (config.kept_entries(7), config.kept_entries(1), config.first_position) == (5, 0, 1)
    assert CoprocessorConfig(num_latents=5, num_overwritten=5).replaced_entries == 5
    with pytest.raises(ArgumentError, match="^num_overwritten must be at most num_latents=5"):
        CoprocessorConfig(num_latents=5, num_overwritten=6)
    with pytest.raises(ArgumentError, match="^num_overwritten must be an integer >= 1"):
        CoprocessorConfig(num_overwritten=0)
    with pytest.raises(ArgumentError, match="^num_overwritten applies to latent_positions='overwrite' only"):
        CoprocessorConfig(latent_positions="after", num_overwritten=2)
    window = CoprocessorConfig(num_latents=5, num_overwritten=2, appended_at="window")
    assert CoprocessorConfig.from_dict(window.to_dict()) == window and window.appended_first
    assert (window.added_entries, window.positions_taken, window.first_position) == (3, 3, 2)  # t >= R: see x[0]
    assert "appended_at" not in config.to_dict() and not config.appended_first  # "point", the legacy value
    assert (config.anchored_latents, config.appended_latents) == (slice(0, 2), slice(2, 5))
    assert (window.anchored_latents, window.appended_latents) == (slice(3, 5), slice(0, 3))
    whole = CoprocessorConfig(num_latents=5)
    assert (whole.anchored_latents, whole.appended_latents) == (slice(0, 5), slice(5, 5))
    for unplaced in ({"num_latents": 5}, {"num_latents": 5, "num_overwritten": 5}, {"latent_positions": "after"}):
        with pytest.raises(ArgumentError, match="^appended_at applies to latent_positions='overwrite' with "):
            CoprocessorConfig(appended_at="window", **unplaced)
    with pytest.raises(ArgumentError, match="^min_position .*must be at least R = 2 with appended_at='window'"):
        TrainArgs(seq_len=20, positions=4, min_position=1, coprocessor=window)
    assert TrainArgs(seq_len=20, positions=4, min_position=1, coprocessor=config).first_position() == 1
    with pytest.raises(ArgumentError, match="^appended_at must be one of"):
        CoprocessorConfig(num_overwritten=2, appended_at="before")


@pytest.mark.parametrize("appended_at", ["point", "window"])
def test_appended_offsets_start_at_zero_are_trained_and_saved(tmp_path, appended_at):
    model = overwrite_model("llama", num_latents=4, num_overwritten=1, lora_rank=2, appended_at=appended_at)
    offset = model.coprocessor.appended_offset
    assert offset.shape == (3, model.decoder.config.hidden_size) and not offset.any() and offset.requires_grad
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(8))
    model.training_loss(input_ids, torch.tensor([[3, 8], [5, 9]])).loss.backward()
    assert offset.grad is not None and offset.grad.abs().sum(-1).gt(0).all()  # every appended latent is read
    with torch.no_grad():
        offset.normal_()
    model.save_pretrained(tmp_path / "adapter")
    loaded = AugmentedLM.from_pretrained(tmp_path / "adapter", tiny_decoder("llama", "eager"))
    assert torch.equal(loaded.coprocessor.appended_offset, offset)
    assert torch.equal(loaded.augment(input_ids[:1]).logits, model.augment(input_ids[:1]).logits)
    assert overwrite_model("llama").coprocessor.appended_offset is None  # R = N: nothing appended


def test_the_layout_is_saved_and_sampled_points_leave_room():
    config = CoprocessorConfig(num_latents=5, latent_positions="overwrite")
    assert CoprocessorConfig.from_dict(config.to_dict()) == config
    replay = CoprocessorConfig(latent_positions="replay")
    assert (config.replaced_entries, config.positions_taken, replay.replaced_entries) == (5, 0, 0)
    assert (config.added_entries, replay.added_entries) == (0, 16)
    args = TrainArgs(seq_len=20, positions=15, coprocessor=config)  # t in [4, 18]
    assert args.first_position() == 4 and TrainArgs(coprocessor=replay).first_position() == 0
    assert TrainArgs().first_position() == 15  # the default: N = 16, "overwrite"
    early = TrainArgs(seq_len=20, positions=19, min_position=0, coprocessor=config)  # every point, t in [0, 18]
    assert early.first_position() == 0 and "min_position" in early.identity()
    assert "min_position" not in args.identity()  # runs saved before the option resume as the same runs
    assert "num_overwritten" not in args.identity()["coprocessor"] and "num_overwritten" not in config.to_dict()
    appended = TrainArgs(coprocessor=CoprocessorConfig(num_overwritten=4))
    assert appended.identity()["coprocessor"]["num_overwritten"] == 4
    with pytest.raises(ArgumentError, match="^min_position "):
        TrainArgs(min_position=-1)
    with pytest.raises(ArgumentError, match="^min_position .*a point needs a token after it"):
        TrainArgs(seq_len=20, positions=1, min_position=19)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_untrained_generate_equals_the_frozen_decoder_with_beams_and_lengths(family):
    # the embeddings generate gets are as long as the prompt: transformers must count lengths as for the decoder
    model = overwrite_model(family, gate_init=0.0)
    input_ids = torch.randint(6, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[1, :3], input_ids[1, :3] = 0, 0
    for kwargs in ({"max_new_tokens": 5, "num_beams": 3, "num_return_sequences": 2}, {"max_length": 12},
                   {"max_new_tokens": 4, "min_length": 12}):
        kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None, **kwargs}
        ours, theirs = model.generate(input_ids, mask, **kwargs), model.decoder.generate(input_ids, attention_mask=mask,
                                                                                          **kwargs)
        assert torch.equal(ours, theirs), kwargs


@pytest.mark.parametrize(("family", "impl"), IMPLS)
def test_prompts_shorter_than_n_are_exactly_the_frozen_decoder_at_gate_0(family, impl):
    """A row with r < N tokens keeps its last r latents: at gate 0 still no change, sync and async, alone and in a
    left-padded batch beside longer rows."""
    model = overwrite_model(family, impl, num_latents=5, gate_init=0.0)
    input_ids = torch.randint(6, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(input_ids)
    mask[1, :5], input_ids[1, :5] = 0, 0  # 2 real tokens
    mask[2, :3], input_ids[2, :3] = 0, 0  # 4
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    for ids, attention in ((input_ids[:1, :3], None), (input_ids[:1, :1], None), (input_ids, mask)):
        frozen = model.decoder.generate(ids, attention_mask=attention, **kwargs)
        assert torch.equal(model.generate(ids, attention, **kwargs), frozen)
        for delay in (0, 2):
            assert torch.equal(model.generate(ids, attention, augment="async", latent_delay=delay, **kwargs), frozen)


@pytest.mark.parametrize(("family", "impl"), IMPLS)
def test_a_short_prompt_gets_one_latent_per_token(family, impl):
    """Trained weights: augment on r < N tokens equals the decoder reading only the last r latents at x's positions
    (written out here), and a left-padded batch equals each row alone."""
    model = overwrite_model(family, impl, num_latents=5, lora_rank=2)
    with torch.no_grad():
        for name, param in model.coprocessor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    rows = [torch.randint(6, VOCAB, (r,), generator=torch.Generator().manual_seed(r)) for r in (3, 1, 8)]
    alone = []
    for row in rows:
        out = model.augment(row[None])
        r = min(len(row), 5)
        with torch.no_grad():
            cache = DynamicCache()
            if len(row) > 5:
                model.decoder(input_ids=row[None, :-5], past_key_values=cache, use_cache=True)
            written = model.decoder(inputs_embeds=out.latents[:, 5 - r:], past_key_values=cache, use_cache=True,
                                    position_ids=torch.arange(len(row) - r, len(row))[None]).logits[:, -1]
        torch.testing.assert_close(out.logits, written, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out.logits, model.decoder(row[None]).logits[:, -1], atol=1e-3)  # it did something
        alone.append(out.logits)
    input_ids, mask = torch.zeros(3, 8, dtype=torch.long), torch.zeros(3, 8, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, 8 - len(row):], mask[i, 8 - len(row):] = row, 1
    torch.testing.assert_close(model.augment(input_ids, mask).logits, torch.cat(alone), rtol=1e-5, atol=1e-5)

