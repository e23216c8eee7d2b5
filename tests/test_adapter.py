"""Saving and loading a coprocessor: exact round trips, and loud failures for the wrong decoder or damage."""

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from dca import AugmentedLM, CoprocessorConfig
from dca.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError


def trained(family="llama", **config):
    model = AugmentedLM.from_decoder(tiny_decoder(family), CoprocessorConfig(
        **{"num_latents": 2, "num_ahead": 3, "gate_init": 0.5, **config}))
    with torch.no_grad():  # move every trainable weight away from its initial value
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.mark.parametrize("variant", [
    {}, {"lora_rank": 4}, {"init": "scratch", "latent_scale": "learned"}, {"method": "pause"},
])
def test_round_trip_is_exact(tmp_path, variant):
    model = trained(**variant)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama")).eval()
    assert loaded.coprocessor.config == model.coprocessor.config
    for (name, a), (_, b) in zip(model.coprocessor.state_dict().items(), loaded.coprocessor.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    prompt = torch.randint(0, VOCAB, (1, 7))
    assert torch.equal(model.augment(prompt).logits, loaded.augment(prompt).logits)


def test_lora_adapter_stores_only_the_low_rank_weights(tmp_path):
    full, lora = trained(), trained(lora_rank=2)
    full.save_pretrained(tmp_path / "full")
    lora.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / WEIGHTS_NAME).stat().st_size < (tmp_path / "full" / WEIGHTS_NAME).stat().st_size / 2


def test_loading_onto_another_decoder_names_both(tmp_path):
    trained().save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"trained for .*llama.*but the decoder given is .*qwen2"):
        AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("qwen2"))
    with pytest.raises(AdapterError, match="fingerprint"):  # same architecture, other weights
        AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama", seed=1))


def test_truncated_weights_fail_clearly(tmp_path):
    trained().save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="corrupted or truncated"):
        AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama"))


def test_flipped_byte_fails_clearly(tmp_path):
    trained().save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="corrupted"):
        AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama"))


def test_damaged_or_missing_config_fails_clearly(tmp_path):
    with pytest.raises(AdapterError, match="missing"):
        AugmentedLM.from_pretrained(tmp_path, decoder=tiny_decoder("llama"))
    trained().save_pretrained(tmp_path / "adapter")
    config = tmp_path / "adapter" / CONFIG_NAME
    config.write_text(config.read_text()[:50])
    with pytest.raises(AdapterError, match="damaged"):
        AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama"))


def test_weights_that_do_not_fit_the_config_fail(tmp_path):
    trained().save_pretrained(tmp_path / "adapter")
    config = tmp_path / "adapter" / CONFIG_NAME
    meta = json.loads(config.read_text())
    meta["coprocessor"]["num_latents"] = 5
    config.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="does not fit"):
        AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama"))


def test_saving_over_an_adapter_replaces_it_whole(tmp_path):
    first, second = trained(), trained()
    first.save_pretrained(tmp_path / "adapter")
    second.save_pretrained(tmp_path / "adapter")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging or backup left behind
    loaded = AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama"))
    assert torch.equal(loaded.coprocessor.soft_tokens, second.coprocessor.soft_tokens)
