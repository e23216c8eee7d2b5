"""`dca compare`: columns of separate `dca eval` reports, paired only when they were scored on the same points."""

import json
import math

import pytest

from dca.cli import main
from dca.errors import ArgumentError
from dca.eval.compare import CompareArgs, run_compare
from dca.eval.evaluate import PositionReport

KS = [1, 2]
COUNTS = [[4.0, 4.0], [4.0, 3.0], [4.0, 4.0]]  # three sequences of four points; one lacks a k = 2 target


def report(nll: list[list[float]], base_ppl: tuple[float, ...] = (20.0, 18.0),
           counts: list[list[float]] = COUNTS) -> dict:
    """A Table 1 column as `dca eval` writes it (the summary fields do not enter the pairing)."""
    return PositionReport(ks=KS, base_ppl=list(base_ppl), augmented_ppl=list(base_ppl), rel_change=[0.0, 0.0],
                          ci_low=[0.0, 0.0], ci_high=[0.0, 0.0], num_sequences=len(nll), num_groups=4 * len(nll),
                          sequence_nll=nll, sequence_counts=counts).to_dict()


def write_eval(path, columns: dict[str, dict], **args) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": {"data": "wiki", "min_position": 15, **args}, "table1": columns}))
    return str(path)


A = [[8.0, 9.0], [10.0, 6.0], [7.0, 8.0]]
B = [[9.0, 8.0], [11.0, 7.5], [9.0, 8.0]]


def test_pairs_columns_of_separate_reports(tmp_path, capsys):
    first = write_eval(tmp_path / "a" / "eval.json", {"copro": report(A)})
    second = write_eval(tmp_path / "b" / "eval.json", {"copro": report(B), "other": report(A)})
    out = tmp_path / "report"
    result = run_compare(CompareArgs(columns=[f"{first}:copro=a", f"{second}:copro=b"], bootstrap=200, out=str(out)))
    paired = result["table1_paired"]["a vs b"]
    # by hand: the ratio of the two perplexities over all scored tokens at each k
    for i in range(len(KS)):
        tokens = sum(row[i] for row in COUNTS)
        expected = math.exp((sum(row[i] for row in A) - sum(row[i] for row in B)) / tokens) - 1
        assert paired["rel_change"][i] == pytest.approx(expected, rel=1e-5)
        assert paired["ci_low"][i] <= paired["rel_change"][i] <= paired["ci_high"][i]
    assert paired["ci_low"][0] < paired["ci_high"][0]  # resampled, not a point
    printed = capsys.readouterr().out
    assert "| k | a vs b |" in printed and f"{100 * paired['rel_change'][0]:+.2f}%" in printed
    saved = json.loads((out / "compare.json").read_text())
    assert saved["table1_paired"]["a vs b"] == paired and saved["columns"] == {"a": f"{first}:copro",
                                                                               "b": f"{second}:copro"}
    assert printed.strip() in (out / "compare.md").read_text()
    assert "sequence_nll" not in saved["table1"]["a"] and saved["table1"]["a"]["ks"] == KS  # kept in eval.json only
    assert (out / "compare.png").stat().st_size > 1000
    # one column against itself, relabelled: no change at any k, and nothing to resample
    itself = run_compare(CompareArgs(columns=[f"{first}:copro=x", f"{first}:copro=y"], bootstrap=50))
    assert itself["table1_paired"]["x vs y"] == {"ks": KS, "rel_change": [0.0, 0.0], "ci_low": [0.0, 0.0],
                                                 "ci_high": [0.0, 0.0]}
    # three columns: every pair, in order
    three = run_compare(CompareArgs(columns=[f"{first}:copro=a", f"{second}:copro=b", f"{second}:other"],
                                    bootstrap=20))
    assert list(three["table1_paired"]) == ["a vs b", "a vs other", "b vs other"]


def test_the_command_line(tmp_path, capsys):
    first = write_eval(tmp_path / "a.json", {"copro": report(A)})
    second = write_eval(tmp_path / "b.json", {"pause": report(B)})
    assert main(["compare", "--columns", f"{first}:copro", f"{second}:pause", "--bootstrap", "20",
                 "--out", str(tmp_path / "out")]) == 0
    assert "| k | copro vs pause |" in capsys.readouterr().out
    assert "Reproduce: `" in (tmp_path / "out" / "compare.md").read_text()
    assert main(["compare", "--columns", f"{first}:copro", f"{second}:copro=b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dca compare: error: --columns ") and "has no coprocessor 'copro'; it has pause" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("columns, message", [
    (["{a}:copro"], "at least two"),
    (["{a}:copro", "{a}"], "is not EVAL_JSON:NAME"),
    (["{a}:copro", "{a}:copro"], "copro twice"),
    (["{a}:copro", "{dir}/missing.json:copro=b"], "no such file"),
    (["{a}:copro", "{dir}/text.json:copro=b"], "is not a JSON report"),
    (["{a}:copro", "{dir}/no_table.json:copro=b"], "holds no Table 1"),
    (["{a}:copro", "{a}:pause"], "has no coprocessor 'pause'; it has copro"),
    (["{a}:copro", "{dir}/old.json:copro=b"], "no per-sequence losses"),
    (["{a}:copro", "{dir}/ragged.json:copro=b"], "is damaged"),
    (["{a}:copro", "{dir}/nan.json:copro=b"], "non-finite"),
    (["{a}:copro", "{dir}/late.json:copro=b"], "other points: min_position 100 vs 15"),
    (["{a}:copro", "{dir}/fewer.json:copro=b"], "scored other tokens"),
    (["{a}:copro", "{dir}/other_text.json:copro=b"], "other text: the frozen decoder's perplexity at k = 2"),
])
def test_refuses_what_cannot_be_paired(tmp_path, columns, message):
    a = write_eval(tmp_path / "a.json", {"copro": report(A)})
    (tmp_path / "text.json").write_text("not json")
    write_eval(tmp_path / "no_table.json", {})
    (tmp_path / "no_table.json").write_text(json.dumps({"args": {}}))
    old = report(B)
    old["sequence_nll"] = old["sequence_counts"] = None
    write_eval(tmp_path / "old.json", {"copro": old})
    write_eval(tmp_path / "ragged.json", {"copro": report([[1.0, 2.0], [3.0], [4.0, 5.0]])})
    write_eval(tmp_path / "nan.json", {"copro": report([[1.0, 2.0], [3.0, float("nan")], [4.0, 5.0]])})
    write_eval(tmp_path / "late.json", {"copro": report(B)}, min_position=100)
    write_eval(tmp_path / "fewer.json", {"copro": report(B[:2], counts=COUNTS[:2])})
    write_eval(tmp_path / "other_text.json", {"copro": report(B, base_ppl=(20.0, 18.1))})
    with pytest.raises(ArgumentError, match=message) as caught:
        run_compare(CompareArgs(columns=[c.format(a=a, dir=tmp_path) for c in columns], bootstrap=20))
    assert caught.value.argument == "columns"


def test_tolerates_the_base_perplexity_of_another_batch_grouping(tmp_path):
    a = write_eval(tmp_path / "a.json", {"copro": report(A)})
    b = write_eval(tmp_path / "b.json", {"copro": report(B, base_ppl=(20.0 * (1 + 2e-5), 18.0))})
    assert "a vs b" in run_compare(CompareArgs(columns=[f"{a}:copro=a", f"{b}:copro=b"], bootstrap=20))["table1_paired"]


def test_checks_its_arguments_before_reading_anything(tmp_path):
    with pytest.raises(ArgumentError, match="integer >= 1") as caught:
        CompareArgs(columns=["x:a", "y:b"], bootstrap=0)
    assert caught.value.argument == "bootstrap"
    (tmp_path / "file").write_text("")
    with pytest.raises(ArgumentError) as caught:
        CompareArgs(columns=["x:a", "y:b"], out=str(tmp_path / "file"))
    assert caught.value.argument == "out"
