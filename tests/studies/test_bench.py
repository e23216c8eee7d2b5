"""`dca bench` runs and reports (no timing assertions: speed is measured by the command, not by tests)."""

import json

import pytest

from dca.studies.bench import BenchArgs, run_bench


def test_bench_writes_a_table_and_json(tmp_path, capsys):
    result = run_bench(BenchArgs(sizes=["xs"], repeats=1, device="cpu", out=str(tmp_path / "b.json"), memory=False))
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved == json.loads(json.dumps(result))
    row = saved["rows"][0]
    assert set(row["median_s"]) == {"one_pass", "one_pass_dense", "one_pass_ckpt", "sequential", "finetune"}
    assert all(v > 0 for v in row["median_s"].values())
    assert row["floor_vs_finetune"] == pytest.approx((6 * 8 * 8 + 4 * 8 * 15 + 2 * 256) / (6 * 256))
    assert "| xs (h128, 4L) | 2 x 256 | 8 | 8 | 8 | one_pass_ckpt |" in capsys.readouterr().out


def test_the_p_sweep_is_plotted(tmp_path, monkeypatch):
    import dca.studies.bench as bench

    small = {f"p{p}": bench.BenchSize(f"p{p}", hidden=32, layers=1, seq_len=64, batch=1, positions=p, latents=4,
                                      ahead=4, methods=("one_pass", "one_pass_dense")) for p in (2, 4)}
    monkeypatch.setattr(bench, "SWEEP", small)
    monkeypatch.setattr(bench, "SIZES", {**bench.SIZES, **small})
    result = run_bench(BenchArgs(sizes=list(small), repeats=1, device="cpu", out=str(tmp_path / "b.json"),
                                 memory=False))
    assert [r["size"]["positions"] for r in result["rows"]] == [2, 4]
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_methods_and_batch_replace_each_sizes_own(tmp_path, monkeypatch):
    import dca.studies.bench as bench

    monkeypatch.setitem(bench.SIZES, "tiny", bench.BenchSize("tiny", hidden=32, layers=1, seq_len=32, batch=3,
                                                             positions=2, latents=2, ahead=2))
    result = run_bench(BenchArgs(sizes=["tiny"], repeats=1, device="cpu", out=str(tmp_path / "b.json"), memory=False,
                                 methods=["one_pass", "finetune"], batch=1, bf16=True))
    row = result["rows"][0]
    assert set(row["median_s"]) == {"one_pass", "finetune"} and row["size"]["batch"] == 1 and result["bf16"]
    with pytest.raises(ValueError, match=r"methods has unknown names \['sparse'\]"):
        BenchArgs(sizes=["tiny"], out=str(tmp_path / "b.json"), methods=["sparse"])
    with pytest.raises(ValueError, match="need --device cuda"):
        BenchArgs(sizes=["tiny"], out=str(tmp_path / "b.json"), methods=["one_pass_flex"], device="cpu")


def test_sweep_names_the_four_sizes_of_the_paper_shape():
    args = BenchArgs(sizes=["sweep"], out="b.json")
    assert args.sizes == ["p16", "p32", "p64", "p128"]


def test_bench_rejects_unknown_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"sizes has unknown or no names \['huge'\]"):
        BenchArgs(sizes=["huge"], out=str(tmp_path / "b.json"))


def test_peak_memory_gives_the_process_and_the_tensors(monkeypatch):
    import dca.studies.bench as bench

    tiny = bench.BenchSize("tiny", hidden=32, layers=1, seq_len=32, batch=1, positions=2, latents=2, ahead=2)
    monkeypatch.setattr(bench, "SIZES", {**bench.SIZES, "tiny": tiny})
    for method in ("one_pass_ckpt", "finetune"):
        rss, tensors = bench.peak_memory_child("tiny", method, "cpu")
        assert rss >= 0 and tensors > 0, method
