"""`dca demo` end to end on a tiny local model and corpus: every part of the report is written."""

import json

import pytest
from tiny_models import toy_model_and_corpus

from dca import AugmentedLM, CoprocessorConfig
from dca.cli import main
from dca.resources import load_model
from dca.studies.demo import DemoArgs, run_demo


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model_dir, corpus = toy_model_and_corpus(root)
    decoder, _ = load_model(model_dir)
    AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=2, num_ahead=2)).save_pretrained(root / "adapter")
    return model_dir, corpus, str(root / "adapter")


def test_demo_writes_the_report(assets, tmp_path):
    model_dir, corpus, adapter = assets
    result = run_demo(DemoArgs(coprocessor=adapter, model=model_dir, data=corpus, sequences=2, seq_len=40,
                               positions=2, train_steps=2, out=str(tmp_path / "report")))
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "live-run", "ppl_by_position.png", "report.json", "report.md"]
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["held_out"]["ks"] == [1, 2, 4, 8, 16, 32] and len(saved["held_out"]["rel_change"]) == 6
    assert saved["live_training"]["last"]["step"] == 2
    assert "| k | base ppl |" in (tmp_path / "report" / "report.md").read_text()
    assert result["prompt"]["base"] != "" or result["prompt"]["augmented"] != ""


def test_demo_without_a_coprocessor_says_how_to_get_one(assets, tmp_path, capsys):
    model_dir, corpus, _ = assets
    code = main(["demo", "--coprocessor", str(tmp_path / "missing"), "--model", model_dir, "--data", corpus,
                 "--sequences", "2", "--seq-len", "40", "--positions", "2", "--out", str(tmp_path / "r")])
    assert code == 2 and "dca train" in capsys.readouterr().err
