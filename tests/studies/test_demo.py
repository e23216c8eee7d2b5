"""`dca demo` end to end on a tiny local model and corpus: every part of the report is written."""

import json

import pytest
import torch
from tiny_models import toy_model_and_corpus

from dca import AugmentedLM, CoprocessorConfig
from dca.cli import main
from dca.eval.evaluate import KS, held_out_eval_set, perplexity_by_position
from dca.resources import load_model
from dca.studies.demo import DemoArgs, run_demo


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model_dir, corpus = toy_model_and_corpus(root)
    decoder, _ = load_model(model_dir)
    model = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=2, num_ahead=2))
    with torch.no_grad():  # a stand-in for training: the gate opened, the soft tokens moved
        model.coprocessor.latent_gain.fill_(0.5)
        model.coprocessor.soft_tokens.add_(torch.randn(model.coprocessor.soft_tokens.shape,
                                                       generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(root / "adapter")
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
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| k | base ppl | trained | 95% CI | untrained (step 0) | 95% CI |" in text
    assert "4 augmentation points at t >= 1." in text  # "overwrite" with N = 2
    # the untrained column: the same configuration at initialisation, on the same held-out points
    decoder, tokenizer = load_model(model_dir)
    config = AugmentedLM.from_pretrained(adapter, decoder).coprocessor.config
    seqs, positions = held_out_eval_set(tokenizer, corpus, 0.05, 2, 40, 2, max(KS), min_position=config.first_position)
    fresh = perplexity_by_position(AugmentedLM.from_decoder(decoder, config).eval(), seqs, positions)
    assert saved["held_out_untrained"]["rel_change"] == pytest.approx(fresh.rel_change, rel=1e-5, abs=1e-7)
    assert saved["held_out"]["rel_change"] != pytest.approx(fresh.rel_change, rel=1e-3)
    assert result["prompt"]["base"] != "" or result["prompt"]["augmented"] != ""


def test_demo_without_a_coprocessor_says_how_to_get_one(assets, tmp_path, capsys):
    model_dir, corpus, _ = assets
    code = main(["demo", "--coprocessor", str(tmp_path / "missing"), "--model", model_dir, "--data", corpus,
                 "--sequences", "2", "--seq-len", "40", "--positions", "2", "--out", str(tmp_path / "r")])
    assert code == 2 and "dca train" in capsys.readouterr().err


@pytest.mark.parametrize("latents", [[8], [16], [16, 64], [5]])
def test_the_plot_draws_the_papers_table_1_column_for_each_latent_count_it_has(tmp_path, monkeypatch, latents):
    import matplotlib.axes

    from dca.eval.evaluate import PAPER_TABLE1, PositionReport
    from dca.studies.demo import plot_positions

    drawn, plot = {}, matplotlib.axes.Axes.plot

    def recording(self, x, y, **kwargs):
        drawn[kwargs.get("label")] = list(y)
        return plot(self, x, y, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    ones = [0.01] * len(KS)
    report = PositionReport(list(KS), ones, ones, ones, ones, ones, num_sequences=1, num_groups=1)
    plot_positions({"trained": report}, tmp_path / "plot.png", "title", paper_latents=latents)
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert drawn.pop("trained") == [1.0] * len(KS)
    assert drawn == {f"paper, Gemma-2 2B, {n} latents": PAPER_TABLE1[n] for n in latents if n in PAPER_TABLE1}
