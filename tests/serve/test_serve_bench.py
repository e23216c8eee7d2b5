"""`dca bench-serve` on the tiny model: every request answered, the report written."""

import json

from dca.serve.bench import BenchServeArgs, run_bench_serve


def test_bench_serve_reports_every_level(served_dirs, tmp_path):
    args = BenchServeArgs(model=served_dirs[0], coprocessor=served_dirs[1], concurrency=[1, 3], requests=3,
                          max_tokens=4, out=str(tmp_path))
    result = run_bench_serve(args)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert [(r["augment"], r["concurrency"]) for r in saved["rows"]] == [(False, 1), (False, 3), (True, 1), (True, 3)]
    for row in saved["rows"]:
        assert row["statuses"] == {"200": 3}
        assert 0 < row["p50_s"] <= row["p95_s"] and row["completion_tokens"] <= 3 * 4
    assert saved["server_stats"]["completed"] == 4 * 3 + 1  # and the warm-up
    table = (tmp_path / "bench.md").read_text()
    assert table.count("\n| yes |") == 2 and table.count("\n| no |") == 2
