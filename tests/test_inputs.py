"""Inputs the model cannot run are refused with a one-line ValueError naming the problem, before any work."""

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from dca import AugmentedLM, CoprocessorConfig
from dca.reference import sequential_group_losses

ENTRY_POINTS = ("augment", "augment_with_grad", "training_loss", "generate")


def make_model(family="llama", **config):
    config = {"num_latents": 3, "num_ahead": 4, "gate_init": 0.5, **config}
    return AugmentedLM.from_decoder(tiny_decoder(family, "eager"), CoprocessorConfig(**config)).eval()


def call(model, entry, input_ids, attention_mask=None):
    if entry == "training_loss":
        positions = torch.zeros(input_ids.shape[0], 1, dtype=torch.long)
        return model.training_loss(input_ids, positions, attention_mask)
    if entry == "generate":
        return model.generate(input_ids, attention_mask, max_new_tokens=2, pad_token_id=0)
    return getattr(model, entry)(input_ids, attention_mask)


def refuses(model, entry, match, input_ids, attention_mask=None):
    """The call fails with a one-line ValueError, before the decoder runs at all."""
    calls = []
    handle = model.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match) as error:
            call(model, entry, input_ids, attention_mask)
    finally:
        handle.remove()
    assert "\n" not in str(error.value) and not calls


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_empty_batch_is_refused(entry):
    refuses(make_model(), entry, "batch size 0", torch.zeros(0, 6, dtype=torch.long))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_token_ids_outside_the_embedding_are_refused(family, entry):
    model = make_model(family)
    for bad in (-1, VOCAB, VOCAB + 50):
        input_ids = torch.ones(2, 6, dtype=torch.long)
        input_ids[1, 2] = bad
        refuses(model, entry, rf"token ids must lie in \[0, {VOCAB}\).*{bad}", input_ids)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("value", [2, -1, 0.5])
def test_attention_masks_of_other_values_than_0_and_1_are_refused(entry, value):
    mask = torch.ones(2, 6)
    mask[0, 0] = value
    mask[1, 0] = 0  # padding is fine: the message names only the odd values
    refuses(make_model(), entry, rf"attention_mask must hold only 0 .* and 1.*such as \[{float(value)}\]$",
            torch.ones(2, 6, dtype=torch.long), mask)


def test_boolean_and_float_masks_of_0_and_1_are_the_integer_mask():
    model = make_model("qwen2")
    torch.manual_seed(0)
    input_ids, mask = torch.randint(0, VOCAB, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    expected = model.augment(input_ids, mask).logits
    for other in (mask.bool(), mask.float()):
        assert torch.equal(model.augment(input_ids, other).logits, expected)


@pytest.mark.parametrize("num_ahead", [0, -2, 1.5, True])
def test_training_loss_refuses_a_num_ahead_that_is_not_a_positive_integer(num_ahead):
    model = make_model()
    with pytest.raises(ValueError, match="num_ahead must be a positive integer"):
        model.training_loss(torch.ones(1, 8, dtype=torch.long), torch.tensor([[2]]), num_ahead=num_ahead)
    out = model.training_loss(torch.ones(1, 8, dtype=torch.long), torch.tensor([[2]]), num_ahead=2)
    assert out.token_losses.shape == (1, 1, 2)


# GPT-2's learned position table has n_positions=128 rows: only the largest position id counts
@pytest.mark.parametrize("entry", ["augment", "generate"])
def test_learned_positions_refuse_a_prompt_whose_latents_run_past_the_table(entry):
    after = make_model("gpt2", latent_positions="after")
    what = "^augment: the prompt and its latents " if entry.startswith("augment") else ""
    refuses(after, entry, what + "need position id 128, but the decoder has max_position_embeddings=128",
            torch.ones(1, 126, dtype=torch.long))
    # latents at 125 .. 127; generate then also feeds its first new token, at position 128 - 1 after 124 tokens
    assert call(after, entry, torch.ones(1, 125 if entry == "augment" else 124, dtype=torch.long)) is not None
    # latents that take no positions: the whole table is the prompt's (and the first new token's, for generate)
    replay = make_model("gpt2", latent_positions="replay")
    assert call(replay, entry, torch.ones(1, 128 if entry == "augment" else 127, dtype=torch.long)) is not None


# rotary models: the latents fill cache slots even when they take no positions
@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("entry", ["augment", "augment_with_grad", "generate"])
def test_rotary_models_count_the_latents_in_the_context(family, entry):
    model = make_model(family, latent_positions="replay", latent_anchor="replay")
    model.decoder.config.max_position_embeddings = 16
    refuses(model, entry, "fill 17 cache slots, more than .* max_position_embeddings=16",
            torch.ones(1, 14, dtype=torch.long))
    assert call(model, entry, torch.ones(1, 13, dtype=torch.long)) is not None
    # left padding is not context
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[:, :7] = 0
    assert call(model, entry, torch.ones(2, 20, dtype=torch.long), mask) is not None


def test_training_loss_at_the_end_of_a_full_learned_position_table_equals_sequential():
    """The members after a group's last target need no position: a full-length row trains (it used to crash)."""
    model = make_model("gpt2", latent_positions="replay", latent_anchor="replay")
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (1, 128))
    out = model.training_loss(input_ids, torch.tensor([[60, 124, 126]]))
    for p, t in enumerate((60, 124, 126)):
        with torch.no_grad():
            expected = sequential_group_losses(model, input_ids, t)
        torch.testing.assert_close(out.token_losses[0, p][out.target_mask[0, p]], expected, rtol=1e-5, atol=1e-6)
    # latents at t+1 .. t+3, text from t+4: after t = 122 the ahead token x[t+3], which has a target, is at 128
    after = make_model("gpt2", latent_positions="after")
    with pytest.raises(ValueError, match="training_loss: a group's .* need position id 128"):
        after.training_loss(input_ids, torch.tensor([[60, 122]]))
    after.training_loss(input_ids, torch.tensor([[60, 121]]))


def test_training_loss_counts_each_groups_context_on_rotary_models():
    model = make_model("llama", latent_positions="replay", latent_anchor="replay")
    model.decoder.config.max_position_embeddings = 16
    input_ids = torch.ones(1, 16, dtype=torch.long)
    # t = 8: 9 tokens, 3 latents, 3 ahead tokens with a target each = 15 slots; t = 10: 11 + 3 + 3 = 17
    model.training_loss(input_ids, torch.tensor([[8]]))
    with pytest.raises(ValueError, match="training_loss: .* fill 17 cache slots"):
        model.training_loss(input_ids, torch.tensor([[8, 10]]))


@pytest.mark.parametrize("decoder", [{}, {"decoder": None}])
def test_from_pretrained_without_a_decoder_says_how_to_load_one(tmp_path, decoder):
    make_model().save_pretrained(tmp_path / "adapter")
    with pytest.raises(TypeError, match=r"needs the frozen decoder.*AutoModelForCausalLM\.from_pretrained"):
        AugmentedLM.from_pretrained(tmp_path / "adapter", **decoder)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_row_without_real_tokens_is_refused(entry):
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1] = 0  # the other row is fine: one empty row is enough to refuse
    refuses(make_model(), entry, "every row needs at least one real token", torch.ones(2, 6, dtype=torch.long), mask)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_asynchronous_generation_counts_only_the_slots_the_latents_add(family):
    """Latents that replace the last N entries ("overwrite") add no cache slots; appended ones add N."""
    def generate_async(model, length):
        return model.generate(torch.ones(1, length, dtype=torch.long), max_new_tokens=2, pad_token_id=0,
                              augment="async")
    replay = make_model(family, latent_positions="replay", latent_anchor="replay")
    overwrite = make_model(family, latent_positions="overwrite", latent_anchor="replay")
    for model in (replay, overwrite):
        model.decoder.config.max_position_embeddings = 16
    with pytest.raises(ValueError, match="fill 17 cache slots"):
        generate_async(replay, 12)
    assert generate_async(replay, 11).shape == (1, 13)
    # under "overwrite" the prompt and the new tokens are all there is: only the position table limits them
    with pytest.raises(ValueError, match="need position id 16"):
        generate_async(overwrite, 15)
    assert generate_async(overwrite, 14).shape == (1, 16)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_training_loss_counts_no_cache_slots_for_latents_that_replace_entries(family):
    """t = 10, N = 3, A = 4: x[0..10], 3 latents, 3 ahead tokens in the cache -- 17 slots appended, 14 overwritten."""
    input_ids, positions = torch.ones(1, 16, dtype=torch.long), torch.tensor([[10]])
    replay = make_model(family, latent_positions="replay", latent_anchor="replay")
    overwrite = make_model(family, latent_positions="overwrite", latent_anchor="replay")
    for model in (replay, overwrite):
        model.decoder.config.max_position_embeddings = 16
    with pytest.raises(ValueError, match="fill 17 cache slots"):
        replay.training_loss(input_ids, positions)
    assert overwrite.training_loss(input_ids, positions).token_losses.isfinite().all()
