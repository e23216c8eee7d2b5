import dataclasses
import typing

import pytest

from dca import CoprocessorConfig
from dca.checks import literal_choices
from dca.config import earliest_point
from dca.errors import ArgumentError


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_latents": 0}, "num_latents"),
    ({"num_latents": 2.5}, "num_latents"),
    ({"num_ahead": -1}, "num_ahead"),
    ({"num_ahead": True}, "num_ahead"),
    ({"init": "random"}, "init"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"lora_rank": 8, "init": "scratch"}, "scratch"),
    ({"lora_alpha": -1.0}, "lora_alpha"),
    ({"soft_token_attention": "bidirectional"}, "soft_token_attention"),
    ({"latent_source": "middle"}, "latent_source"),
    ({"latent_scale": "huge"}, "latent_scale"),
    ({"soft_token_init": "zeros"}, "soft_token_init"),
    ({"init_seed": "1"}, "init_seed"),
    ({"method": "prefix"}, "method"),
    ({"method": "pause", "lora_rank": 4}, "pause tokens"),
    ({"latent_positions": "before"}, "latent_positions"),
])
def test_invalid_values_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoprocessorConfig(**kwargs)


def test_every_choice_field_refuses_a_value_outside_its_literal():
    hints = typing.get_type_hints(CoprocessorConfig)
    choice_fields = [f.name for f in dataclasses.fields(CoprocessorConfig) if literal_choices(hints[f.name])]
    assert set(choice_fields) == {"method", "init", "soft_token_attention", "latent_source", "latent_scale",
                                  "soft_token_init", "latent_anchor", "latent_positions", "appended_at"}
    for name in choice_fields:
        with pytest.raises(ArgumentError, match=f"{name} must be one of") as caught:
            CoprocessorConfig(**{name: "bogus"})
        assert caught.value.argument == name


def test_round_trips_through_a_dict():
    config = CoprocessorConfig(num_latents=8, num_ahead=4, lora_rank=16, latent_scale="learned")
    assert CoprocessorConfig.from_dict(config.to_dict()) == config
    assert config.uses_lora and not CoprocessorConfig().uses_lora


def test_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match="unknown fields"):
        CoprocessorConfig.from_dict({"num_latents": 4, "latents": 8})


def test_configs_saved_before_latent_positions_existed_load_as_after():
    saved = CoprocessorConfig(num_latents=4).to_dict()
    del saved["latent_positions"]
    config = CoprocessorConfig.from_dict(saved)
    assert config.latent_positions == "after" and config.positions_taken == 4
    assert CoprocessorConfig(num_latents=4, latent_positions="replay").positions_taken == 0
    assert CoprocessorConfig(num_latents=4, latent_positions="shared").positions_taken == 0


def test_latent_positions_default_follows_the_anchor_and_the_method():
    assert CoprocessorConfig().latent_positions == "overwrite" and CoprocessorConfig().gate_init == 0.0
    assert CoprocessorConfig(latent_anchor="none").latent_positions == "after"
    assert CoprocessorConfig(method="pause").latent_positions == "after"  # between prompt and answer
    assert CoprocessorConfig(latent_anchor="none", latent_positions="replay").latent_positions == "replay"
    assert CoprocessorConfig.from_dict(CoprocessorConfig().to_dict()) == CoprocessorConfig()


def test_the_paper_preset_is_the_literal_method():
    paper = CoprocessorConfig.paper()
    assert (paper.latent_source, paper.latent_scale, paper.latent_anchor, paper.latent_positions, paper.init) == (
        "final_norm", "none", "none", "after", "decoder")
    assert paper.positions_taken == paper.num_latents  # the text resumes at t+N+1
    # overrides set other fields and may replace the preset's own
    assert CoprocessorConfig.paper(num_latents=4, lora_rank=8).to_dict() == {
        **paper.to_dict(), "num_latents": 4, "lora_rank": 8}
    assert CoprocessorConfig.paper(latent_scale="gated").latent_scale == "gated"


def test_the_dca_preset_is_the_default_and_differs_from_the_paper_where_the_readme_says():
    assert CoprocessorConfig.dca() == CoprocessorConfig()
    assert CoprocessorConfig.dca(num_latents=8) == CoprocessorConfig(num_latents=8)
    assert CoprocessorConfig.preset("paper", num_ahead=3) == CoprocessorConfig.paper(num_ahead=3)
    dca, paper = CoprocessorConfig.dca().to_dict(), CoprocessorConfig.paper().to_dict()
    assert {k for k in dca if dca[k] != paper[k]} == {"latent_scale", "latent_anchor", "latent_positions"}
    with pytest.raises(ValueError, match="preset must be one of"):
        CoprocessorConfig.preset("literal")


def test_earliest_point_is_min_position_or_the_latest_first_position():
    overwrite = CoprocessorConfig(num_latents=4, latent_positions="overwrite")
    after = CoprocessorConfig(num_latents=8, latent_positions="after")
    assert earliest_point(None, [after, overwrite]) == 3  # every coprocessor on points where all of them apply
    assert earliest_point(None, [after]) == 0 and earliest_point(None, []) == 0
    assert earliest_point(0, [overwrite]) == 0 and earliest_point(7, [after]) == 7  # an explicit value is honoured
