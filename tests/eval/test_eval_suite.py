"""`dca eval` on tiny local assets: Table 1 for two coprocessors (the method and pause tokens)."""

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import toy_model_and_corpus

from dca import AugmentedLM, CoprocessorConfig
from dca.errors import ArgumentError
from dca.eval.compare import CompareArgs, run_compare
from dca.eval.eval_suite import EvalArgs, coprocessor_labels, plot_accuracy_by_latents, run_eval
from dca.eval.evaluate import KS, held_out_eval_set, perplexity_by_position
from dca.resources import load_model


def trained(model: AugmentedLM) -> AugmentedLM:
    """Stand-in for training: every trainable weight moved away from its initial value."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.coprocessor.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir, corpus = toy_model_and_corpus(root)
    decoder, _ = load_model(model_dir)
    paths = []
    for name, config in {"copro": CoprocessorConfig(num_latents=4, num_ahead=2),
                         "pause": CoprocessorConfig(method="pause", num_latents=8, num_ahead=2)}.items():
        model = AugmentedLM.from_decoder(decoder, config)
        trained(model)
        paths.append(str(model.save_pretrained(root / name)))
    return model_dir, corpus, paths


def test_table1_for_several_coprocessors(assets, tmp_path, capsys):
    model_dir, corpus, paths = assets
    result = run_eval(EvalArgs(coprocessors=paths, model=model_dir, data=corpus, sequences=3, seq_len=40,
                               positions=2, bootstrap=50, out=str(tmp_path)))
    assert set(result["table1"]) == {"copro", "pause"}
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["coprocessors"]["pause"]["method"] == "pause"
    text = (tmp_path / "eval.md").read_text()
    assert ("| k | copro (N=4) | copro untrained | pause (N=8) | pause untrained | paper N=8 |" in text
            and "Reproduce:" in text and "6 augmentation points at t >= 3;" in text)  # copro replaces 4 tokens
    # each untrained column is the same configuration at initialisation, scored on the same points
    decoder, tokenizer = load_model(model_dir)
    seqs, positions = held_out_eval_set(tokenizer, corpus, 0.05, 3, 40, 2, max(KS), min_position=3)  # copro's N-1
    for name, path in zip(("copro", "pause"), paths, strict=True):
        config = AugmentedLM.from_pretrained(path, decoder).coprocessor.config
        fresh = perplexity_by_position(AugmentedLM.from_decoder(decoder, config).eval(), seqs, positions, bootstrap=50)
        assert result["table1_untrained"][name]["rel_change"] == pytest.approx(fresh.rel_change, rel=1e-5, abs=1e-7)
        # the saved coprocessors were "trained" (perturbed): their own columns differ from step 0
        assert result["table1"][name]["rel_change"] != pytest.approx(fresh.rel_change, rel=1e-3)
    # the two against each other on the same points: their perplexity ratio, which the frozen decoder's cancels from
    paired = saved["table1_paired"]["copro vs pause"]
    copro, pause = (result["table1"][name]["rel_change"] for name in ("copro", "pause"))
    assert paired["rel_change"] == pytest.approx([(1 + a) / (1 + b) - 1 for a, b in zip(copro, pause, strict=True)],
                                                 rel=1e-4, abs=1e-6)
    assert all(low <= rel <= high for low, rel, high in zip(paired["ci_low"], paired["rel_change"], paired["ci_high"],
                                                             strict=True))
    assert "| k | copro vs pause |" in text
    # `dca compare` pairs columns of separate runs the same way (here both from this one)
    capsys.readouterr()
    compared = run_compare(CompareArgs(columns=[f"{tmp_path}/eval.json:copro", f"{tmp_path}/eval.json:pause"],
                                      bootstrap=50))
    for key in ("rel_change", "ci_low", "ci_high"):  # the same resamples too
        assert compared["table1_paired"]["copro vs pause"][key] == pytest.approx(paired[key], rel=1e-6)
    assert capsys.readouterr().out.strip() in text  # the table it prints is the one eval.md has
    without = run_eval(EvalArgs(coprocessors=paths[:1], model=model_dir, data=corpus, sequences=3, seq_len=40,
                                positions=2, bootstrap=50, untrained=False, out=str(tmp_path / "plain")))
    assert "table1_untrained" not in without and "untrained |" not in (tmp_path / "plain" / "eval.md").read_text()
    assert "table1_paired" not in without
    assert (tmp_path / "ppl_by_position.png").stat().st_size > 1000


def test_min_position_and_point_seed_choose_the_points(assets, tmp_path):
    model_dir, corpus, paths = assets
    args = EvalArgs(coprocessors=paths[:1], model=model_dir, data=corpus, sequences=3, seq_len=40, positions=2,
                    ks=[1, 2], min_position=20, point_seed=7, bootstrap=20, untrained=False, out=str(tmp_path))
    report = run_eval(args)["table1"]["copro"]
    assert "6 augmentation points at t >= 20;" in (tmp_path / "eval.md").read_text()
    decoder, tokenizer = load_model(model_dir)
    seqs, positions = held_out_eval_set(tokenizer, corpus, 0.05, 3, 40, 2, 2, seed=7, min_position=20)
    assert positions.min() >= 20
    assert not torch.equal(positions, held_out_eval_set(tokenizer, corpus, 0.05, 3, 40, 2, 2, min_position=20)[1])
    expected = perplexity_by_position(AugmentedLM.from_pretrained(paths[0], decoder), seqs, positions, (1, 2),
                                      bootstrap=20)
    assert report["rel_change"] == pytest.approx(expected.rel_change, rel=1e-5, abs=1e-7)
    # unset, it is the coprocessor's own earliest point (N - 1 = 3 under "overwrite"); below that it is honoured
    default = EvalArgs(coprocessors=paths[:1], model=model_dir, data=corpus, sequences=3, seq_len=40, positions=2,
                       bootstrap=20, untrained=False, out=str(tmp_path / "default"))
    run_eval(default)
    assert "at t >= 3;" in (tmp_path / "default" / "eval.md").read_text()
    low = EvalArgs(coprocessors=paths[:1], model=model_dir, data=corpus, sequences=3, seq_len=40, positions=2,
                   ks=[1, 32], min_position=0, bootstrap=20, untrained=False, out=str(tmp_path / "low"))
    report = run_eval(low)["table1"]["copro"]
    seqs, positions = held_out_eval_set(tokenizer, corpus, 0.05, 3, 40, 2, 32, min_position=0)  # t <= 7
    assert positions.min() < 3
    expected = perplexity_by_position(AugmentedLM.from_pretrained(paths[0], decoder), seqs, positions, (1, 32),
                                      bootstrap=20)
    assert report["rel_change"] == pytest.approx(expected.rel_change, rel=1e-5, abs=1e-7)
    # too late a point for the sequence length is refused before anything is loaded
    with pytest.raises(ArgumentError, match="seq_len"):
        EvalArgs(coprocessors=paths[:1], model=model_dir, data=corpus, sequences=3, seq_len=40, positions=2,
                 ks=[1, 2], min_position=37, out=str(tmp_path / "late")).check_sources()
    with pytest.raises(ArgumentError, match="point_seed"):
        EvalArgs(coprocessors=paths[:1], point_seed=-1)


def test_coprocessors_of_one_name_are_told_apart_by_their_parent_folders(assets, tmp_path):
    model_dir, corpus, paths = assets
    decoder, _ = load_model(model_dir)
    copro = AugmentedLM.from_pretrained(paths[0], decoder)
    other = [str(copro.save_pretrained(tmp_path / run / "copro" / "adapter")) for run in ("seed-0", "seed-1")]
    result = run_eval(EvalArgs(coprocessors=[paths[0], *other], model=model_dir, data=corpus, sequences=3, seq_len=40,
                               positions=2, bootstrap=50, untrained=False, out=str(tmp_path / "report")))
    first = f"{Path(paths[0]).parent.name}/copro"  # each named by as many folders as it takes, all three alike
    assert list(result["table1"]) == [first, "seed-0/copro", "seed-1/copro"]  # three columns, none overwritten
    assert result["table1"]["seed-0/copro"]["rel_change"] == result["table1"][first]["rel_change"]
    assert coprocessor_labels(["runs/a/x/adapter", "runs/b/a/x"]) == ["runs/a/x", "b/a/x"]
    with pytest.raises(ArgumentError, match="coprocessors names 'x' twice"):
        EvalArgs(coprocessors=["x", "x/adapter"])  # one folder, given twice


def _synthetic_eval(latents: dict[str, tuple[str, int]]) -> dict:
    correct = {"acc": [True, False, True, True]}
    row = {"metrics": ["acc"], "base": {"correct": correct}} | {name: {"correct": correct} for name in latents}
    return {"coprocessors": {name: {"method": m, "num_latents": n} for name, (m, n) in latents.items()},
            "table2": {"arc_easy": row, "piqa": row}}


def test_accuracy_by_latents_plot_needs_two_latent_counts(tmp_path):
    sweep = _synthetic_eval({"n4": ("coprocessor", 4), "n16": ("coprocessor", 16), "pause": ("pause", 16)})
    assert plot_accuracy_by_latents(sweep, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    one_count = _synthetic_eval({"a": ("coprocessor", 16), "b": ("coprocessor", 16), "pause": ("pause", 4)})
    assert not plot_accuracy_by_latents(one_count, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert not plot_accuracy_by_latents({"coprocessors": sweep["coprocessors"]}, tmp_path / "no-table2.png")


def test_what_is_scored_is_written_before_a_later_part_fails(assets, tmp_path, monkeypatch):
    import dataclasses

    import dca.eval.eval_suite
    from dca.eval.benchmarks import BENCHMARKS, MultipleChoiceItem

    model_dir, corpus, paths = assets
    items = [MultipleChoiceItem("the cat sees", ["a dog", "the big red house"], 0, "x0"),
             MultipleChoiceItem("the dog likes", ["a tree", "home"], 1, "x1")]
    for name in ("arc_easy", "piqa"):
        monkeypatch.setitem(BENCHMARKS, name, dataclasses.replace(BENCHMARKS[name], _load=lambda: items))
    monkeypatch.setattr("dca.eval.benchmarks._cached_items", lambda name, load: load())
    real_score = dca.eval.eval_suite._score

    def fail_on_piqa(model, tokenizer, bench, *args, **kwargs):
        if bench.name == "piqa":
            raise RuntimeError("the machine died")
        return real_score(model, tokenizer, bench, *args, **kwargs)

    monkeypatch.setattr(dca.eval.eval_suite, "_score", fail_on_piqa)
    with pytest.raises(RuntimeError, match="the machine died"):
        run_eval(EvalArgs(coprocessors=paths[:1], model=model_dir, data=corpus, sequences=3, seq_len=40, positions=2,
                          bootstrap=50, benchmarks=["arc_easy", "piqa"], out=str(tmp_path)))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert set(saved["table1"]) == {"copro"} and list(saved["table2"]) == ["arc_easy"]
    assert saved["table2"]["arc_easy"]["base"]["acc"] in (0.0, 0.5, 1.0)
    text = (tmp_path / "eval.md").read_text()
    assert "| arc_easy |" in text and "(in progress)" in text


def test_table1_with_late_latents_is_the_sequential_late_insertion(assets, tmp_path):
    import math

    import torch

    from dca.eval.evaluate import held_out_eval_set
    from dca.reference import sequential_group_losses

    model_dir, corpus, paths = assets
    args = EvalArgs(coprocessors=paths[:1], model=model_dir, data=corpus, sequences=3, seq_len=40, positions=2,
                    bootstrap=20, ks=[1, 2], latent_delay=1, out=str(tmp_path))  # A = 2
    report = run_eval(args)["table1"]["copro"]
    assert report["ks"] == [1, 2] and "latents 1 tokens late" in (tmp_path / "eval.md").read_text()
    decoder, tokenizer = load_model(model_dir)
    model = AugmentedLM.from_pretrained(paths[0], decoder)
    seqs, positions = held_out_eval_set(tokenizer, corpus, args.held_out_fraction, 3, 40, 2, 2,
                                        min_position=model.coprocessor.config.first_position)
    with torch.no_grad():
        losses = torch.stack([sequential_group_losses(model, seqs[b : b + 1], t, delay=1)
                              for b in range(3) for t in positions[b].tolist()])
    expected = [math.exp(v) for v in losses.mean(0).tolist()]
    torch.testing.assert_close(torch.tensor(report["augmented_ppl"]), torch.tensor(expected), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="latent_delay"):
        EvalArgs(coprocessors=paths, ks=[1, 2], latent_delay=2)


def test_paired_change_resamples_both_reports_together_and_needs_the_same_points():
    from dca.eval.evaluate import PositionReport, paired_change

    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 4, (20, 2), generator=generator).float()
    base = torch.rand(20, 2, generator=generator) * counts * 3

    def report(nll):
        return PositionReport([1, 2], [0.0] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2, 20, 40,
                              sequence_nll=nll.tolist(), sequence_counts=counts.tolist())

    shifted = base + 0.1 * counts  # 0.1 nats worse on every token of every sequence: exactly e^0.1 - 1, no spread
    rel, low, high = paired_change(report(shifted), report(base), bootstrap=200)
    assert rel == pytest.approx([math.exp(0.1) - 1] * 2, rel=1e-5)
    assert low == pytest.approx(rel, rel=1e-5) and high == pytest.approx(rel, rel=1e-5)
    noisy = base + torch.randn(20, 2, generator=generator)
    rel, low, high = paired_change(report(noisy), report(base), bootstrap=200)
    direct = torch.exp((noisy.sum(0) - base.sum(0)) / counts.sum(0)) - 1
    assert rel == pytest.approx(direct.tolist(), rel=1e-5) and all(lo < hi for lo, hi in zip(low, high, strict=True))
    moved = report(base)
    moved.sequence_counts = (counts + 1).tolist()
    with pytest.raises(ValueError, match="same sequences, points"):
        paired_change(report(base), moved)
    with pytest.raises(ValueError, match="per-sequence losses"):
        paired_change(report(base), PositionReport([1, 2], *[[0.0] * 2] * 5, 20, 40))
