"""`dca init-study` on tiny local assets: the chosen mappings, measured and written."""

import json

import pytest
from tiny_models import toy_model_and_corpus

from dca.studies.init_study import VARIANTS, InitStudyArgs, run_init_study


def test_measures_the_chosen_variants_and_writes_them(tmp_path):
    model_dir, corpus = toy_model_and_corpus(tmp_path)
    chosen = ["replay last N tokens (gate 0)", "replay at own positions (gate 0)"]
    args = InitStudyArgs(model=model_dir, data=corpus, num_latents=2, sequences=2, seq_len=48, positions=2,
                         held_out_fraction=0.3, variants=chosen, out=str(tmp_path / "study"))
    results = run_init_study(args)
    assert list(results) == chosen
    for name in chosen:
        assert results[name]["config"]["latent_positions"] == VARIANTS[name].get("latent_positions", "after")
        assert len(results[name]["rel_change"]) == 6
    saved = json.loads((tmp_path / "study" / "init_study.json").read_text())
    assert list(saved["results"]) == chosen
    assert (tmp_path / "study" / "init_study.md").read_text().count("\n") == 2 + len(chosen)


def test_unknown_variant_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="known:"):
        InitStudyArgs(variants=["no such mapping"])


def test_points_leave_room_for_latents_that_replace_the_last_n_tokens():
    overwrite, default = ["overwrite last N tokens (gate 0)"], ["replay at own positions (gate 0)"]
    assert InitStudyArgs(num_latents=4, variants=overwrite + default).first_position() == 3
    assert InitStudyArgs(num_latents=4, variants=default).first_position() == 0
    assert InitStudyArgs(num_latents=4, variants=default, min_position=9).first_position() == 9
    assert InitStudyArgs(num_latents=4, variants=overwrite, min_position=0).first_position() == 0


def test_overwrite_at_gate_0_is_a_no_op_at_points_before_n_tokens(tmp_path):
    # points t < N-1 keep only the last t+1 latents (the others hidden); at gate 0 those are the replaced tokens
    model_dir, corpus = toy_model_and_corpus(tmp_path)
    overwrite = "overwrite last N tokens (gate 0)"
    # seq_len 40 leaves points t <= 7 = N-1 before the last 32 tokens: at least five of the six are below N-1
    args = InitStudyArgs(model=model_dir, data=corpus, num_latents=8, sequences=2, seq_len=40, positions=6,
                         min_position=0, held_out_fraction=0.3, variants=[overwrite], out=str(tmp_path / "study"))
    result = run_init_study(args)[overwrite]
    assert json.loads((tmp_path / "study" / "init_study.json").read_text())["first_position"] == 0
    assert result["rel_change"] == pytest.approx([0.0] * 6, abs=1e-5)
