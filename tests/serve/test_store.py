"""Stored augmented contexts: reuse equals recomputation token by token; mismatched models or tokens and damaged
entries are never served."""

import json
import warnings

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder
from transformers import DynamicCache

from dca import AugmentedLM, CoprocessorConfig
from dca.serve.store import ENTRY_NAME, TENSORS_NAME, ContextStore, StoredContext, StoreError, model_identity

NEW = 6


def make_model(family="llama", seed=0, **config):
    config = {"num_latents": 3, "num_ahead": 2, "lora_rank": 4, **config}
    model = AugmentedLM.from_decoder(tiny_decoder(family, "eager", seed=seed), CoprocessorConfig(**config)).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter, so that the latents matter
        for param in model.coprocessor.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    return model


def doc_and_prompt(doc_len=8, rest_len=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    doc = torch.randint(6, VOCAB, (doc_len,), generator=generator)
    return doc, torch.cat([doc, torch.randint(6, VOCAB, (rest_len,), generator=generator)])[None]


def reference_tokens(model, doc, prompt, steps=NEW, with_logits=False):
    """Augment the document alone, feed the rest of the prompt after its latents, then decode greedily: by hand."""
    with torch.no_grad():
        out = model.augment(doc[None])
        cache, mask, position = out.past_key_values, out.attention_mask, out.next_position_ids
        rest, logits, tokens, scores = prompt[:, doc.numel():], out.logits, [], []
        if rest.shape[1]:
            positions = position + torch.arange(rest.shape[1])
            mask = torch.cat([mask, torch.ones_like(rest)], 1)
            logits = model.decoder(input_ids=rest, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                   use_cache=True).logits[:, -1]
            position = positions[:, -1:] + 1
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            scores.append(logits)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            logits = model.decoder(input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache,
                                   use_cache=True).logits[:, -1]
            position = position + 1
    return (torch.cat(tokens, 1), torch.stack(scores, 1)) if with_logits else torch.cat(tokens, 1)


def generated(model, prompt, store):
    out = model.generate(prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None, store=store)
    return out[:, prompt.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("layout", ["replay", "after", "overwrite"])
@pytest.mark.parametrize("rest_len", [0, 4])
def test_a_stored_context_gives_the_tokens_of_augmenting_the_document_then_feeding_the_rest(
        tmp_path, family, layout, rest_len):
    model = make_model(family, latent_positions=layout)
    doc, prompt = doc_and_prompt(rest_len=rest_len)
    store = ContextStore(tmp_path / "store")
    store.put(model, doc)
    expected, logits = reference_tokens(model, doc, prompt, with_logits=True)
    out = model.generate(prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None, store=store,
                         output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, prompt.shape[1]:], expected)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, rtol=1e-5, atol=1e-5)
    assert store.stats["hits"] == 1 and store.stats["recomputed"] == 0
    # a store named by its folder, as dca generate passes it, serves the same
    assert torch.equal(generated(model, prompt, tmp_path / "store"), expected)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("rest_len", [0, 4])
def test_a_document_shorter_than_n_is_stored_with_its_padded_latents_masked(tmp_path, family, rest_len):
    # "overwrite" pads it to N and masks the latents over padding; they are stored and served masked, as augment has
    # them (a sliding window counts them)
    model = make_model(family, latent_positions="overwrite", num_latents=5)
    doc, prompt = doc_and_prompt(doc_len=3, rest_len=rest_len)
    store = ContextStore(tmp_path)
    stored = store.put(model, doc)
    assert stored.latents.shape[1] == 5 and store.load(model, doc).past_key_values.get_seq_length() == 5
    expected, logits = reference_tokens(model, doc, prompt, with_logits=True)
    out = model.generate(prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None, store=store,
                         output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, prompt.shape[1]:], expected)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, rtol=1e-5, atol=1e-5)
    assert store.stats["hits"] == 1


def test_an_entry_that_dropped_its_padded_latents_is_recomputed(tmp_path):
    # what dca wrote for a document shorter than N before session 13: only its own 3 of N = 5 latents, checksummed
    model = make_model("llama", latent_positions="overwrite", num_latents=5)
    doc, prompt = doc_and_prompt(doc_len=3, rest_len=4)
    store = ContextStore(tmp_path)
    full = store.put(model, doc)
    cache = DynamicCache()
    for i, layer in enumerate(full.past_key_values.layers):
        cache.update(layer.keys[..., 2:, :], layer.values[..., 2:, :], i)
    old = StoredContext(full.tokens, cache, full.latents[:, 2:], full.logits, full.latent_position_ids[:, 2:],
                        full.next_position_ids)
    store._write(model_identity(model), old, model)
    with pytest.raises(StoreError, match="holds 3 latents, this coprocessor writes 5"):
        store.load(model, doc)
    with pytest.warns(UserWarning, match="not served"):
        tokens = generated(model, prompt, store)
    assert torch.equal(tokens, reference_tokens(model, doc, prompt)) and store.stats["recomputed"] == 1
    assert store.load(model, doc).latents.shape[1] == 5


@pytest.mark.parametrize("doc_len", [1, 8])
@pytest.mark.parametrize("appended_at", ["point", "window"])
def test_overwrite_with_appended_latents_is_stored_and_served(tmp_path, doc_len, appended_at):
    # R = 2 of N = 3 latents replace the document's last tokens, the third follows (or precedes them); a 1-token
    # document keeps all 3, the one over augment's padding masked
    model = make_model("llama", latent_positions="overwrite", num_overwritten=2, appended_at=appended_at)
    doc, prompt = doc_and_prompt(doc_len=doc_len, rest_len=4)
    store = ContextStore(tmp_path)
    assert store.put(model, doc).latents.shape[1] == 3
    expected, logits = reference_tokens(model, doc, prompt, with_logits=True)
    out = model.generate(prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None, store=store,
                         output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, prompt.shape[1]:], expected)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, rtol=1e-5, atol=1e-5)
    assert store.stats["hits"] == 1


def test_the_longest_stored_document_is_used_and_a_prompt_without_one_is_augmented_at_its_end(tmp_path):
    model = make_model()
    doc, prompt = doc_and_prompt(doc_len=8, rest_len=5)
    store = ContextStore(tmp_path)
    store.put(model, doc[:4])
    store.put(model, doc)
    assert torch.equal(generated(model, prompt, store), reference_tokens(model, doc, prompt))
    other = torch.randint(6, VOCAB, (1, 10), generator=torch.Generator().manual_seed(7))
    plain = model.generate(other, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generated(model, other, store), plain[:, 10:])
    assert store.stats["misses"] == 1


def test_a_stored_context_equals_a_fresh_augment(tmp_path):
    model = make_model("qwen2")
    doc, _ = doc_and_prompt()
    store = ContextStore(tmp_path)
    store.put(model, doc)
    loaded, fresh = store.load(model, doc), model.augment(doc[None])
    assert torch.equal(loaded.latents, fresh.latents) and torch.equal(loaded.logits, fresh.logits)
    assert torch.equal(loaded.next_position_ids, fresh.next_position_ids)
    for a, b in zip(loaded.past_key_values.layers, fresh.past_key_values.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_another_decoder_another_coprocessor_or_other_tokens_are_never_served(tmp_path):
    model = make_model()
    doc, prompt = doc_and_prompt()
    store = ContextStore(tmp_path)
    entry = store.put(model, doc).path

    other_decoder = make_model(seed=1)  # same architecture, other weights
    other_coprocessor = make_model()
    with torch.no_grad():
        other_coprocessor.coprocessor.latent_gain.add_(0.5)
    other_tokens = prompt.clone()
    other_tokens[0, 3] = (other_tokens[0, 3] + 1) % VOCAB
    for other, ids in ((other_decoder, prompt), (other_coprocessor, prompt), (model, other_tokens)):
        hits = store.stats["hits"]
        plain = other.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(generated(other, ids, store), plain[:, ids.shape[1]:])  # augmented at the prompt's end
        assert store.stats["hits"] == hits
        with pytest.raises(StoreError):
            store.load(other, ids[0, :doc.numel()]) if other is not model else store.load(model, ids[0, :8])

    # an entry planted under another model's key (renamed) is refused by its own record, then recomputed
    planted = store.entry_path(model_identity(other_decoder), doc)
    entry.rename(planted)
    with pytest.raises(StoreError, match="another decoder or coprocessor"):
        store.load(other_decoder, doc)
    with pytest.warns(UserWarning, match="another decoder or coprocessor"):
        tokens = generated(other_decoder, prompt, store)
    assert torch.equal(tokens, reference_tokens(other_decoder, doc, prompt))
    assert store.load(other_decoder, doc).path == planted  # rewritten for the model that asked


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_entry(path):
    meta = json.loads(path.read_text())
    meta["num_latents"] = 2
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,file", [(flip_bytes, TENSORS_NAME), (truncate, TENSORS_NAME),
                                         (truncate, ENTRY_NAME), (edit_entry, ENTRY_NAME)])
def test_a_damaged_entry_is_detected_recomputed_and_rewritten(tmp_path, damage, file):
    model = make_model("gemma2")
    doc, prompt = doc_and_prompt()
    store = ContextStore(tmp_path)
    entry = store.put(model, doc).path
    good = {name: (entry / name).read_bytes() for name in (TENSORS_NAME, ENTRY_NAME)}
    damage(entry / file)
    with pytest.raises(StoreError):
        store.load(model, doc)
    with pytest.warns(UserWarning, match="not served"):
        tokens = generated(model, prompt, store)
    assert torch.equal(tokens, reference_tokens(model, doc, prompt))
    assert store.stats["recomputed"] == 1 and store.stats["hits"] == 0
    assert {name: (entry / name).read_bytes() for name in good} == good  # rewritten as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(generated(model, prompt, store), tokens)
    assert store.stats["hits"] == 1


def test_bad_calls_are_refused_with_a_message(tmp_path):
    model = make_model()
    doc, prompt = doc_and_prompt()
    store = ContextStore(tmp_path)
    with pytest.raises(ValueError, match="one prompt without padding"):
        model.generate(prompt.repeat(2, 1), store=store, max_new_tokens=2)
    with pytest.raises(ValueError, match="augment=True"):
        model.generate(prompt, store=store, augment="async", max_new_tokens=2)
    with pytest.raises(ValueError, match="1-D LongTensor"):
        store.put(model, doc[None])
    with pytest.raises(ValueError, match="token ids must lie"):
        store.put(model, doc + VOCAB)
    assert not any(tmp_path.iterdir())  # nothing written
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        ContextStore(tmp_path / "file")
    with pytest.raises(StoreError, match="needs a coprocessor"):
        ContextStore(tmp_path).put(AugmentedLM(model.decoder), doc)


def test_dca_cache_build_stores_each_document_and_generate_reuses_it(served_dirs, tmp_path, capsys):
    from dca.cli import main
    from dca.serve.loading import load_served

    model_dir, coprocessor_dir = served_dirs
    docs = tmp_path / "docs.txt"
    docs.write_text("the cat sees a dog .\n\nthe big red house and a small tree .\n")
    store = tmp_path / "store"
    assert main(["cache", "build", "--model", model_dir, "--coprocessor", coprocessor_dir, "--docs", str(docs),
                 "--out", str(store), "--device", "cpu"]) == 0
    assert "2 augmented contexts stored" in capsys.readouterr().out
    model, tokenizer = load_served(model_dir, coprocessor_dir, device="cpu")
    doc = torch.tensor(tokenizer("the big red house and a small tree .").input_ids)
    prompt = torch.tensor([tokenizer("the big red house and a small tree . the cat").input_ids])
    assert torch.equal(prompt[0, :doc.numel()], doc)
    reused = ContextStore(store)
    assert torch.equal(generated(model, prompt, reused), reference_tokens(model, doc, prompt))
    assert reused.stats["hits"] == 1


def test_dca_cache_build_refuses_bad_arguments_in_one_line(served_dirs, tmp_path, capsys):
    from dca.cli import main

    model_dir, coprocessor_dir = served_dirs
    (tmp_path / "file").write_text("x")
    (tmp_path / "docs.txt").write_text("the cat sees a dog .\n")  # not the builtin corpus: CI has none
    bad = ((["--max-tokens", "0"], "--max-tokens"), (["--docs", str(tmp_path / "no.txt")], "--docs"),
           (["--out", str(tmp_path / "file")], "--out"), (["--coprocessor", str(tmp_path)], "--coprocessor"))
    for argv, option in bad:
        code = main(["cache", "build", "--model", model_dir, "--coprocessor", coprocessor_dir,
                     "--docs", str(tmp_path / "docs.txt"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and option in err, err


def test_dca_generate_store_continues_from_the_stored_document(served_dirs, tmp_path):
    from dca.serve.generate import GenerateArgs, run_generate
    from dca.serve.loading import load_served
    from dca.serve.store_cli import CacheBuildArgs, run_cache_build

    model_dir, coprocessor_dir = served_dirs
    docs = tmp_path / "docs.txt"
    docs.write_text("the big red house and a small tree .\n")
    run_cache_build(CacheBuildArgs(model=model_dir, coprocessor=coprocessor_dir, docs=str(docs),
                                   out=str(tmp_path / "store"), device="cpu"))
    model, tokenizer = load_served(model_dir, coprocessor_dir, device="cpu")
    doc = torch.tensor(tokenizer("the big red house and a small tree .").input_ids)
    text = "the big red house and a small tree . the cat"
    prompt = torch.tensor([tokenizer(text).input_ids])
    expected = tokenizer.decode(reference_tokens(model, doc, prompt, steps=3)[0], skip_special_tokens=True)
    entry = next((tmp_path / "store").iterdir())
    flip_bytes(entry / TENSORS_NAME)  # a damaged entry makes itself heard: proof that --store reached the store
    args = GenerateArgs(model=model_dir, coprocessor=coprocessor_dir, prompt=[text], max_new_tokens=3,
                        stream=False, device="cpu", store=str(tmp_path / "store"))
    with pytest.warns(UserWarning, match="not served"):
        [result] = run_generate(args)
    assert result["augmented"] == expected
    with pytest.raises(ValueError, match="no such store folder"):
        GenerateArgs(model=model_dir, coprocessor=coprocessor_dir, store=str(tmp_path / "none"))


def test_the_serving_engine_runs_stored_prompts_from_the_store_and_batches_the_others(served, tmp_path):
    from dca.serve.batch import Row, Sampling
    from dca.serve.engine import Engine, Job
    from dca.serve.server import ServeArgs

    model, tokenizer = served
    doc = torch.tensor(tokenizer("the big red house and a small tree .").input_ids)
    stored_prompt = tokenizer("the big red house and a small tree . the cat").input_ids
    other_prompt = tokenizer("a dog chases the bird").input_ids
    store = ContextStore(tmp_path)
    store.put(model, doc)
    greedy = Sampling(temperature=0)
    jobs = [Job([Row(stored_prompt, 3, greedy)]), Job([Row(other_prompt, 3, greedy)])]
    engine = Engine(model, tokenizer, max_batch=4, max_wait=0.0, store=store)
    for job in jobs:
        engine.submit(job)
    engine.start()
    engine.stop()
    assert all(job.error is None for job in jobs) and store.stats["hits"] == 1
    expected = reference_tokens(model, doc, torch.tensor([stored_prompt]), steps=3)[0].tolist()
    got = jobs[0].rows[0].tokens
    assert got and got == expected[:len(got)]
    plain = model.generate(torch.tensor([other_prompt]), max_new_tokens=3, do_sample=False, eos_token_id=None,
                           pad_token_id=tokenizer.pad_token_id)[0, len(other_prompt):].tolist()
    got = jobs[1].rows[0].tokens
    assert got and got == plain[:len(got)]
    with pytest.raises(ValueError, match="no such store folder"):
        ServeArgs(store=str(tmp_path / "none"))


def test_a_frozen_coprocessor_with_other_weights_has_another_identity():
    a, b = make_model(), make_model()
    with torch.no_grad():
        b.coprocessor.latent_gain.add_(0.5)
    for model in (a, b):
        model.coprocessor.requires_grad_(False)  # e.g. frozen for serving: its tensors still name it
    assert model_identity(a)["coprocessor"] != model_identity(b)["coprocessor"]
    assert model_identity(a) == model_identity(make_model().requires_grad_(False))


def test_dca_cache_bench_times_each_way_and_serves_from_the_store(served_dirs, tmp_path):
    from dca.serve.store_cli import CacheBenchArgs, run_cache_bench

    model_dir, coprocessor_dir = served_dirs
    docs = tmp_path / "docs.txt"
    docs.write_text("the cat sees a dog .\n\nthe big red house and a small tree .\n\na .\n")
    out = tmp_path / "ttft.json"
    result = run_cache_bench(CacheBenchArgs(model=model_dir, coprocessor=coprocessor_dir, docs=str(docs), limit=2,
                                            min_tokens=3, repeats=1, question=" the cat", store=str(tmp_path / "s"),
                                            out=str(out), device="cpu"))
    assert json.loads(out.read_text())["median_ttft_s"] == result["median_ttft_s"]
    assert [row["document_tokens"] for row in result["rows"]] == [6, 9]  # "a ." is below --min-tokens
    assert result["store_hits"] == 2 * 2  # warm-up and one timed run per document, each from the store
    assert "dca cache bench" in out.with_suffix(".md").read_text()
