"""Saving and loading a coprocessor: exact round trips, and loud failures for the wrong decoder or damage."""

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from dca import AugmentedLM, CoprocessorConfig
from dca.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, _config_checksum


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


def test_an_edited_config_is_refused_naming_the_file(tmp_path):
    trained().save_pretrained(tmp_path / "adapter")
    config = tmp_path / "adapter" / CONFIG_NAME
    meta = json.loads(config.read_text())
    meta["coprocessor"]["num_latents"] = 5
    config.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=f"{CONFIG_NAME} was changed after it was saved"):
        AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama"))


def test_weights_that_do_not_fit_the_config_fail(tmp_path):
    trained().save_pretrained(tmp_path / "adapter")
    config = tmp_path / "adapter" / CONFIG_NAME
    meta = json.loads(config.read_text())
    meta["coprocessor"]["num_latents"] = 5
    meta["config_sha256"] = _config_checksum(meta)  # a forged checksum: the weights still do not fit
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


def test_a_kill_at_every_operation_of_a_save_over_an_adapter_leaves_the_old_or_the_new_one(tmp_path, monkeypatch):
    from faults import FaultInjector, Killed

    old, new = trained(), trained()
    recorder = FaultInjector(monkeypatch)
    new.save_pretrained(tmp_path / "dry" / "adapter")
    (tmp_path / "dry" / "adapter" / "README.md").write_text("notes")
    recorder.armed = True
    new.save_pretrained(tmp_path / "dry" / "adapter")  # the operations of a save over an existing adapter
    operations = recorder.log
    assert [op[0] for op in operations].count("_copy") == 1
    commit = operations.index(("_rename", ".adapter.tmp-*", ".adapter.new"))
    monkeypatch.undo()
    for kill_at in range(1, len(operations) + 1):
        folder = tmp_path / str(kill_at)
        old.save_pretrained(folder / "adapter")
        (folder / "adapter" / "README.md").write_text("notes")  # not ours: kept by every save
        with monkeypatch.context() as patch:
            injector = FaultInjector(patch, kill_at=kill_at)
            injector.armed = True
            with pytest.raises(Killed):
                new.save_pretrained(folder / "adapter")
        loaded = AugmentedLM.from_pretrained(folder / "adapter", decoder=tiny_decoder("llama"))
        expected = new if kill_at - 1 > commit else old
        assert torch.equal(loaded.coprocessor.soft_tokens, expected.coprocessor.soft_tokens), kill_at
        assert [p.name for p in folder.iterdir()] == ["adapter"]  # the interrupted save's leftovers are gone
        assert (folder / "adapter" / "README.md").read_text() == "notes"


def test_a_non_finite_adapter_is_neither_written_nor_loaded(tmp_path):
    from safetensors.torch import load_file, save_file

    from dca.errors import NonFiniteError

    model = trained()
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        model.coprocessor.soft_tokens[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="soft_tokens"):
        model.save_pretrained(tmp_path / "adapter")
    assert AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama"))  # the old one survives

    # a file that was written non-finite by other means (checksums recomputed) is refused on loading
    weights_file, config = tmp_path / "adapter" / WEIGHTS_NAME, tmp_path / "adapter" / CONFIG_NAME
    tensors = load_file(weights_file)
    tensors["soft_tokens"][0, 0] = float("inf")
    save_file(tensors, weights_file, metadata={"format": "pt"})
    import hashlib

    meta = json.loads(config.read_text())
    meta["weights_sha256"] = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    meta["config_sha256"] = _config_checksum(meta)
    config.write_text(json.dumps(meta))
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama"))


def test_saved_files_follow_the_umask_and_name_no_local_path(tmp_path):
    import os

    decoder = tiny_decoder("llama")
    decoder.save_pretrained(tmp_path / "my-model")
    decoder.config._name_or_path = str(tmp_path / "my-model")
    model = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=2))
    previous = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(previous)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "adapter" / WEIGHTS_NAME).stat().st_mode & 0o777 == 0o644
    text = (tmp_path / "adapter" / CONFIG_NAME).read_text()
    assert str(tmp_path) not in text and json.loads(text)["base_model"]["name_or_path"] == "my-model"


def test_a_bf16_copy_of_the_right_decoder_loads_and_another_dtype_is_named(tmp_path):
    trained().save_pretrained(tmp_path / "adapter")
    loaded = AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=tiny_decoder("llama").to(torch.bfloat16))
    assert loaded.coprocessor.soft_tokens.dtype == torch.bfloat16
    other = tiny_decoder("llama", seed=1).to(torch.float16)
    with pytest.raises(AdapterError, match=r"the dtypes differ \(float32 saved, float16 given\)"):
        AugmentedLM.from_pretrained(tmp_path / "adapter", decoder=other)


def test_loading_without_a_decoder_says_what_is_needed(tmp_path):
    from dca.adapter import load_adapter

    trained().save_pretrained(tmp_path / "adapter")
    with pytest.raises(TypeError, match="needs the decoder it was trained for"):
        load_adapter(tmp_path / "adapter", None)
