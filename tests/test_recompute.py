"""Activation checkpointing that keeps the cache: the same loss and gradients, far fewer saved activations."""

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from dca import AugmentedLM, CoprocessorConfig


def run(model, checkpointing, mode="grouped"):
    model.activation_checkpointing, model.group_attention = checkpointing, mode
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (2, 24))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        out = model.training_loss(input_ids, torch.tensor([[2, 9, 15, 20], [5, 11, 17, 21]]), mask)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.token_losses.detach(), grads, sum(saved)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "gpt2"])
@pytest.mark.parametrize("config", [{}, {"lora_rank": 2, "latent_positions": "after"}])
@pytest.mark.parametrize("mode", ["grouped", "dense"])
def test_checkpointing_gives_the_same_loss_and_gradients(family, config, mode):
    torch.manual_seed(0)
    model = AugmentedLM.from_decoder(tiny_decoder(family, "eager"), CoprocessorConfig(
        num_latents=3, num_ahead=4, gate_init=0.5, **config)).train()
    patched = {name for name, m in model.named_modules() if "forward" in vars(m)}  # e.g. the shared-pass LoRA rows
    plain_losses, plain_grads, plain_saved = run(model, False, mode)
    losses, grads, saved = run(model, True, mode)
    torch.testing.assert_close(losses, plain_losses, rtol=1e-6, atol=1e-7)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved < plain_saved / 2  # what backward keeps: the layers' inputs, not their insides
    # the layers are themselves again afterwards
    assert {name for name, m in model.named_modules() if "forward" in vars(m)} == patched


def test_checkpointing_leaves_the_prefix_cache_unchanged_by_the_replay():
    model = AugmentedLM.from_decoder(tiny_decoder("llama"), CoprocessorConfig(num_latents=2, num_ahead=3,
                                                                              gate_init=0.5)).train()
    model.activation_checkpointing = True
    ids = torch.randint(0, VOCAB, (1, 16))
    first = model.training_loss(ids, torch.tensor([[4, 10]]))
    first.loss.backward()  # a replay that appended to the cache would change the second call's keys
    second = model.training_loss(ids, torch.tensor([[4, 10]]))
    torch.testing.assert_close(first.token_losses, second.token_losses, rtol=0, atol=0)
