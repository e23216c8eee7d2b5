"""The README's first example runs as printed (a tiny model stands in for SmolLM2-135M: no hub in tests)."""

import re
from pathlib import Path

import torch
from tiny_models import tiny_decoder, word_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readmes_first_python_example_runs(tmp_path, monkeypatch):
    import dca.resources
    from dca import AugmentedLM

    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert 'load_model("smollm2-135m")' in code
    monkeypatch.setattr(dca.resources, "load_model", lambda *args, **kwargs: (tiny_decoder("llama"), word_tokenizer()))
    monkeypatch.chdir(tmp_path)  # it saves "my-coprocessor" where it runs
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    model, ids = scope["model"], scope["ids"]
    assert isinstance(model, AugmentedLM) and (tmp_path / "my-coprocessor" / "dca_config.json").is_file()
    assert scope["out"].latents.shape[1] == model.coprocessor.config.num_latents
    assert scope["tokens"].shape[0] == ids.shape[0] and scope["tokens"].shape[1] > ids.shape[1]
    with torch.no_grad():  # the reloaded coprocessor is the one that was saved
        assert torch.equal(model.augment(ids).logits, scope["out"].logits)
