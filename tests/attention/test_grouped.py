"""Grouped attention (linear in P) against the dense reference mask: the same losses and the same gradients."""

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, padded_batch, tiny_decoder

from dca import AugmentedLM, CoprocessorConfig
from dca.attention import FLEX, GROUPED

IMPLS = [(f, i) for f in FAMILIES for i in ("eager", "sdpa") if not (f == "gemma2" and i == "sdpa")]


def loss_and_grads(model, mode, input_ids, positions, attention_mask, delays=None):
    model.group_attention = mode
    model.zero_grad(set_to_none=True)
    out = model.training_loss(input_ids, positions, attention_mask, delays=delays)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_grouped_equals_dense(model, input_ids, positions, attention_mask=None, delays=None):
    dense, dense_grads = loss_and_grads(model, "dense", input_ids, positions, attention_mask, delays)
    grouped, grouped_grads = loss_and_grads(model, "grouped", input_ids, positions, attention_mask, delays)
    torch.testing.assert_close(grouped.token_losses, dense.token_losses, rtol=1e-5, atol=1e-6)
    assert grouped_grads.keys() == dense_grads.keys() and len(dense_grads) > 0
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        assert grad.abs().sum() > 0, name  # the comparison is not between two zeros



@pytest.mark.parametrize(("family", "impl"), IMPLS)
@pytest.mark.parametrize("config", [
    {},  # the default: replay layout, causal soft tokens
    {"latent_positions": "after", "soft_token_attention": "full", "lora_rank": 2},
    {"latent_positions": "shared", "latent_source": "pre_norm", "init": "scratch"},
])
def test_grouped_equals_dense_with_padding(family, impl, config):
    torch.manual_seed(0)
    model, input_ids, attention_mask = padded_batch(family, impl, config)
    positions = torch.tensor([[0, 6, 12, 17], [5, 9, 14, 18], [1, 7, 11, 13]])
    assert_grouped_equals_dense(model, input_ids, positions, attention_mask)


@pytest.mark.parametrize(("family", "impl"), IMPLS)
@pytest.mark.parametrize("layout", ["replay", "after"])
def test_grouped_equals_dense_with_delays(family, impl, layout):
    # each group's prefix ends at its own t + d, while its coprocessor group still ends at t
    torch.manual_seed(0)
    model, input_ids, attention_mask = padded_batch(family, impl, {"latent_positions": layout, "lora_rank": 2})
    positions = torch.tensor([[0, 6, 12, 17], [5, 9, 14, 15], [1, 7, 11, 13]])
    delays = torch.tensor([[3, 0, 2, 1], [1, 3, 0, 2], [2, 1, 3, 0]])
    assert_grouped_equals_dense(model, input_ids, positions, attention_mask, delays)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_grouped_equals_dense_when_groups_outgrow_the_sliding_window(family):
    # windows of 5 and 6 slots, groups of 3 + 8 - 1 = 10 members: both parts of the mask are windowed
    torch.manual_seed(0)
    model = AugmentedLM.from_decoder(tiny_decoder(family, "eager"), CoprocessorConfig(
        num_latents=3, num_ahead=8, gate_init=0.5))
    input_ids = torch.randint(0, VOCAB, (2, 30))
    assert_grouped_equals_dense(model, input_ids, torch.tensor([[2, 10, 20], [4, 15, 27]]))
    assert_grouped_equals_dense(model, input_ids, torch.tensor([[2, 10, 20], [4, 15, 25]]),
                                delays=torch.tensor([[3, 1, 2], [0, 3, 3]]))


@pytest.mark.parametrize(("family", "impl"), [("llama", "sdpa"), ("gemma2", "eager"), ("gpt2", "eager")])
def test_the_implementation_is_restored_and_calls_without_groups_meanwhile_run_it(family, impl):
    from dca.attention import use_grouped_attention

    model = AugmentedLM.from_decoder(tiny_decoder(family, impl), CoprocessorConfig(num_latents=2, num_ahead=2))
    model.training_loss(torch.randint(0, VOCAB, (1, 10)), torch.tensor([[3, 6]]))
    assert model.decoder.config._attn_implementation == impl
    assert model.coprocessor.body.config._attn_implementation == impl
    ids = torch.randint(0, VOCAB, (2, 9))
    plain = model.decoder(ids).logits
    with use_grouped_attention(model.decoder), use_grouped_attention(model.decoder):  # nested: counted
        assert model.decoder.config._attn_implementation == GROUPED
        torch.testing.assert_close(model.decoder(ids).logits, plain, rtol=0, atol=0)  # no groups: as before
    assert model.decoder.config._attn_implementation == impl


def test_an_unknown_group_attention_is_refused():
    model = AugmentedLM.from_decoder(tiny_decoder("llama"), CoprocessorConfig(num_latents=2, num_ahead=2))
    model.group_attention = "sparse"
    with pytest.raises(ValueError, match="group_attention must be one of"):
        model.training_loss(torch.randint(0, VOCAB, (1, 10)), torch.tensor([[3]]))


@pytest.mark.parametrize(("setting", "flex_available", "expected"), [
    ("flex", False, FLEX), ("grouped", True, GROUPED), ("auto", True, FLEX), ("auto", False, GROUPED)])
def test_each_group_attention_setting_runs_its_implementation(setting, flex_available, expected, monkeypatch):
    """"auto" takes flex where it is supported (CUDA) and the grouped kernel elsewhere; the others are as named."""
    import dca.model

    class Chosen(Exception):
        pass

    def record(*models, implementation):
        raise Chosen(implementation)
    monkeypatch.setattr(dca.model, "use_grouped_attention", record)
    monkeypatch.setattr(dca.model, "flex_supported", lambda config, device: flex_available)
    model = AugmentedLM.from_decoder(tiny_decoder("llama"), CoprocessorConfig(num_latents=2, num_ahead=2))
    model.group_attention = setting
    with pytest.raises(Chosen) as chosen:
        model.training_loss(torch.randint(0, VOCAB, (1, 10)), torch.tensor([[3]]))
    assert chosen.value.args == (expected,)


def test_grouped_equals_dense_under_strong_logit_softcapping():
    decoder = tiny_decoder("gemma2", "eager")
    for layer in decoder.model.layers:
        layer.self_attn.attn_logit_softcapping = 0.5  # the tiny model's 50 barely bends its small logits
    torch.manual_seed(0)
    model = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=3, num_ahead=4, gate_init=0.5))
    input_ids = torch.randint(0, VOCAB, (2, 16))
    assert_grouped_equals_dense(model, input_ids, torch.tensor([[2, 8, 12], [4, 9, 13]]))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_grouped_mode_builds_no_dense_mask_in_either_pass(family, monkeypatch):
    """Both group passes (coprocessor and decoder) attend through grouped attention, never the dense mask."""
    def dense_mask(*args, **kwargs):
        raise AssertionError("a dense group mask was built under group_attention='grouped'")

    model = AugmentedLM.from_decoder(tiny_decoder(family, "eager"), CoprocessorConfig(
        num_latents=3, num_ahead=4, gate_init=0.5, soft_token_attention="full"))
    monkeypatch.setattr("dca.model.group_attention_mask", dense_mask)
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model.training_loss(input_ids, torch.tensor([[2, 9], [5, 11]]))
    assert torch.isfinite(out.loss)
    model.group_attention = "dense"
    with pytest.raises(AssertionError, match="dense group mask"):
        model.training_loss(input_ids, torch.tensor([[2, 9], [5, 11]]))
