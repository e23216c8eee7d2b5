"""`training_loss` against the independent reference (`independent_reference.py`), token by token.

Every coprocessor weight is perturbed (LoRA matrices, full weights, soft tokens, gate and gains), so that
no part of the computation is an identity or a zero that could hide a wrong mask, position or mapping.
"""

import pytest
import torch
from independent_reference import group_losses
from tiny_models import FAMILIES, VOCAB, appended, tiny_decoder

from dca import AugmentedLM, CoprocessorConfig

RTOL, ATOL = 1e-5, 1e-6
LAYOUTS = ("after", "shared", "replay")
MODES = ("grouped", "dense")


def perturbed_model(family="llama", impl="eager", seed=0, **config):
    config = appended({"num_latents": 3, "num_ahead": 4, "latent_anchor": "replay", "latent_scale": "gated", **config})
    model = AugmentedLM.from_decoder(tiny_decoder(family, impl), CoprocessorConfig(**config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.coprocessor.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name == "latent_gain":  # a gate well away from 0, gains away from 1
                param.copy_(0.7 + 0.2 * noise)
            elif "lora_" in name:
                param.add_(0.2 * noise)  # lora_B starts at zero: the adapter must act
            else:
                param.add_(param.std().clamp(min=0.05) * 0.3 * noise)
    return model


def assert_matches_reference(model, input_ids, positions, attention_mask=None):
    """Each group's token losses from training_loss (grouped and dense) equal the reference's."""
    lengths = [input_ids.shape[1]] * len(input_ids) if attention_mask is None else attention_mask.sum(1).tolist()
    with torch.no_grad():
        expected = [[group_losses(model, input_ids[b : b + 1, :length], t) for t in positions[b].tolist()]
                    for b, length in enumerate(lengths)]
        for mode in MODES:
            model.group_attention = mode
            out = model.training_loss(input_ids, positions, attention_mask)
            for b, row in enumerate(expected):
                for p, reference in enumerate(row):
                    fast = out.token_losses[b, p][out.target_mask[b, p]]
                    torch.testing.assert_close(fast, reference, rtol=RTOL, atol=ATOL,
                                               msg=lambda m, b=b, p=p, mode=mode: f"{mode}, row {b}, group {p}: {m}")
            assert out.num_targets == sum(len(r) for row in expected for r in row)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("attention", ["causal", "full"])
def test_every_layout_and_soft_token_attention(family, layout, attention):
    model = perturbed_model(family, latent_positions=layout, soft_token_attention=attention)
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 16))
    # t = 0 and 1 (replayed positions and anchors clamped at the first token), a window that runs off the end
    assert_matches_reference(model, input_ids, torch.tensor([[0, 7, 13], [1, 5, 11]]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["causal", "full"])
@pytest.mark.parametrize("extra", [{}, {"lora_rank": 2, "latent_source": "pre_norm"}])
def test_the_overwrite_layout(family, attention, extra):
    # the reference's decoder reads x[0..t-N] alone, then the latents: nothing of dca's masks or crop is shared
    model = perturbed_model(family, latent_positions="overwrite", soft_token_attention=attention, **extra)
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones_like(input_ids)
    mask[1, 13:] = 0  # right padding
    # t < N-1 (the group keeps its last t+1 latents), t = N-1 (it sees no original token), a window that runs off
    # the end
    assert_matches_reference(model, input_ids, torch.tensor([[0, 2, 7, 13], [1, 3, 5, 11]]), mask)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["causal", "full"])
@pytest.mark.parametrize("replaced", [1, 2])
@pytest.mark.parametrize("appended_at", ["point", "window"])
def test_overwrite_with_appended_latents(family, attention, replaced, appended_at):
    # R of N = 3 latents replace x[t-R+1 .. t], the others are appended after them (or before them, "window"):
    # positions, anchors, masks
    model = perturbed_model(family, num_latents=3, latent_positions="overwrite", num_overwritten=replaced,
                            soft_token_attention=attention, appended_at=appended_at)
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones_like(input_ids)
    mask[1, 13:] = 0  # right padding
    # t < R-1 (a latent over padding), t = R-1, a window that runs off the end
    assert_matches_reference(model, input_ids, torch.tensor([[0, 2, 7, 13], [1, 3, 5, 11]]), mask)


@pytest.mark.parametrize("variant", [
    {"latent_source": "pre_norm"},
    {"latent_scale": "none", "latent_anchor": "none"},
    {"latent_scale": "embed_rms", "latent_anchor": "none"},
    {"latent_scale": "learned", "latent_anchor": "last_token"},
    {"latent_scale": "gated", "latent_anchor": "last_token", "latent_positions": "shared"},
    {"lora_rank": 4},
    {"lora_rank": 2, "soft_token_attention": "full", "latent_positions": "after"},
    {"init": "scratch", "soft_token_init": "normal"},
    {"num_latents": 1, "num_ahead": 2},
    {"num_latents": 5, "num_ahead": 3, "soft_token_attention": "full"},
    {"method": "pause"},
    {"method": "pause", "latent_positions": "replay"},
])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_every_latent_mapping(family, variant):
    model = perturbed_model(family, **variant)
    torch.manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (2, 14))
    assert_matches_reference(model, input_ids, torch.tensor([[2, 6, 12], [0, 9, 10]]))


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_right_padding_and_sdpa(family):
    model = perturbed_model(family, "eager" if family == "gemma2" else "sdpa", soft_token_attention="full")
    torch.manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (2, 15))
    mask = torch.ones_like(input_ids)
    mask[1, 11:] = 0  # the groups near this row's end lose their padded targets
    assert_matches_reference(model, input_ids, torch.tensor([[3, 8, 13], [2, 7, 9]]), mask)


def test_the_reference_sees_what_it_should():
    """The reference itself can fail: a coprocessor that writes other latents changes its losses."""
    model = perturbed_model("llama", soft_token_attention="full")
    input_ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = group_losses(model, input_ids, 6)
        model.coprocessor.soft_tokens[0].add_(1.0)  # under full attention the first soft token reaches every latent
        after = group_losses(model, input_ids, 6)
    assert not torch.allclose(before, after, rtol=1e-3)


def test_the_last_row_of_a_learned_position_table():
    """GPT-2's table has 128 rows: after t = 121 the last needed member (x[t+3], after 3 latents) is at 127."""
    model = perturbed_model("gpt2", latent_positions="after")
    input_ids = torch.randint(0, VOCAB, (1, 128), generator=torch.Generator().manual_seed(5))
    assert_matches_reference(model, input_ids, torch.tensor([[60, 121]]))


def test_one_target_is_its_own_mean():
    model = perturbed_model("llama")
    input_ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    out = model.training_loss(input_ids, torch.tensor([[6]]))  # only x[7] follows
    assert out.num_targets == 1 and torch.equal(out.loss, out.token_losses.sum())


@pytest.mark.parametrize("mode", MODES)
def test_full_soft_token_attention_made_causal_everywhere_is_caught(mode, monkeypatch):
    """The change that passed every test before this reference existed: full attention silently causal."""
    import dca.attention.grouped
    import dca.masks

    original = dca.masks.within_group_allowed

    def always_causal(group_size, *, causal=True, **kwargs):
        return original(group_size, causal=True, **kwargs)

    for module in (dca.masks, dca.attention.grouped):
        monkeypatch.setattr(module, "within_group_allowed", always_causal)
    model = perturbed_model("llama", soft_token_attention="full")
    input_ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model.group_attention = mode
        fast = model.training_loss(input_ids, torch.tensor([[6]])).token_losses[0, 0]
        assert not torch.allclose(fast, group_losses(model, input_ids, 6), rtol=1e-4)
