"""`dca testbed`: its tasks are right, reproducible and split cleanly; a tiny run writes the whole report."""

import json
import math
import random
import re

import pytest
import torch

from dca.cli import main
from dca.errors import ArgumentError
from dca.studies.testbed import models
from dca.studies.testbed.report import interval, summarise
from dca.studies.testbed.run import TestbedArgs, run_testbed
from dca.studies.testbed.tasks import STEP_END, add_example, chase_example, make_splits, units
from dca.studies.testbed.tokenizer import Tokenizer


@pytest.mark.parametrize("task", ["chase", "add"])
def test_splits_are_deterministic_per_seed(task):
    first, again, other = make_splits(task, 3, 300, 50), make_splits(task, 3, 300, 50), make_splits(task, 4, 300, 50)
    assert first == again
    assert [e.prompt for e in first[0]] != [e.prompt for e in other[0]]


@pytest.mark.parametrize("task", ["chase", "add"])
def test_train_and_test_are_disjoint_and_distinct(task):
    train, test = make_splits(task, 0, 2000, 300)
    assert len(train) == 2000 and len(test) == 300
    prompts = [e.prompt for e in train + test]
    assert len(set(prompts)) == len(prompts)
    assert len({len(e.prompt) for e in train + test}) == 1 and len({len(e.answer) for e in train + test}) == 1


def resolve(prompt: str) -> tuple[str, list[str]]:
    """Follow the query's pointers statement by statement: (digit, variables passed through)."""
    body, query = prompt[:-1].split("?")
    table = dict(s.split("=") for s in body.rstrip(";").split(";"))
    assert len(table) == 8 == body.count(";")  # every left side is distinct
    path, current = [], table[query]
    while not current.isdigit():
        path.append(current)
        current = table[current]
    return current, path


def test_chase_answers_follow_the_pointers():
    rng = random.Random(0)
    hops_seen = set()
    for _ in range(500):
        example = chase_example(rng)
        digit, path = resolve(example.prompt)
        assert example.answer == digit and example.steps == "".join(path) and example.difficulty == len(path) + 1
        assert re.fullmatch(r"([a-z]=[a-z0-9];){8}\?[a-z]:", example.prompt)
        assert len(set(re.findall(r"=(\d)", example.prompt))) == 3  # three chains, three distinct ends
        assert example.worked == example.steps + STEP_END + example.answer
        hops_seen.add(example.difficulty)
    assert hops_seen == {1, 2, 3, 4}


def test_add_answers_are_the_sums():
    rng = random.Random(1)
    for _ in range(500):
        example = add_example(rng)
        a, b = example.prompt.rstrip("=").split("+")
        assert int(example.answer) == int(a) + int(b) and len(example.answer) == 5
        assert example.steps == example.answer[::-1]
        # longest run of carries, by column addition written out on the digit strings
        carry, run, longest = 0, 0, 0
        for x, y in zip(reversed(a), reversed(b), strict=True):
            carry = 1 if int(x) + int(y) + carry > 9 else 0
            run = run + 1 if carry else 0
            longest = max(longest, run)
        assert example.difficulty == longest
    assert add_example(random.Random(0)).prompt.count("+") == 1


def test_tokenizer_round_trips_and_refuses_unknown_characters():
    tokenizer = Tokenizer(units("chase"))
    text = "a=b;b=3;?a:"
    ids = tokenizer.encode(text, bos=True)
    # one token per assignment and per question, characters after them
    assert [tokenizer.tokens[i] for i in ids] == ["<bos>", "a=b;", "b=3;", "?a:"]
    assert tokenizer.decode(ids) == text and tokenizer.decode(tokenizer.encode("cb>3")) == "cb>3"
    for task in ("chase", "add"):
        train, _ = make_splits(task, 0, 100, 1)
        tokenizer = Tokenizer(units(task))
        assert all(tokenizer.decode(tokenizer.encode(e.prompt + e.worked)) == e.prompt + e.worked for e in train)
    assert len(Tokenizer(units("add"))) == 2 + 13
    with pytest.raises(ValueError, match="outside"):
        tokenizer.encode("A")


def test_encode_scores_the_answer_only():
    train, _ = make_splits("chase", 0, 8, 1)
    tokenizer = Tokenizer(units("chase"))
    ids, scored = models.encode(tokenizer, train, worked=False)
    assert ids.shape == (8, 1 + 8 + 1 + 1) and scored.sum() == 8 and bool(scored[:, -1].all())
    ids, scored = models.encode(tokenizer, train, worked=True)
    assert scored.sum(1).tolist() == [len(e.worked) for e in train]


def test_interval_is_the_t_interval():
    stat = interval([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / math.sqrt(3)
    assert stat["mean"] == pytest.approx(0.2) and stat["low"] == pytest.approx(0.2 - half)
    assert stat["high"] == pytest.approx(0.2 + half) and interval([0.5])["low"] is None


def test_paired_differences_are_by_seed():
    runs = [{"variants": {name: {"accuracy": acc, "by_difficulty": {}, "train_seconds": 0, "latency_ms": 0,
                                 "trainable_params": 1} for name, acc in (("dca-16", a), ("pause-16", b))}}
            for a, b in ((0.5, 0.4), (0.7, 0.6), (0.2, 0.1))]
    diff = summarise(runs)["paired_differences"]["dca-16 - pause-16"]
    assert diff["mean"] == pytest.approx(0.1) and diff["high"] - diff["low"] == pytest.approx(0, abs=1e-9)


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(ArgumentError, match="tasks"):
        TestbedArgs(tasks=["sort"])
    with pytest.raises(ArgumentError, match="steps"):
        TestbedArgs(steps=0)
    with pytest.raises(ArgumentError, match="variants"):
        TestbedArgs(variants=["dca-8"])
    assert TestbedArgs(variants=["scratchpad", "dca-16"]).variants == ["frozen", "dca-16", "scratchpad"]
    assert "--variants frozen dca-16" in TestbedArgs(variants=["dca-16"]).command()
    assert main(["testbed", "--tasks", "chase", "chase"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tasks" in err and "repeats" in err


def test_a_tiny_run_writes_the_report(tmp_path):
    threads = torch.get_num_threads()
    args = TestbedArgs(tasks=["add"], seeds=2, pretrain_steps=3, steps=2, train_size=100, test_size=8, batch_size=4,
                       latency_questions=1, out=str(tmp_path / "testbed"))
    result = run_testbed(args)
    assert torch.get_num_threads() == threads
    assert sorted(p.name for p in (tmp_path / "testbed").iterdir()) == ["accuracy_vs_n.png", "report.json",
                                                                        "report.md"]
    saved = json.loads((tmp_path / "testbed" / "report.json").read_text())
    variants = saved["summary"]["add"]["variants"]
    assert list(variants) == ["frozen", "pause-16", "dca-1", "dca-4", "dca-16", "paper-1", "paper-4", "paper-16",
                              "lora", "scratchpad"]
    assert all(0 <= v["accuracy"]["mean"] <= 1 and len(v["per_seed"]) == 2 for v in variants.values())
    assert variants["frozen"]["trainable_params"] == 0 and variants["dca-16"]["trainable_params"] > 0
    assert saved["command"].startswith("OMP_NUM_THREADS=1 dca testbed --tasks add --seeds 2")
    assert "dca-16 - pause-16" in saved["summary"]["add"]["paired_differences"]
    report = (tmp_path / "testbed" / "report.md").read_text()
    assert "| paper-16 |" in report and "### Task `add`" in report
    assert result["runs"]["add"][0]["configs"]["paper-4"]["config"]["latent_positions"] == "after"
