"""scripts/overwrite_plus_pause.py: stacking pause tokens after an overwrite coprocessor's entries."""

import importlib.util
from pathlib import Path

import torch
from tiny_models import tiny_decoder

from dca import AugmentedLM, CoprocessorConfig

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "overwrite_plus_pause.py"


def load_script():
    spec = importlib.util.spec_from_file_location("overwrite_plus_pause", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_untrained_overwrite_under_the_stack_leaves_pause_tokens_as_they_are():
    script = load_script()
    decoder = tiny_decoder("llama").eval()
    seq, t, n, max_k = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(0)), 11, 4, 8
    overwrite = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=n, num_ahead=2)).eval()
    pause = AugmentedLM.from_decoder(decoder, CoprocessorConfig(method="pause", num_latents=n, num_ahead=2)).eval()
    losses = script.losses_at(decoder, overwrite, pause, seq, t, max_k)
    assert all(v.shape == (max_k,) for v in losses.values())
    # at gate 0 "overwrite" is the frozen decoder, so the stack is pause tokens alone, token for token
    torch.testing.assert_close(losses["overwrite"], losses["frozen"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["overwrite + pause tokens"], losses["pause tokens"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(losses["pause tokens"], losses["frozen"], atol=1e-3)
    # a trained (perturbed) overwrite changes the stack, which then differs from both parts
    with torch.no_grad():
        overwrite.coprocessor.latent_gain.fill_(1.0)
    moved = script.losses_at(decoder, overwrite, pause, seq, t, max_k)
    assert not torch.allclose(moved["overwrite + pause tokens"], moved["pause tokens"], atol=1e-3)
    assert not torch.allclose(moved["overwrite + pause tokens"], moved["overwrite"], atol=1e-3)
