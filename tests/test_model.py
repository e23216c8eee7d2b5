"""The one-pass objective and augmented inference against straightforward reference computations."""

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, appended, tiny_decoder

from dca import AugmentedLM, CoprocessorConfig
from dca.reference import sequential_group_losses

RTOL = 1e-5
IMPLS = [(f, i) for f in FAMILIES for i in ("eager", "sdpa") if not (f == "gemma2" and i == "sdpa")]
LAYOUTS = ("after", "shared", "replay")  # CoprocessorConfig.latent_positions


def make_model(family="llama", impl="sdpa", **config):
    # gate 0.5, not the default 0: the coprocessor's output must reach the decoder in these tests
    config = appended({"num_latents": 3, "num_ahead": 4, "gate_init": 0.5, **config})
    return AugmentedLM.from_decoder(tiny_decoder(family, impl), CoprocessorConfig(**config)).eval()


def assert_matches_sequential(model, input_ids, positions, attention_mask=None, delays=None):
    """Every group's losses from the one-pass objective equal the per-position computation."""
    out = model.training_loss(input_ids, positions, attention_mask, delays=delays)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    checked = 0
    for b in range(input_ids.shape[0]):
        real = mask[b].bool()
        row = input_ids[b][real][None]
        offset = int((~real).long().cumsum(0)[real].min())  # left-padding shift
        for p, t in enumerate(positions[b].tolist()):
            with torch.no_grad():
                delay = 0 if delays is None else int(delays[b, p])
                reference = sequential_group_losses(model, row, t - offset, delay)
            fast = out.token_losses[b, p][out.target_mask[b, p]]
            assert fast.shape == reference.shape, (b, t)
            torch.testing.assert_close(fast, reference, rtol=RTOL, atol=1e-6)
            checked += len(reference)
    assert checked == out.num_targets
    torch.testing.assert_close(out.loss, out.token_losses.sum() / checked)
    return out


@pytest.mark.parametrize(("family", "impl"), IMPLS)
def test_training_loss_equals_sequential(family, impl):
    model = make_model(family, impl)
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 24))
    # several positions per row, the first token, and positions whose ahead window runs off the end
    positions = torch.tensor([[0, 9, 21, 22], [5, 13, 17, 20]])
    out = assert_matches_sequential(model, input_ids, positions)
    assert out.target_mask[0, 3].sum() == 1 and out.target_mask[0, 2].sum() == 2


@pytest.mark.parametrize(("family", "impl"), IMPLS)
@pytest.mark.parametrize("layout", ["shared", "replay"])
def test_training_loss_equals_sequential_when_latents_take_no_positions(family, impl, layout):
    model = make_model(family, impl, latent_positions=layout, latent_anchor="replay", gate_init=0.3)
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 24))
    # t = 0 and 1: the replayed positions are clamped at the first token
    assert_matches_sequential(model, input_ids, torch.tensor([[0, 9, 21, 22], [1, 13, 17, 20]]))


@pytest.mark.parametrize(("family", "impl"), IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_delayed_latents_equal_sequential_late_insertion(family, impl, layout):
    # latents from x[0..t] inserted after x[t+d]: d = 0 beside d > 0, delays past the ahead window, the last slot
    model = make_model(family, impl, latent_positions=layout, latent_anchor="replay", gate_init=0.3)
    torch.manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (2, 24))
    positions = torch.tensor([[0, 4, 9, 19], [1, 5, 13, 20]])
    delays = torch.tensor([[3, 0, 2, 3], [1, 7, 2, 2]])
    out = assert_matches_sequential(model, input_ids, positions, delays=delays)
    assert out.target_mask[0, 3].sum() == 1 and out.target_mask[1, 3].sum() == 1  # s = 22: one target left


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("anchor", ["replay", "last_token"])
def test_untrained_late_latents_are_those_of_the_insertion_point(layout, anchor):
    # gate 0: a latent is its anchor alone, so latents computed at t and inserted after x[t+d] must be exactly
    # those computed at t+d (the anchor is the insertion point's: the decoder's current token is x[t+d])
    model = make_model("llama", "eager", latent_positions=layout, latent_anchor=anchor, gate_init=0.0)
    torch.manual_seed(5)
    input_ids = torch.randint(0, VOCAB, (2, 24))
    positions, delays = torch.tensor([[0, 9, 15], [4, 11, 17]]), torch.tensor([[1, 3, 2], [2, 1, 3]])
    late = model.training_loss(input_ids, positions, delays=delays)
    moved = model.training_loss(input_ids, positions + delays)
    torch.testing.assert_close(late.token_losses, moved.token_losses, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_delayed_latents_with_right_and_left_padding(family):
    model = make_model(family, "eager", latent_positions="replay", latent_anchor="replay", gate_init=0.3)
    torch.manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (3, 20))
    right, left = torch.ones_like(input_ids), torch.ones_like(input_ids)
    right[0, 16:] = 0
    right[2, 18:] = 0
    left[1, :4] = 0
    delays = torch.tensor([[2, 0, 3], [1, 3, 2], [3, 1, 0]])
    assert_matches_sequential(model, input_ids, torch.tensor([[3, 10, 12], [2, 11, 13], [0, 7, 16]]), right, delays)
    assert_matches_sequential(model, input_ids, torch.tensor([[6, 10, 12], [4, 11, 13], [0, 7, 16]]), left, delays)


@pytest.mark.parametrize("mode", ["grouped", "dense"])
def test_zero_delays_are_bit_identical_to_no_delays(mode):
    model = make_model("gemma3", "eager")
    model.group_attention = mode
    torch.manual_seed(4)
    input_ids = torch.randint(0, VOCAB, (2, 24))
    positions = torch.tensor([[0, 9, 21, 22], [5, 13, 17, 20]])
    plain = model.training_loss(input_ids, positions, with_baseline=True)
    zero = model.training_loss(input_ids, positions, with_baseline=True, delays=torch.zeros_like(positions))
    assert torch.equal(plain.token_losses, zero.token_losses)
    assert torch.equal(plain.baseline_token_losses, zero.baseline_token_losses)
    late = model.training_loss(input_ids, positions, delays=(positions < 22).long())
    assert not torch.equal(plain.token_losses, late.token_losses)  # the delays reach the computation


@pytest.mark.parametrize(("delays", "message"), [
    (torch.tensor([[0, -1]]), "delays must be >= 0"),
    (torch.tensor([[0, 1, 2]]), "shaped like positions"),
    (torch.tensor([[0.0, 1.0]]), "LongTensor"),
    (torch.tensor([[0, 4]]), "delayed insertion positions must lie in"),
])
def test_training_loss_rejects_bad_delays(delays, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model.training_loss(torch.randint(0, VOCAB, (1, 12)), torch.tensor([[2, 7]]), delays=delays)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("anchor", ["none", "replay"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_loss_with_right_and_left_padding(family, anchor, layout):
    model = make_model(family, "eager", latent_anchor=anchor, latent_scale="gated", gate_init=0.3,
                       latent_positions=layout)
    torch.manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (3, 20))
    right = torch.ones_like(input_ids)
    right[1, 14:] = 0  # shorter row: groups near its end lose the padded targets
    assert_matches_sequential(model, input_ids, torch.tensor([[3, 10, 18], [2, 11, 13], [0, 7, 16]]), right)
    left = torch.ones_like(input_ids)
    left[0, :6] = 0
    assert_matches_sequential(model, input_ids, torch.tensor([[6, 10, 17], [2, 11, 18], [0, 7, 16]]), left)


@pytest.mark.parametrize("variant", [
    {"soft_token_attention": "full"},
    {"latent_source": "pre_norm"},
    {"latent_scale": "none"},
    {"latent_scale": "learned", "soft_token_init": "normal"},
    {"init": "scratch"},
    {"lora_rank": 4},
    {"num_latents": 1, "num_ahead": 1},
    {"num_latents": 6, "num_ahead": 2},
    {"latent_anchor": "replay", "latent_scale": "gated", "gate_init": 0.1},
    {"method": "pause"},
    {"latent_anchor": "last_token", "latent_scale": "gated", "gate_init": 0.5},
    {"latent_positions": "replay", "soft_token_attention": "full", "num_latents": 6, "num_ahead": 2},
    {"latent_positions": "shared", "latent_anchor": "last_token", "gate_init": 0.0},
    {"latent_positions": "replay", "method": "pause"},
])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_training_loss_equals_sequential_for_every_variant(family, variant):
    model = make_model(family, **variant)
    torch.manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (2, 18))
    assert_matches_sequential(model, input_ids, torch.tensor([[1, 8, 15], [4, 12, 16]]))


LATENT_POSITIONS_AFTER_15 = {"after": ([15, 16, 17], 18), "shared": ([14, 14, 14], 15), "replay": ([12, 13, 14], 15)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_augment_equals_one_forward_over_prompt_and_latents(family, layout):
    """The augmented cache is the decoder reading [prompt, latents] as plain input embeddings."""
    model = make_model(family, "eager", latent_positions=layout)
    torch.manual_seed(4)
    prompt = torch.randint(0, VOCAB, (1, 15))
    out = model.augment(prompt)
    assert out.past_key_values.get_seq_length() == 15 + 3
    latent_pos, next_pos = LATENT_POSITIONS_AFTER_15[layout]
    assert out.latent_position_ids.tolist() == [latent_pos] and out.next_position_ids.tolist() == [[next_pos]]
    embeds = torch.cat([model.decoder.get_input_embeddings()(prompt), out.latents], dim=1)
    with torch.no_grad():
        plain = model.decoder(inputs_embeds=embeds, position_ids=torch.tensor([list(range(15)) + latent_pos]))
    torch.testing.assert_close(out.logits, plain.logits[:, -1], rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_augment_left_padded_batch_equals_unbatched(family, layout):
    model = make_model(family, "eager", soft_token_attention="full" if family == "qwen2" else "causal",
                       latent_anchor="replay", latent_positions=layout)
    torch.manual_seed(5)
    rows = [torch.randint(0, VOCAB, (n,)) for n in (12, 7, 10)]
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    batched = model.augment(input_ids, mask)
    for i, row in enumerate(rows):
        single = model.augment(row[None])
        torch.testing.assert_close(batched.logits[i], single.logits[0], rtol=RTOL, atol=1e-5)
        torch.testing.assert_close(batched.latents[i], single.latents[0], rtol=RTOL, atol=1e-5)
        assert torch.equal(batched.next_position_ids[i], single.next_position_ids[0])
        assert torch.equal(batched.latent_position_ids[i], single.latent_position_ids[0])


def test_augment_rejects_right_padding():
    model = make_model()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        model.augment(torch.zeros(2, 6, dtype=torch.long), mask)


def test_baseline_loss_is_the_plain_decoder_on_the_same_targets():
    model = make_model("gemma2", "eager")
    torch.manual_seed(6)
    input_ids = torch.randint(0, VOCAB, (2, 16))
    positions = torch.tensor([[2, 9, 14], [0, 5, 12]])
    out = model.training_loss(input_ids, positions, with_baseline=True)
    with torch.no_grad():
        logp = model.decoder(input_ids).logits.log_softmax(-1)
    for b in range(2):
        for p, t in enumerate(positions[b].tolist()):
            for k in range(4):
                if t + k + 1 < 16:
                    expected = -logp[b, t + k, input_ids[b, t + k + 1]]
                    torch.testing.assert_close(out.baseline_token_losses[b, p, k], expected, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_without_augmentation_is_the_decoders_generate(family):
    model = make_model(family, "eager")
    prompt = torch.randint(0, VOCAB, (2, 6))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = model.decoder.generate(prompt, **kwargs)
    torch.testing.assert_close(model.generate(prompt, augment=False, **kwargs), expected)
    bare = AugmentedLM(tiny_decoder(family, "eager"))
    assert bare.coprocessor is None
    torch.testing.assert_close(bare.generate(prompt, **kwargs), expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_augmented_generate_equals_greedy_decoding_from_the_augmented_cache(family, layout):
    model = make_model(family, "eager", latent_positions=layout, latent_anchor="replay")
    torch.manual_seed(7)
    rows = [torch.randint(0, VOCAB, (n,)) for n in (9, 6)]
    input_ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    generated = model.generate(input_ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[:, :9], input_ids)
    for i, row in enumerate(rows):
        out = model.augment(row[None])
        cache, logits, tokens = out.past_key_values, out.logits, []
        # the text resumes after the prompt, and after the latents only if they take positions
        start = len(row) + (3 if layout == "after" else 0)
        for step in range(6):
            tokens.append(int(logits.argmax(-1)))
            with torch.no_grad():
                logits = model.decoder(torch.tensor([[tokens[-1]]]), past_key_values=cache,
                                       position_ids=torch.tensor([[start + step]]),
                                       attention_mask=torch.ones(1, cache.get_seq_length() + 1,
                                                                 dtype=torch.long)).logits[:, -1]
        assert generated[i, 9:].tolist() == tokens


def test_generate_rejects_its_own_cache_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="builds the cache itself"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), past_key_values=object())


def test_gradients_reach_the_coprocessor_and_never_the_decoder():
    model = make_model("gemma3").train()
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids = torch.randint(0, VOCAB, (2, 16))
    positions = torch.tensor([[2, 8, 12], [1, 6, 13]])
    for _ in range(3):
        optimizer.zero_grad()
        model.training_loss(input_ids, positions).loss.backward()
        assert all(p.grad is None for p in model.decoder.parameters())
        grads = {n: p.grad for n, p in model.coprocessor.named_parameters() if p.requires_grad}
        assert grads["soft_tokens"] is not None and grads["soft_tokens"].abs().sum() > 0
        assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads.values()) == len(grads)
        optimizer.step()
    assert not model.decoder.training
    for name, value in model.decoder.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("variant", [{}, {"init": "scratch"}, {"lora_rank": 4}, {"method": "pause"}])
def test_every_variant_trains(variant):
    model = make_model("llama", **variant).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(8)
    input_ids = torch.randint(0, VOCAB, (4, 16))
    positions = torch.tensor([[1, 5, 9, 12]] * 4)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = model.training_loss(input_ids, positions).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize(("positions", "message"), [
    (torch.tensor([[0, 15]]), "must lie in"),
    (torch.tensor([[-1, 3]]), "must lie in"),
    (torch.tensor([[1.0, 3.0]]), "LongTensor"),
    (torch.tensor([[1, 2], [3, 4]]), "must be"),
])
def test_training_loss_rejects_bad_positions(positions, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model.training_loss(torch.zeros(1, 16, dtype=torch.long), positions)


def test_training_loss_rejects_positions_on_padding():
    model = make_model()
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, 10:] = 0
    with pytest.raises(ValueError, match="padding"):
        model.training_loss(torch.zeros(1, 16, dtype=torch.long), torch.tensor([[3, 12]]), mask)


def test_the_decoder_is_frozen_and_in_eval_mode_whatever_it_was():
    decoder = tiny_decoder("llama").train()
    model = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=2, latent_positions="replay"))
    assert not decoder.training and not any(p.requires_grad for p in decoder.parameters())
    model.train()
    assert not decoder.training and model.coprocessor.training


def test_no_coprocessor_gives_a_clear_error():
    with pytest.raises(RuntimeError, match="no coprocessor"):
        AugmentedLM(tiny_decoder("llama")).augment(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bf16_autocast_trains_and_stays_close_to_float32(family):
    model = make_model(family)
    torch.manual_seed(9)
    input_ids, positions = torch.randint(0, VOCAB, (2, 20)), torch.tensor([[2, 9, 17], [4, 11, 15]])
    exact = model.training_loss(input_ids, positions).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.training_loss(input_ids, positions)
    low.loss.backward()
    assert model.coprocessor.soft_tokens.grad is not None
    torch.testing.assert_close(low.loss.float(), exact, rtol=0.05, atol=0.05)


def test_gradient_checkpointing_is_refused_not_silently_wrong():
    model = make_model()
    model.decoder.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="checkpointing: it silently drops the cache"):
        model.training_loss(torch.zeros(1, 8, dtype=torch.long), torch.tensor([[2]]))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_default_untrained_coprocessor_replays_the_last_tokens_at_their_own_positions(family):
    """Defaults (replay anchor and positions, gate 0): the latents are exactly x[t-N+1 .. t], re-read in place."""
    model = AugmentedLM.from_decoder(tiny_decoder(family), CoprocessorConfig(num_latents=3, num_ahead=2,
                                                                                latent_positions="replay")).eval()
    input_ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        out = model.augment(input_ids)
        embeds = model.decoder.get_input_embeddings()(input_ids[:, -3:])
    torch.testing.assert_close(out.latents, embeds, rtol=0, atol=0)
    assert out.latent_position_ids.tolist() == [[6, 7, 8]] * 2 and out.next_position_ids.tolist() == [[9]] * 2


def test_a_zero_gate_trains_the_gate_first_then_everything():
    model = make_model("llama", gate_init=0.0, lora_rank=2).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids, positions = torch.randint(0, VOCAB, (2, 16)), torch.tensor([[4, 9], [5, 12]])

    def nonzero_grads():
        optimizer.zero_grad()
        model.training_loss(input_ids, positions).loss.backward()
        return {n for n, p in model.coprocessor.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    assert nonzero_grads() == {"latent_gain"}  # the body's output is multiplied by 0: only the gate learns
    optimizer.step()
    trainable = {n for n, p in model.coprocessor.named_parameters() if p.requires_grad}
    lora_b = {n for n in trainable if "lora_B" in n}
    # once the gate is off zero, gradient reaches the soft tokens and the body (LoRA's A follows once B moves)
    assert lora_b and {"soft_tokens", "latent_gain"} | lora_b <= nonzero_grads()


def lm_head_rows(model, run):
    """The number of positions the decoder's LM head computes logits for, call by call, while `run()` runs."""
    rows = []
    hook = model.decoder.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(out.shape[1]))
    try:
        run()
    finally:
        hook.remove()
    return rows


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_the_lm_head_runs_only_where_logits_are_used(lora_rank):
    """A pass over the prompt keeps no logits but the last; training scores only the ahead tokens; a LoRA
    coprocessor reads the prompt in the decoder's prefill, which then needs no LM head at all."""
    model = make_model(lora_rank=lora_rank)
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    prefill = [] if model.coprocessor.reads_after_prompt else [1]
    assert model.coprocessor.reads_after_prompt == (lora_rank is not None)
    assert lm_head_rows(model, lambda: model.augment(prompt)) == prefill + [1]  # then the latents' last logits
    assert lm_head_rows(model, lambda: model.augment_with_grad(prompt)) == [1, 1]
    new = 3  # generate writes the latents as its first step: one LM head row per new token
    generated = lm_head_rows(model, lambda: model.generate(prompt, max_new_tokens=new, do_sample=False))
    assert generated == prefill + [1] * new
    positions = torch.tensor([[1, 4], [2, 5]])
    groups, ahead = positions.shape[1], model.config.num_ahead
    assert lm_head_rows(model, lambda: model.training_loss(prompt, positions)) == [1, groups * ahead]
    baseline = lm_head_rows(model, lambda: model.training_loss(prompt, positions, with_baseline=True))
    assert baseline == [groups * ahead] * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_a_decoder_whose_config_turns_the_cache_off_gives_the_same_results(family):
    """The cache dca passes is filled whatever `config.use_cache` says (False after checkpointed training, say)."""
    model = make_model(family, "eager", lora_rank=2, latent_positions="replay", latent_anchor="replay")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[3, 8], [5, 10]])

    def results():
        out, shared = model.augment_with_grad(input_ids), model.augment(input_ids)
        return (model.training_loss(input_ids, positions).token_losses, out.logits, out.latents,
                out.past_key_values.get_seq_length(), shared.logits, shared.past_key_values.get_seq_length())

    with torch.no_grad():
        expected = results()
        model.decoder.config.use_cache = model.coprocessor.body.config.use_cache = False
        got = results()
    assert got[3] == got[5] == input_ids.shape[1] + model.config.num_latents
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_baseline_loss_is_the_mean_over_the_targets():
    model = make_model("qwen2")
    input_ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(7))
    out = model.training_loss(input_ids, torch.tensor([[2, 11], [6, 12]]), with_baseline=True)
    torch.testing.assert_close(out.baseline_loss, out.baseline_token_losses[out.target_mask].mean())
    assert model.training_loss(input_ids, torch.tensor([[2, 11], [6, 12]])).baseline_loss is None
    last = input_ids.shape[1] - 2  # one group at the last-but-one token: a single target
    one = model.training_loss(input_ids[:1], torch.tensor([[last]]), with_baseline=True)
    assert one.num_targets == 1
    torch.testing.assert_close(one.baseline_loss, one.baseline_token_losses.sum())
    torch.testing.assert_close(one.loss, one.token_losses.sum())


def test_a_batch_whose_targets_are_all_padding_scores_zero_not_nan():
    """Right padding can leave no target at all (the insertion point is the last real token): loss 0, no NaN."""
    model = make_model("llama")
    input_ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(input_ids)
    mask[:, 6:] = 0
    out = model.training_loss(input_ids, torch.tensor([[5]]), mask, with_baseline=True)
    assert out.num_targets == 0
    assert out.loss.item() == 0.0 and out.baseline_loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
