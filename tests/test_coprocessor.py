"""How the coprocessor is built: what it shares with the decoder, what it trains, where latents come from."""

import pytest
import torch
from tiny_models import tiny_decoder

from dca import CoprocessorConfig
from dca.coprocessor import Coprocessor


def trainable(copro):
    return {n for n, p in copro.named_parameters() if p.requires_grad}


def test_decoder_init_copies_weights_but_shares_the_unused_embedding():
    decoder = tiny_decoder("llama")
    copro = Coprocessor(decoder, CoprocessorConfig(num_latents=4))
    body, base = copro.body, decoder.base_model
    assert body.embed_tokens.weight is base.embed_tokens.weight and not body.embed_tokens.weight.requires_grad
    assert body.layers[0].mlp.up_proj.weight is not base.layers[0].mlp.up_proj.weight
    assert torch.equal(body.layers[0].mlp.up_proj.weight, base.layers[0].mlp.up_proj.weight)
    assert "soft_tokens" in trainable(copro) and copro.soft_tokens.shape == (4, 32)


def test_scratch_init_is_random_and_seeded():
    decoder = tiny_decoder("gpt2")
    a = Coprocessor(decoder, CoprocessorConfig(init="scratch", init_seed=1))
    b = Coprocessor(decoder, CoprocessorConfig(init="scratch", init_seed=1))
    w = "h.0.mlp.c_fc.weight"
    assert not torch.equal(a.body.state_dict()[w], decoder.base_model.state_dict()[w])
    assert torch.equal(a.body.state_dict()[w], b.body.state_dict()[w])


def test_lora_shares_every_base_weight_and_trains_only_the_adapter():
    decoder = tiny_decoder("qwen2")
    copro = Coprocessor(decoder, CoprocessorConfig(lora_rank=2))
    names = trainable(copro)
    assert names and all("lora_" in n or n in ("soft_tokens", "latent_gain") for n in names)
    decoder_ids = {id(p) for p in decoder.parameters()}
    frozen = [p for n, p in copro.body.named_parameters() if "lora_" not in n]
    assert all(id(p) in decoder_ids for p in frozen)


@pytest.mark.parametrize("init", ["vocab_sample", "normal"])
def test_soft_token_inits_live_at_the_embedding_scale(init):
    decoder = tiny_decoder("gemma3")  # scales its embeddings by sqrt(hidden): soft tokens must too
    copro = Coprocessor(decoder, CoprocessorConfig(num_latents=8, soft_token_init=init))
    table = decoder.get_input_embeddings()(torch.arange(97))
    ratio = copro.soft_tokens.norm(dim=-1).mean() / table.norm(dim=-1).mean()
    assert 0.5 < ratio < 2.0


def test_vocab_mean_init_starts_at_the_mean_embedding():
    decoder = tiny_decoder("gemma3")
    copro = Coprocessor(decoder, CoprocessorConfig(num_latents=3, soft_token_init="vocab_mean"))
    mean = decoder.get_input_embeddings()(torch.arange(97)).mean(0)
    torch.testing.assert_close(copro.soft_tokens.detach(), mean.expand(3, -1).detach(), rtol=0, atol=0.1)
    assert not torch.equal(copro.soft_tokens[0], copro.soft_tokens[1])


def test_embed_rms_scaling_puts_latents_at_the_embedding_rms():
    decoder = tiny_decoder("llama")
    copro = Coprocessor(decoder, CoprocessorConfig(latent_scale="embed_rms"))
    latents = copro.to_embedding_space(torch.randn(2, 3, 32) * 50)
    torch.testing.assert_close(latents.pow(2).mean(-1).sqrt(), copro.embed_rms.expand(2, 3), rtol=1e-4, atol=0)
    none = Coprocessor(decoder, CoprocessorConfig(latent_scale="none"))
    hidden = torch.randn(2, 3, 32)
    assert torch.equal(none.to_embedding_space(hidden), hidden)


def test_pause_tokens_are_input_independent_embeddings():
    decoder = tiny_decoder("llama")
    pause = Coprocessor(decoder, CoprocessorConfig(method="pause", num_latents=3))
    assert pause.body is None and trainable(pause) == {"soft_tokens"}
    positions = torch.arange(6)[None].expand(2, -1)  # two groups of three, any cache
    latents = pause(None, None, positions)
    assert torch.equal(latents[0, :3], pause.soft_tokens) and torch.equal(latents[1, 3:], pause.soft_tokens)


def test_gains_and_the_embedding_rms_start_where_the_config_says():
    decoder = tiny_decoder("gemma3")  # embeddings scaled by sqrt(hidden): the RMS is of what the model feeds
    learned = Coprocessor(decoder, CoprocessorConfig(latent_scale="learned"))
    assert torch.equal(learned.latent_gain.detach(), torch.ones(32))
    gated = Coprocessor(decoder, CoprocessorConfig(latent_scale="gated", gate_init=0.25))
    assert gated.latent_gain.tolist() == [0.25]
    assert Coprocessor(decoder, CoprocessorConfig(latent_scale="embed_rms")).latent_gain is None
    table = decoder.get_input_embeddings()(torch.arange(97))
    torch.testing.assert_close(gated.embed_rms, table.pow(2).mean(-1).sqrt().mean(), rtol=1e-6, atol=0)
    assert "embed_rms" not in gated.state_dict()  # derived from the decoder, never saved with an adapter


def test_vocab_sample_copies_rows_from_the_whole_table():
    decoder = tiny_decoder("llama")
    copro = Coprocessor(decoder, CoprocessorConfig(num_latents=16, soft_token_init="vocab_sample"))
    table = decoder.get_input_embeddings()(torch.arange(97))
    rows = [int((table == soft).all(-1).nonzero()[0]) for soft in copro.soft_tokens.detach()]
    assert len(set(rows)) == 16 and max(rows) >= 32  # distinct rows, not only the first `hidden` of them


@pytest.mark.parametrize("init", ["vocab_sample", "vocab_mean", "normal"])
def test_soft_tokens_are_seeded(init):
    decoder = tiny_decoder("llama")

    def soft(seed):
        return Coprocessor(decoder, CoprocessorConfig(num_latents=3, soft_token_init=init, init_seed=seed)).soft_tokens
    assert torch.equal(soft(3), soft(3)) and not torch.equal(soft(3), soft(4))


def test_lora_scaling_target_modules_and_no_dropout():
    decoder = tiny_decoder("llama")

    def adapted(**config):
        body = Coprocessor(decoder, CoprocessorConfig(**config)).body
        return {name: m for name, m in body.named_modules() if hasattr(m, "lora_A")}
    layers = adapted(lora_rank=4)
    assert len(layers) == 3 * 7  # every linear layer of three blocks
    assert all(m.scaling["default"] == 2.0 for m in layers.values())  # alpha defaults to 2 x rank
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in layers.values())
    assert all(m.r["default"] == 4 for m in layers.values())
    assert {m.scaling["default"] for m in adapted(lora_rank=4, lora_alpha=2.0).values()} == {0.5}
    assert {name.rsplit(".", 1)[-1] for name in adapted(lora_rank=2, lora_target_modules=["q_proj"])} == {"q_proj"}


def test_the_pre_norm_capture_is_cleared_after_every_call():
    from transformers import DynamicCache

    from dca.coprocessor import _PRE_NORM_CAPTURE

    decoder = tiny_decoder("llama")
    copro = Coprocessor(decoder, CoprocessorConfig(num_latents=2, latent_source="pre_norm"))
    cache = DynamicCache()
    decoder(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache, use_cache=True)
    copro(cache, None, torch.tensor([[4, 5]]))
    assert _PRE_NORM_CAPTURE.get() is None


@pytest.mark.parametrize("method", ["coprocessor", "pause"])
def test_only_pre_norm_latents_hook_the_final_norm(method):
    """The capture hook sits on the body's final norm when latents are read before it, and nowhere else."""
    from dca.config import LATENT_SOURCES
    from dca.coprocessor import _final_norm

    decoder = tiny_decoder("llama")
    for source in LATENT_SOURCES:
        copro = Coprocessor(decoder, CoprocessorConfig(method=method, num_latents=2, latent_source=source))
        if method == "pause":  # no body, nothing to hook, whatever the source says: the soft tokens are the latents
            assert copro.body is None
            assert torch.equal(copro(None, None, torch.tensor([[4, 5]]))[0], copro.soft_tokens)
        else:
            assert bool(_final_norm(copro.body)._forward_pre_hooks) == (source == "pre_norm")
    assert not decoder.base_model.norm._forward_pre_hooks  # the decoder's own norm is never hooked


def test_vocab_mean_adds_the_init_seeds_normal_draw_to_the_mean_embedding():
    """The noise is the seed's standard normal draw, scaled by one positive factor: a seed reproduces the start."""
    decoder = tiny_decoder("llama")
    config = CoprocessorConfig(num_latents=3, soft_token_init="vocab_mean", init_seed=5)
    soft = Coprocessor(decoder, config).soft_tokens.detach()
    table = decoder.get_input_embeddings()(torch.arange(97)).detach()
    draw = torch.randn(*soft.shape, generator=torch.Generator().manual_seed(config.init_seed))
    scale = (soft - table.mean(0)) / draw
    torch.testing.assert_close(scale, scale.mean().expand_as(scale), rtol=1e-3, atol=0)
    assert 0 < scale.mean() < table.std()  # tiny, and added


def test_a_config_switched_to_pre_norm_after_building_is_refused_not_read_after_the_norm():
    from transformers import DynamicCache

    decoder = tiny_decoder("llama")
    copro = Coprocessor(decoder, CoprocessorConfig(num_latents=2, latent_source="final_norm"))
    copro.config.latent_source = "pre_norm"  # the hook is registered at construction: none here
    cache = DynamicCache()
    decoder(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache)
    with pytest.raises(RuntimeError, match="the final norm did not run"):
        copro(cache, None, torch.tensor([[4, 5]]))
