"""`dca generate`: prompts from arguments, a file or standard input; frozen vs augmented; streamed."""

import io
import types

import pytest
import torch
from transformers import set_seed

from dca.cli import main
from dca.serve.generate import GenerateArgs, run_generate
from dca.serve.loading import chat_text


def reference(model, tokenizer, text, augment, templated=False, seed=0, **kwargs):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)["input_ids"]
    set_seed(seed)
    out = model.generate(ids, augment=augment, pad_token_id=1, eos_token_id=1, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_compare_prints_the_frozen_and_the_augmented_continuation(served_dirs, served, capsys):
    model, tokenizer = served
    prompts = ["the cat sees", "a big red dog chases the small bird and then"]
    results = run_generate(GenerateArgs(model=served_dirs[0], coprocessor=served_dirs[1], prompt=prompts,
                                        compare=True, max_new_tokens=8, device="cpu"))
    out = capsys.readouterr().out
    for prompt, result in zip(prompts, results, strict=True):
        assert result["frozen"] == reference(model, tokenizer, prompt, False, max_new_tokens=8, do_sample=False)
        assert result["augmented"] == reference(model, tokenizer, prompt, True, max_new_tokens=8, do_sample=False)
        # streamed as it came, under its label
        assert f"--- frozen:\n{result['frozen']}" in out and f"--- augmented:\n{result['augmented']}" in out
    assert any(r["frozen"] != r["augmented"] for r in results)  # the two can be told apart


def test_prompts_from_stdin_and_file_with_sampling_and_chat(served_dirs, served, tmp_path, monkeypatch, capsys):
    model, tokenizer = served
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sees\n\nthe tree\n"))
    sampling = dict(do_sample=True, temperature=0.7, top_k=5, seed=3, max_new_tokens=6, device="cpu")
    from_stdin = run_generate(GenerateArgs(model=served_dirs[0], coprocessor=served_dirs[1], **sampling))
    assert [r["prompt"] for r in from_stdin] == ["the cat sees", "the tree"]
    expected = reference(model, tokenizer, "the tree", True, seed=3, max_new_tokens=6, do_sample=True,
                         temperature=0.7, top_k=5, top_p=1.0)
    assert from_stdin[1]["augmented"] == expected
    (tmp_path / "prompts.txt").write_text("the tree\n")
    from_file = run_generate(GenerateArgs(model=served_dirs[0], coprocessor=served_dirs[1],
                                          file=str(tmp_path / "prompts.txt"), chat=True, augment=False, stream=False,
                                          **sampling))
    text = chat_text(tokenizer, [{"role": "user", "content": "the tree"}])
    assert from_file[0]["frozen"] == reference(model, tokenizer, text, False, templated=True, seed=3,
                                               max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, top_p=1.0)
    assert from_file[0]["frozen"] in capsys.readouterr().out


@pytest.mark.parametrize("argv, names", [
    (["--prompt", "the", "--temperature", "0.5"], "--do-sample"),
    (["--prompt", "the", "--compare"], "--compare"),
    (["--prompt", "the", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "the", "--do-sample", "--top-p", "1.5"], "--top-p"),
    (["--file", "/no/such/prompts.txt"], "--file"),
    (["--prompt", "the", "--file", "prompts.txt"], "--file"),
])
def test_bad_arguments_are_one_line_errors(served_dirs, argv, names, capsys):
    assert main(["generate", "--model", served_dirs[0], *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert names in err and "\n" not in err


def test_empty_stdin_is_an_error(served_dirs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    assert main(["generate", "--model", served_dirs[0]]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_no_coprocessor_is_the_frozen_model(served_dirs, served):
    model, tokenizer = served
    result = run_generate(GenerateArgs(model=served_dirs[0], prompt=["the cat sees"], max_new_tokens=5, device="cpu"))
    assert result == [{"prompt": "the cat sees", "frozen": reference(model, tokenizer, "the cat sees", False,
                                                                      max_new_tokens=5, do_sample=False)}]
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("command", ["generate", "serve", "bench-serve"])
def test_help_works(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "--model" in capsys.readouterr().out


@pytest.mark.parametrize("argv, names", [
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--max-batch", "0"], "--max-batch"),
    (["serve", "--max-wait-ms", "-1"], "--max-wait-ms"),
    # a model that is there (CI has no builtin one), so that the coprocessor is what fails
    (["serve", "--model", "{model}", "--coprocessor", "/no/such/coprocessor"], "--coprocessor"),
    (["serve", "--model", "/no/such/model"], "--model"),
    (["bench-serve", "--concurrency", "4", "0"], "--concurrency"),
    (["bench-serve", "--requests", "0"], "--requests"),
])
def test_serve_arguments_are_checked_before_anything_loads(argv, names, served_dirs, capsys, monkeypatch):
    monkeypatch.setattr("dca.serve.loading.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main([arg.replace("{model}", served_dirs[0]) for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert names in err and "\n" not in err


def test_prompt_is_repeatable(served_dirs, monkeypatch):
    import dca.serve.generate as generate

    seen = []
    monkeypatch.setattr(generate, "read_prompts", lambda args: seen.append(list(args.prompt)) or [])
    # nothing is continued: only the parsing matters
    monkeypatch.setattr(generate, "load_served", lambda *a, **k: (types.SimpleNamespace(coprocessor=None), None))
    monkeypatch.setattr(GenerateArgs, "generation_config", lambda self, tokenizer: None)
    assert main(["generate", "--model", served_dirs[0], "--prompt", "a", "b", "--prompt", "c"]) == 0
    assert seen == [["a", "b", "c"]]
