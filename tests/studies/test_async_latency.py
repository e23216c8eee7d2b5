"""The time-to-first-token study runs end to end on a tiny model and writes its JSON (no timing is asserted)."""

import json

import pytest
from tiny_models import toy_model_and_corpus

from dca import AugmentedLM, CoprocessorConfig
from dca.errors import ArgumentError
from dca.resources import load_model
from dca.studies.async_latency import AsyncLatencyArgs, main, run_async_latency


def test_the_study_writes_every_mode_and_the_delays(tmp_path):
    model_dir, _ = toy_model_and_corpus(tmp_path)
    decoder, _ = load_model(model_dir)
    copro = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=2, num_ahead=2)).save_pretrained(
        tmp_path / "copro")
    out = tmp_path / "ttft.json"
    run_async_latency(AsyncLatencyArgs(model=model_dir, coprocessor=str(copro), prompt_lengths=[6, 9], new_tokens=4,
                                       repeats=2, out=str(out)))
    report = json.loads(out.read_text())
    assert [r["prompt_tokens"] for r in report["rows"]] == [6, 9]
    for row in report["rows"]:
        assert all(row[f"{m}_ttft_s"] > 0 for m in ("plain", "sync", "async"))
        assert len(row["async_latent_delays"]) == 2


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--prompt-lengths", "-3"]])
def test_bad_arguments_are_one_line_errors(argv, capsys):
    with pytest.raises(ArgumentError):
        AsyncLatencyArgs(repeats=0)
    assert main([*argv, "--out", "/tmp/unused.json"]) == 2
    assert "async_latency: error:" in capsys.readouterr().err
