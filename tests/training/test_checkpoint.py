"""Faults during training: kills at every instant of a save, pickles planted in a run folder, reruns that
differ, half-written logs and diverging runs. Each must end in the right state or a clear refusal."""

import json
import os
import pickle
import shutil

import pytest
import torch
from faults import FaultInjector, Killed
from tiny_models import train_args

from dca import AugmentedLM
from dca.errors import ArgumentError, NonFiniteError, TrainingDiverged
from dca.resources import load_model
from dca.training.checkpoint import STATE_JSON, STATE_TENSORS, _flatten, _unflatten, read_metrics
from dca.training.train import train


def weights(adapter, model_dir):
    decoder, _ = load_model(model_dir)
    return AugmentedLM.from_pretrained(adapter, decoder).coprocessor.state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def metrics_steps(run):
    return [r["step"] for r in read_metrics(run / "metrics.jsonl")]


def resumed_at(capsys) -> int:
    err = capsys.readouterr().err
    return int(err.split("resuming at step ")[1].split()[0]) if "resuming at step" in err else 0


def test_a_kill_at_every_filesystem_operation_of_a_checkpoint_save_resumes_exactly(train_assets, tmp_path,
                                                                                     monkeypatch, capsys):
    short = dict(steps=4, save_every=2, eval_every=4)
    straight = weights(train(train_args(train_assets, tmp_path / "straight", **short)), train_assets[0])

    # one save of the step-4 checkpoint, recorded: which operations, and which one commits it
    recorder = FaultInjector(monkeypatch)
    train(train_args(train_assets, tmp_path / "dry" / "run", **short),
          callback=lambda step, _: setattr(recorder, "armed", step >= 3))
    first_adapter_op = next(i for i, op in enumerate(recorder.log) if "adapter" in str(op[1]))
    operations = recorder.log[:first_adapter_op]
    commit = operations.index(next(op for op in operations if op[0] == "_rename" and op[2] == ".checkpoint.new"))
    assert len(operations) >= 8 and 0 < commit < len(operations) - 1
    monkeypatch.undo()
    capsys.readouterr()

    for kill_at in range(1, len(operations) + 1):
        run = tmp_path / f"killed-{kill_at}" / "run"
        with monkeypatch.context() as patch:
            injector = FaultInjector(patch, kill_at=kill_at)
            with pytest.raises(Killed):
                train(train_args(train_assets, run, **short),
                      callback=lambda step, _, injector=injector: setattr(injector, "armed", step >= 3))
            assert injector.log[-1] == operations[kill_at - 1]
        capsys.readouterr()
        adapter = train(train_args(train_assets, run, **short))
        done = kill_at - 1  # operations that reached the disk: the kill_at-th never ran
        expected_step = 4 if done > commit else 2  # the newest checkpoint whose commit happened
        assert resumed_at(capsys) == expected_step, (kill_at, operations[kill_at - 1])
        assert_same_weights(straight, weights(adapter, train_assets[0]))
        assert metrics_steps(run) == [0, 1, 2, 3, 4]
        assert sorted(p.name for p in run.iterdir()) == ["adapter", "args.json", "checkpoint", "metrics.jsonl",
                                                          "run.json"]  # leftovers cleaned


def test_resuming_unpickles_nothing_and_a_planted_pickle_never_runs(train_assets, tmp_path, monkeypatch, capsys):
    straight = weights(train(train_args(train_assets, tmp_path / "straight")), train_assets[0])
    run = tmp_path / "run"

    def die_at_3(step, _):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(train_args(train_assets, run), callback=die_at_3)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (run / "checkpoint" / "trainer_state.pt").write_bytes(pickle.dumps({"step": 99, "x": Payload()}))

    def refuse(*_args, **_kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    adapter = train(train_args(train_assets, run))
    assert resumed_at(capsys) == 2 and not marker.exists()
    assert_same_weights(straight, weights(adapter, train_assets[0]))

    # a checkpoint in the old pickle format is refused by name, never loaded
    (run / "checkpoint" / STATE_JSON).unlink()
    (run / "checkpoint" / "trainer_state.pt").write_bytes(pickle.dumps({"step": 99, "x": Payload()}))
    with pytest.raises(ValueError, match="pickle, which dca no longer loads"):
        train(train_args(train_assets, run))
    assert not marker.exists()


def test_trainer_state_round_trips_without_pickle():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "python": (3, tuple(range(5)), None), "none": None}
    tensors = {}
    skeleton = json.loads(json.dumps(_flatten(state, tensors, "s")))
    back = _unflatten(skeleton, tensors)
    assert back["python"] == state["python"] and back["none"] is None
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert set(back["optimizer"]["state"]) == {0, 1}  # integer keys survive JSON
    for key, value in state["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][key], value)


def test_a_rerun_with_other_arguments_is_refused_even_before_the_first_checkpoint(train_assets, tmp_path):
    run = tmp_path / "run"

    def die_at_1(step, _):
        if step == 1:
            raise Killed

    with pytest.raises(Killed):
        train(train_args(train_assets, run, save_every=5), callback=die_at_1)
    assert not (run / "checkpoint").exists()
    with pytest.raises(ArgumentError, match=r"out .* holds another run \(lr: 0.003 then, 0.02 now; "
                                            r"positions: 4 then, 3 now\)"):
        train(train_args(train_assets, run, save_every=5, lr=0.02, positions=3))
    train(train_args(train_assets, run, save_every=5))
    assert metrics_steps(run) == [0, 1, 2, 3, 4, 5, 6]  # one run in the log, not two


def test_identity_is_by_content_so_a_moved_folder_resumes_and_other_data_is_refused(train_assets, tmp_path,
                                                                                    monkeypatch, capsys):
    model, corpus = train_assets
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(corpus, tmp_path / "a" / "corpus.txt")
    (tmp_path / "b" / "corpus.txt").write_text(open(corpus).read().replace("cat", "dog"))
    monkeypatch.chdir(tmp_path / "a")

    def die_at_3(step, _):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(train_args((model, "corpus.txt"), tmp_path / "run"), callback=die_at_3)
    shutil.move(tmp_path / "run", tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "b")  # the same relative --data names other text here
    with pytest.raises(ArgumentError, match="train_tokens_sha256"):
        train(train_args((model, "corpus.txt"), tmp_path / "moved"))
    capsys.readouterr()
    train(train_args((model, str(tmp_path / "a" / "corpus.txt")), tmp_path / "moved"))
    assert resumed_at(capsys) == 2
    assert metrics_steps(tmp_path / "moved") == [0, 1, 2, 3, 4, 5, 6]


def test_a_half_written_metrics_line_is_repaired_on_resume(train_assets, tmp_path):
    run = tmp_path / "run"

    def die_at_3(step, _):
        if step == 3:
            with open(run / "metrics.jsonl", "a") as log:
                log.write('{"step": 4, "loss": 0.')  # killed in the middle of a line
            raise Killed

    with pytest.raises(Killed):
        train(train_args(train_assets, run), callback=die_at_3)
    train(train_args(train_assets, run))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3, 4, 5, 6]


def test_steps_below_those_done_are_refused_before_loading(train_assets, tmp_path, monkeypatch):
    train(train_args(train_assets, tmp_path / "run", steps=4))
    monkeypatch.setattr("dca.training.train.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ArgumentError, match="steps is 2, but the run .* has already done 4 steps"):
        train(train_args(train_assets, tmp_path / "run", steps=2))


def poison(monkeypatch, bad_calls):
    """Make the training loss NaN at these calls (counting only calls with gradients: training steps)."""
    real, calls = AugmentedLM.training_loss, {"n": 0}

    def training_loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out.loss, out.token_losses = out.loss * float("nan"), out.token_losses * float("nan")
        return out

    monkeypatch.setattr(AugmentedLM, "training_loss", training_loss)


def test_a_non_finite_step_is_skipped_and_training_goes_on(train_assets, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {3})
    adapter = train(train_args(train_assets, tmp_path / "run"))
    assert "step 3: loss is not finite; optimiser step skipped" in capsys.readouterr().err
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("skipped", False) for r in records[1:]] == [False, False, True, False, False, False]
    assert records[3]["loss"] is None  # JSON null, not NaN
    for value in weights(adapter, train_assets[0]).values():
        assert value.isfinite().all()


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(train_assets, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison(monkeypatch, {3, 4, 5, 6})
    good_checkpoint = {}

    def remember(step, _):
        if step == 2:
            good_checkpoint.update(weights(run / "checkpoint", train_assets[0]))

    with pytest.raises(TrainingDiverged, match=r"step 5: 3 optimiser steps in a row .* checkpoint of step 2 is kept"):
        train(train_args(train_assets, run, max_bad_steps=3, save_every=1), callback=remember)
    assert not (run / "adapter").exists()
    assert_same_weights(good_checkpoint, weights(run / "checkpoint", train_assets[0]))
    assert json.loads((run / "checkpoint" / STATE_JSON).read_text())["step"] == 2


def test_non_finite_weights_are_never_written_nor_loaded(train_assets, tmp_path):
    from dca.training.checkpoint import save_checkpoint

    decoder, _ = load_model(train_assets[0])
    model = AugmentedLM.from_decoder(decoder, train_args(train_assets, tmp_path).coprocessor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(tmp_path, model, optimizer, scheduler, 1)
    before = (tmp_path / "checkpoint" / STATE_TENSORS).read_bytes()
    with torch.no_grad():
        model.coprocessor.soft_tokens[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="soft_tokens"):
        save_checkpoint(tmp_path, model, optimizer, scheduler, 2)
    with pytest.raises(NonFiniteError):
        model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "checkpoint" / STATE_TENSORS).read_bytes() == before and not (tmp_path / "adapter").exists()
