"""The group mask against masks written out by hand."""

import torch
from transformers import Gemma2Config, LlamaConfig

from dca.config import CoprocessorConfig
from dca.masks import (
    group_attention_allowed,
    group_attention_mask,
    group_position_ids,
    latent_cache_mask,
    padded_latents,
    prefix_position_ids,
    to_additive,
)


def test_prefix_positions_follow_generate_for_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert prefix_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_group_positions_continue_after_the_insertion_point():
    pos = torch.arange(6)[None]
    assert group_position_ids(pos, torch.tensor([[1, 4]]), 3).tolist() == [[2, 3, 4, 5, 6, 7]]
    # without latents (the default) every layout is the plain continuation
    for layout in ("after", "shared", "replay"):
        assert group_position_ids(pos, torch.tensor([[1, 4]]), 3, layout=layout).tolist() == [[2, 3, 4, 5, 6, 7]]


def test_latent_positions_shared_and_replay_by_hand():
    pos = torch.arange(6)[None]
    at = torch.tensor([[1, 4]])
    # groups of 3 latents + 2 text tokens after t = 1 and t = 4
    assert group_position_ids(pos, at, 5, num_latents=3, layout="after").tolist() == [[2, 3, 4, 5, 6, 5, 6, 7, 8, 9]]
    assert group_position_ids(pos, at, 5, num_latents=3, layout="shared").tolist() == [[1, 1, 1, 2, 3, 4, 4, 4, 5, 6]]
    # replay: the positions of x[t-2 .. t], clamped at the first token
    assert group_position_ids(pos, at, 5, num_latents=3, layout="replay").tolist() == [[0, 0, 1, 2, 3, 2, 3, 4, 5, 6]]
    # latents only (the coprocessor's soft tokens), with left padding: padding has position 0 like x[first]
    padded = prefix_position_ids(torch.tensor([[0, 0, 1, 1, 1, 1]]))  # [0, 0, 0, 1, 2, 3]
    assert group_position_ids(padded, torch.tensor([[3, 5]]), 3, num_latents=3, layout="replay").tolist() == [
        [0, 0, 1, 1, 2, 3]]
    assert group_position_ids(padded, torch.tensor([[3]]), 3, num_latents=3, layout="shared").tolist() == [[1, 1, 1]]


def test_two_groups_of_two_after_four_tokens_by_hand():
    valid = torch.ones(1, 4, dtype=torch.long)
    allowed = group_attention_allowed(valid, prefix_position_ids(valid), torch.tensor([[0, 2]]), 2)
    #          prefix 0 1 2 3 | g0 g0 g1 g1
    expected = [[1, 0, 0, 0, 1, 0, 0, 0],  # group 0 (after t=0), member 0
                [1, 0, 0, 0, 1, 1, 0, 0],  # group 0, member 1
                [1, 1, 1, 0, 0, 0, 1, 0],  # group 1 (after t=2), member 0
                [1, 1, 1, 0, 0, 0, 1, 1]]  # group 1, member 1
    assert allowed[0].long().tolist() == expected


def test_bidirectional_groups_padding_and_sliding_window_by_hand():
    valid = torch.tensor([[0, 1, 1, 1]])  # one left pad
    pos = prefix_position_ids(valid)  # [0, 0, 1, 2]
    full = group_attention_allowed(valid, pos, torch.tensor([[3]]), 2, causal_within_group=False)
    assert full[0].long().tolist() == [[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    # group members sit at positions 3, 4; window 2 keeps keys at distance 0 and 1 only
    windowed = group_attention_allowed(valid, pos, torch.tensor([[3]]), 2, sliding_window=2)
    assert windowed[0].long().tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]


def test_overwrite_before_n_tokens_hides_the_latents_that_replace_nothing_by_hand():
    valid = torch.ones(1, 4, dtype=torch.long)
    pos = prefix_position_ids(valid)
    # N = 3 latents and one text token after t = 0 (one real token) and t = 3 (four): replaced = 3
    allowed = group_attention_allowed(valid, pos, torch.tensor([[0, 3]]), 4, replaced=3)
    #          prefix 0 1 2 3 | group 0   | group 1
    expected = [[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],  # group 0, latent 0: replaces nothing, sees only itself
                [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],  # latent 1: nothing either
                [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],  # latent 2: replaces x[0]
                [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # x[1]: sees latent 2 and itself
                [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # group 1: x[0] is kept, x[1..3] replaced
                [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
                [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0],
                [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]]
    assert allowed[0].long().tolist() == expected
    assert padded_latents(valid, torch.tensor([[0, 1, 3]]), 3).tolist() == [[2, 1, 0]]
    assert padded_latents(valid, torch.tensor([[2, 3]]), 3) is None and padded_latents(valid, pos[:, :1], 0) is None


def test_appended_latents_before_the_window_by_hand():
    # N = 3 latents, R = 2 of them replace x[t-1 .. t], one appended; then one text token; t = 0 and t = 4
    pos, at = torch.arange(6)[None], torch.tensor([[0, 4]])
    after = group_position_ids(pos, at, 4, num_latents=3, layout="overwrite", replaced=2)
    window = group_position_ids(pos, at, 4, num_latents=3, layout="overwrite", replaced=2, appended_first=True)
    assert after.tolist() == [[0, 0, 1, 2, 3, 4, 5, 6]]  # x[t-1], x[t], the appended one, the text
    assert window.tolist() == [[0, 1, 1, 2, 3, 4, 5, 6]]  # the appended one, x[t-1] and x[t] one on, the text
    # at t = 0 (one real token) the first replacing latent replaces nothing: latent 1 after the appended latent 0
    allowed = group_attention_allowed(torch.ones(1, 2, dtype=torch.long), pos[:, :2], torch.tensor([[0]]), 4,
                                      replaced=2, padded_from=1)
    assert allowed[0].long().tolist() == [[0, 0, 1, 0, 0, 0],  # the appended latent
                                          [0, 0, 1, 1, 0, 0],  # replaces nothing: no other member sees it
                                          [0, 0, 1, 0, 1, 0],  # replaces x[0]: the appended latent, itself
                                          [0, 0, 1, 0, 1, 1]]  # the text
    config = CoprocessorConfig(num_latents=3, num_overwritten=2, appended_at="window")
    # a cache after a left-padded prompt [pad, x0, x1, x2]: x0 kept, the appended latent, those replacing x1, x2
    assert latent_cache_mask(config, torch.tensor([[0, 1, 1, 1]])).tolist() == [[0, 1, 1, 1, 1]]
    assert latent_cache_mask(config, torch.tensor([[1]])).tolist() == [[1, 0, 1]]  # padded to R = 2 first
    point = CoprocessorConfig(num_latents=3, num_overwritten=2)
    assert latent_cache_mask(point, torch.tensor([[1]])).tolist() == [[0, 1, 1]]


def test_additive_mask_uses_the_dtype_minimum_not_inf():
    mask = to_additive(torch.tensor([[[True, False]]]), torch.float32)
    assert mask.shape == (1, 1, 1, 2)
    assert mask[0, 0, 0, 0] == 0 and mask[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_per_layer_kind_masks_for_hybrid_models():
    valid = torch.ones(1, 8, dtype=torch.long)
    args = (valid, prefix_position_ids(valid), torch.tensor([[6]]), 2, torch.float32)
    gemma = Gemma2Config(sliding_window=3, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    masks = group_attention_mask(gemma, *args)
    assert set(masks) == {"sliding_attention", "full_attention"}
    assert (masks["sliding_attention"] < 0).sum() > (masks["full_attention"] < 0).sum()
    assert isinstance(group_attention_mask(LlamaConfig(), *args), torch.Tensor)
