"""Inference reads the prompt once: a LoRA coprocessor's soft tokens ride along the decoder's own prefill pass
(`Coprocessor.read_after_prompt`), and `generate` writes the latents in its first step. The augmented cache,
latents and tokens must equal the straightforward computation (prefill, then the coprocessor over a fork of the
cache, then the latents), which `augment_with_grad` still runs."""

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_decoder

from dca import AugmentedLM, CoprocessorConfig
from dca.coprocessor import _LORA_ROWS

CONFIGS = {
    "default": {},
    "after": {"latent_positions": "after", "gate_init": 0.5},
    "pre_norm": {"latent_source": "pre_norm", "gate_init": 0.5, "latent_anchor": "none"},
}


def lora_model(family, attn="eager", **config):
    model = AugmentedLM.from_decoder(tiny_decoder(family, attn), CoprocessorConfig(
        num_latents=3, num_ahead=2, lora_rank=4, **config)).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: LoRA B starts at zero, which would hide a missing update
        for param in model.coprocessor.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    return model


def padded_batch():
    torch.manual_seed(0)
    input_ids = torch.randint(6, VOCAB, (2, 9))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    return input_ids, mask


def assert_same_augmentation(a, b, mask):
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    real = a.attention_mask.bool()  # the cache's own mask: the prompt's (less what "overwrite" replaced), the latents
    torch.testing.assert_close(a.attention_mask, b.attention_mask, rtol=0, atol=0)
    for x, y in zip(a.past_key_values.layers, b.past_key_values.layers, strict=True):
        assert x.keys.shape == y.keys.shape
        for row in range(mask.shape[0]):  # padded slots are never read, and eager attention fills them arbitrarily
            torch.testing.assert_close(x.keys[row][:, real[row]], y.keys[row][:, real[row]], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x.values[row][:, real[row]], y.values[row][:, real[row]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_one_pass_augment_equals_the_two_pass_computation(family, config):
    model = lora_model(family, **CONFIGS[config])
    assert model.coprocessor.reads_after_prompt
    input_ids, mask = padded_batch()
    assert_same_augmentation(model.augment(input_ids, mask), model.augment_with_grad(input_ids, mask), mask)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_one_pass_augment_with_sdpa(family):
    model = lora_model(family, "sdpa")
    input_ids, mask = padded_batch()
    assert_same_augmentation(model.augment(input_ids, mask), model.augment_with_grad(input_ids, mask), mask)


def test_the_lora_update_reaches_the_soft_tokens_only():
    model = lora_model("llama")
    input_ids, _ = padded_batch()
    with torch.no_grad():
        embeds = model.decoder.get_input_embeddings()(input_ids)
        plain = model.decoder.model(inputs_embeds=embeds).last_hidden_state
        token = _LORA_ROWS.set(2)
        try:
            rows = model.coprocessor.body(inputs_embeds=embeds).last_hidden_state
        finally:
            _LORA_ROWS.reset(token)
        lora = model.coprocessor.body(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(rows[:, :-2], plain[:, :-2], rtol=1e-6, atol=1e-6)  # the decoder's own pass
    assert not torch.allclose(rows[:, -2:], plain[:, -2:], atol=1e-3)  # the adapter acts on the last rows
    assert not torch.allclose(lora[:, :-2], plain[:, :-2], atol=1e-3)  # and, unset, on every row (training)


@pytest.mark.parametrize("config", [{"lora_rank": 4, "soft_token_attention": "full"}, {}, {"method": "pause"}])
def test_other_coprocessors_keep_the_two_passes(config):
    model = AugmentedLM.from_decoder(tiny_decoder("llama", "eager"),
                                     CoprocessorConfig(num_latents=3, num_ahead=2, **config)).eval()
    assert not model.coprocessor.reads_after_prompt
    input_ids, mask = padded_batch()
    assert_same_augmentation(model.augment(input_ids, mask), model.augment_with_grad(input_ids, mask), mask)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_generate_equals_greedy_decoding_from_the_two_pass_cache(family):
    model = lora_model(family)
    input_ids, mask = padded_batch()
    out = model.augment_with_grad(input_ids, mask)
    with torch.no_grad():  # reference: greedy decoding by hand from the straightforward augmented cache
        cache, logits, attention = out.past_key_values, out.logits, out.attention_mask
        position, tokens = out.next_position_ids, []
        for _ in range(5):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            attention = torch.cat([attention, torch.ones_like(token)], 1)
            logits = model.decoder(input_ids=token, attention_mask=attention, position_ids=position,
                                   past_key_values=cache, use_cache=True).logits[:, -1]
            position = position + 1
    generated = model.generate(input_ids, mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generated[:, input_ids.shape[1]:], torch.cat(tokens, 1))


def shared_pass(model, input_ids, mask):
    """`Coprocessor.read_after_prompt` over a left-padded batch, as `augment` calls it: (latents, cache)."""
    from transformers import DynamicCache

    from dca.masks import prefix_position_ids

    n = model.config.num_latents
    last = torch.full((input_ids.shape[0], 1), input_ids.shape[1] - 1)
    out = model.augment_with_grad(input_ids, mask)  # the straightforward computation's latent positions
    positions = torch.cat([prefix_position_ids(mask), out.latent_position_ids], dim=1)
    extended = torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=1)
    cache = DynamicCache()
    latents = model.coprocessor.read_after_prompt(model.decoder.get_input_embeddings()(input_ids), extended,
                                                  positions, cache, anchor=model._latent_anchor(input_ids, mask, last))
    return latents, cache, out


def test_the_lora_row_limit_is_cleared_after_every_shared_pass():
    """After a shared pass the adapter applies to every row again: a later two-pass computation is unchanged."""
    model = lora_model("llama")
    input_ids, mask = padded_batch()
    with torch.no_grad():
        before = model.augment_with_grad(input_ids, mask)
        model.augment(input_ids, mask)
        assert _LORA_ROWS.get() is None
        after = model.augment_with_grad(input_ids, mask)
        positions = torch.tensor([[4, 6], [5, 7]])
        losses = model.training_loss(input_ids, positions, mask).token_losses
        model.augment(input_ids, mask)
        torch.testing.assert_close(model.training_loss(input_ids, positions, mask).token_losses, losses, rtol=0, atol=0)
    torch.testing.assert_close(after.latents, before.latents, rtol=0, atol=0)


def test_the_soft_token_rows_call_no_adapter_module():
    """Plain LoRA (no dropout, no bias) on the soft-token rows is two matmuls, not two module calls per layer."""
    model = lora_model("qwen2")
    adapters = [m for name, m in model.coprocessor.body.named_modules()
                if name.endswith(("lora_A.default", "lora_B.default"))]
    input_ids, mask = padded_batch()
    calls = []
    with torch.no_grad():
        reference = model.augment_with_grad(input_ids, mask)
        hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in adapters]
        try:
            latents = model.augment(input_ids, mask).latents
            shared = len(calls)
            model.augment_with_grad(input_ids, mask)
        finally:
            for hook in hooks:
                hook.remove()
    assert adapters and shared == 0 and calls  # the two-pass computation does call them: the hooks work
    torch.testing.assert_close(latents, reference.latents, rtol=1e-5, atol=1e-5)


def test_the_shared_pass_under_autograd_equals_it_without():
    """With autograd on, the soft-token rows are joined to the prompt's rather than written in place: same latents,
    same cache, and the adapter gets gradients."""
    model = lora_model("gemma3")
    input_ids, mask = padded_batch()
    with torch.no_grad():
        expected, expected_cache, _ = shared_pass(model, input_ids, mask)
    latents, cache, _ = shared_pass(model, input_ids, mask)
    torch.testing.assert_close(latents, expected, rtol=1e-6, atol=1e-6)
    for x, y in zip(cache.layers, expected_cache.layers, strict=True):
        torch.testing.assert_close(x.keys, y.keys, rtol=1e-6, atol=1e-6)
    latents.square().sum().backward()
    grads = [p.grad for n, p in model.coprocessor.body.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
