"""`dca bench --latency` measures what it names (a smoke test on a tiny model: timings are never asserted)."""

from tiny_models import WORDS, tiny_decoder, word_tokenizer

from dca import AugmentedLM, CoprocessorConfig
from dca.studies.latency import WAYS, format_latency, measure_latency


def test_latency_rows_hold_every_way_the_target_and_the_ratios(monkeypatch):
    # the prompts are real text from the wiki corpus, which CI does not install: a few sentences stand in
    monkeypatch.setattr("dca.resources.load_texts", lambda name, limit=None: [" ".join(WORDS[3:40])] * 4)
    model = AugmentedLM.from_decoder(tiny_decoder("llama"), CoprocessorConfig(num_latents=3, lora_rank=4)).eval()
    rows = measure_latency(model, word_tokenizer(), [16, 24], repeats=2)
    assert [r["prompt_tokens"] for r in rows] == [16, 24]
    for row in rows:
        assert set(row["median_s"]) == set(WAYS) and all(len(t) == 2 for t in row["times_s"].values())
        med = row["median_s"]
        assert row["target_s"] == (med["prefill"] + 2 * med["decode step"]) * 1.05
        assert row["met"] == (med["augment"] <= row["target_s"])
        assert row["ratio_async"] == med["generate, async"] / med["generate, frozen"]
    table = format_latency({"model": "tiny", "coprocessor": "lora", "num_latents": 3, "device": "cpu", "threads": 1,
                            "repeats": 2, "latency": rows})
    assert table.count("\n| 16 |") == 1 and table.count("\n| 24 |") == 1
