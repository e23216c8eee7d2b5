"""The trainer end to end on a tiny local model and corpus: it learns, it logs, it resumes exactly."""

import json

import pytest
import torch
from tiny_models import train_args

from dca import AugmentedLM
from dca.errors import ArgumentError
from dca.resources import load_model
from dca.training.train import TrainArgs, lr_factor, train


@pytest.fixture
def assets(train_assets):
    return train_assets


args_for = train_args


def test_a_short_run_lowers_the_augmented_held_out_loss(assets, tmp_path):
    adapter = train(args_for(assets, tmp_path / "run", steps=60, eval_every=60, save_every=60, lr=1e-2))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert first["step"] == 0 and last["step"] == 60
    assert last["eval_loss"] < first["eval_loss"] - 0.02  # deterministic: 0.857 -> 0.816 here
    assert {"loss", "base_loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[1])
    decoder, _ = load_model(assets[0])
    assert AugmentedLM.from_pretrained(adapter, decoder).coprocessor.config.num_latents == 2


@pytest.mark.parametrize("variant", [{}, {"coprocessor": {"lora_rank": 2}}])
def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(assets, tmp_path, variant):
    straight = train(args_for(assets, tmp_path / "straight", **variant))

    class Killed(Exception):
        pass

    def die_after_step_3(step, record):  # after the step-2 checkpoint, before step 4's
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(args_for(assets, tmp_path / "resumed", **variant), callback=die_after_step_3)
    resumed = train(args_for(assets, tmp_path / "resumed", **variant))
    decoder, _ = load_model(assets[0])
    a = AugmentedLM.from_pretrained(straight, decoder).coprocessor.state_dict()
    b = AugmentedLM.from_pretrained(resumed, decoder).coprocessor.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]  # step 3's record from before the kill was cut with the checkpoint


def test_resuming_with_other_arguments_is_refused(assets, tmp_path):
    train(args_for(assets, tmp_path / "run", steps=2))
    with pytest.raises(ArgumentError, match=r"holds another run \(lr: 0.003 then, 0.01 now\)"):
        train(args_for(assets, tmp_path / "run", steps=2, lr=1e-2))


def test_checkpoints_leave_no_partial_folders(assets, tmp_path):
    train(args_for(assets, tmp_path / "run", steps=4))
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["adapter", "args.json", "checkpoint", "metrics.jsonl", "run.json"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"positions": 0}, "positions"),
    ({"positions": 30}, "below seq_len"),
    ({"coprocessor": {"num_latents": 0}}, "num_latents"),
    ({"coprocessor": {"init": "random"}}, "init"),
    ({"lr": 0.0}, "lr must be > 0"),
])
def test_bad_arguments_fail_before_any_work(assets, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        args_for(assets, tmp_path / "run", **overrides)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    args = TrainArgs(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, args) for s in range(101)]
    assert factors[0] < factors[5] < factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[100] == pytest.approx(0.1)


def test_dense_attention_and_activation_checkpointing_train_alike(assets, tmp_path):
    # the same losses and updates up to float rounding (Adam's normalised steps amplify rounding in weights
    # whose gradients are near zero, so the run's losses are compared, not every weight)
    train(args_for(assets, tmp_path / "grouped", steps=4))
    train(args_for(assets, tmp_path / "dense", steps=4, group_attention="dense", activation_checkpointing=True))
    records = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("grouped", "dense")]
    for key in ("loss", "eval_loss"):
        a = [r[key] for r in records[0] if key in r]
        b = [r[key] for r in records[1] if key in r]
        assert len(a) == len(b) > 1
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="group_attention must be one of"):
        args_for(assets, tmp_path / "x", group_attention="sparse")


def test_max_delay_trains_with_late_groups_and_is_part_of_the_run(assets, tmp_path, monkeypatch):
    seen = []
    original = AugmentedLM.training_loss

    def spy(self, *args, delays=None, **kwargs):
        seen.append(delays)
        return original(self, *args, delays=delays, **kwargs)

    monkeypatch.setattr(AugmentedLM, "training_loss", spy)
    train(args_for(assets, tmp_path / "run", steps=2, max_delay=3))
    trained = [d for d in seen if d is not None]
    assert len(trained) == 2 and all(int(d.max()) <= 3 for d in trained) and any(int(d.max()) > 0 for d in trained)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["max_delay"] == 3
    with pytest.raises(ArgumentError, match=r"max_delay: 3 then, 2 now"):
        train(args_for(assets, tmp_path / "run", steps=2, max_delay=2))
    with pytest.raises(ValueError, match="max_delay"):
        args_for(assets, tmp_path / "x", max_delay=-1)


def test_min_position_trains_overwrite_before_n_tokens_and_is_part_of_the_run(assets, tmp_path, monkeypatch):
    seen = []
    original = AugmentedLM.training_loss

    def spy(self, input_ids, positions, *args, **kwargs):
        seen.append(positions)
        return original(self, input_ids, positions, *args, **kwargs)

    monkeypatch.setattr(AugmentedLM, "training_loss", spy)
    overwrite = {"coprocessor": {"num_latents": 6}}  # "overwrite", the default layout: t >= 5 unless told
    train(args_for(assets, tmp_path / "default", steps=1, eval_every=1, **overwrite))
    assert int(torch.cat([p.flatten() for p in seen]).min()) >= 5
    seen.clear()
    train(args_for(assets, tmp_path / "run", steps=2, min_position=0, **overwrite))
    assert int(torch.cat([p.flatten() for p in seen]).min()) < 5  # points with fewer than N tokens: trained
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    with pytest.raises(ArgumentError, match=r"min_position: 0 then, 1 now"):
        train(args_for(assets, tmp_path / "run", steps=2, min_position=1, **overwrite))
