"""scripts/latent_attention.py: the attention mass on the latents is read from the right cache entries."""

import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_decoder

from dca import AugmentedLM, CoprocessorConfig

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "latent_attention.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("latent_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mass_on_the_last_prompt_entries_is_read_from_one_plain_pass(script):
    decoder = tiny_decoder("llama", attn_implementation="eager").eval()
    seq, t, n, max_k = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(0)), 9, 4, 8
    frozen = script.latent_mass(None, decoder, seq, t, n, max_k)
    with torch.no_grad():  # queries x[t+1 .. t+max_k-1] over keys x[t-n+1 .. t], in one pass over the whole text
        attentions = decoder(seq[None, : t + max_k], output_attentions=True).attentions
    by_hand = torch.stack([a[0, :, t + 1 :, t + 1 - n : t + 1].sum(-1).mean(0) for a in attentions])
    torch.testing.assert_close(frozen, by_hand, rtol=1e-5, atol=1e-6)
    # "overwrite" at gate 0 leaves the cache as it was: its latents get exactly the mass of the tokens they replace
    untrained = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=n, num_ahead=2)).eval()
    assert untrained.coprocessor.config.latent_positions == "overwrite"
    torch.testing.assert_close(script.latent_mass(untrained, decoder, seq, t, n, max_k), frozen, rtol=1e-5, atol=1e-6)
    # appended latents (pause tokens) are other entries, with a mass of their own
    pause = AugmentedLM.from_decoder(decoder, CoprocessorConfig(method="pause", num_latents=n, num_ahead=2)).eval()
    appended = script.latent_mass(pause, decoder, seq, t, n, max_k)
    assert appended.shape == frozen.shape and ((appended > 0) & (appended < 1)).all()
    assert not torch.allclose(appended, frozen, atol=1e-3)
