"""The command line is generated from the argument dataclasses; it must parse as a user types it."""

import pytest

from dca.cli import invoked_command, main
from dca.eval.compare import CompareArgs


@pytest.mark.parametrize("command", ["train", "demo", "bench", "init-study"])
def test_help_works(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


def test_train_options_include_the_coprocessor_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--num-latents", "--lora-rank", "--latent-anchor", "--method", "--steps", "--bf16"):
        assert option in text


def test_bad_choice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--latent-scale", "huge"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model: every check must come first."""
    import dca.resources

    monkeypatch.setattr(dca.resources, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for module in ("dca.training.train", "dca.eval.eval_suite", "dca.studies.demo", "dca.studies.init_study"):
        monkeypatch.setattr(f"{module}.load_model", lambda *a, **k: pytest.fail("a model was loaded"))


def bad_inputs(tmp_path, model_dir):
    (tmp_path / "empty").mkdir(exist_ok=True)
    (tmp_path / "a-file").write_text("x")
    ok = ["--model", model_dir, "--data", str(tmp_path / "a-file")]
    return [
        (["train", *ok, "--max-grad-norm", "0"], "--max-grad-norm must be > 0, got 0.0"),
        (["train", *ok, "--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),
        (["train", *ok, "--lr", "inf"], "--lr must be a finite number, got inf"),
        (["train", *ok, "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["train", *ok, "--gate-init", "inf"], "--gate-init must be a finite number"),
        (["train", *ok, "--lora-rank", "4", "--lora-alpha", "nan"], "--lora-alpha must be a finite number"),
        (["train", *ok, "--held-out-fraction", "1"], "--held-out-fraction must be below 1"),
        (["train", *ok, "--device", "bogus"], "--device is not a device: 'bogus'"),
        (["train", *ok, "--device", "cuda:7"], "--device is 'cuda:7', but"),
        (["train", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "a-file")],
         "--model no such model folder or file"),
        (["train", "--model", str(tmp_path / "empty"), "--data", str(tmp_path / "a-file")],
         "--model " + str(tmp_path / "empty") + " is a folder but holds no model"),
        (["train", "--model", model_dir, "--data", str(tmp_path / "missing.txt")], "--data no such file or folder"),
        (["train", *ok, "--out", str(tmp_path / "a-file" / "run")], "--out cannot be written"),
        (["eval", "--model", model_dir, "--benchmarks", "nope"], "--benchmarks has unknown names ['nope']"),
        (["eval", "--model", model_dir, "--limit", "0"], "--limit must be an integer >= 1, got 0"),
        (["eval", "--model", model_dir, "--limit", "-3"], "--limit must be an integer >= 1, got -3"),
        (["eval", *ok, "--coprocessors", str(tmp_path / "missing")], "--coprocessors no coprocessor"),
        (["eval", *ok, "--coprocessors", str(tmp_path / "empty")],
         "--coprocessors " + str(tmp_path / "empty") + " is not a saved coprocessor"),
        (["demo", "--coprocessor", str(tmp_path / "missing")], "--coprocessor no coprocessor"),
        (["demo", "--sequences", "0"], "--sequences must be an integer >= 1"),
        (["init-study", "--model", str(tmp_path / "missing")], "--model no such model folder"),
        (["init-study", "--variants", "nope"], "--variants has unknown names ['nope']"),
        (["bench", "--repeats", "0"], "--repeats must be an integer >= 1"),
        (["bench", "--sizes", "huge"], "--sizes has unknown or no names ['huge']"),
        (["bench", "--out", str(tmp_path)], "--out " + str(tmp_path) + " is a folder"),
    ]


def test_every_bad_input_is_one_line_naming_the_option_with_exit_code_2(train_assets, tmp_path, capsys, no_loading):
    for argv, message in bad_inputs(tmp_path, train_assets[0]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"dca {argv[0]}: error: "), (argv, err)
        assert message in err, (argv, err)


def test_a_diverging_run_exits_non_zero_with_one_line(train_assets, tmp_path, capsys, monkeypatch):
    from dca.errors import TrainingDiverged

    def diverge(args, callback=None):
        raise TrainingDiverged("step 7: 5 optimiser steps in a row had a non-finite loss or gradient")

    monkeypatch.setattr("dca.training.train.train", diverge)
    assert main(["train", "--model", train_assets[0], "--data", train_assets[1], "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == ("dca train: error: step 7: 5 optimiser steps in a row had a non-finite "
                                       "loss or gradient\n")


def test_under_torchrun_a_bad_argument_is_said_once_and_other_errors_name_their_rank(train_assets, tmp_path, capsys,
                                                                                     monkeypatch):
    from dca.errors import TrainingDiverged

    ok = ["train", "--model", train_assets[0], "--data", train_assets[1], "--out", str(tmp_path)]
    bad = [*ok, "--steps", "0"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", ""), ("0", "dca train: error: --steps must be an integer >= 1, got 0\n")):
        monkeypatch.setenv("RANK", rank)
        assert main(bad) == 2
        assert capsys.readouterr().err == said  # every rank validates the same arguments: rank 0 alone says so

    def diverge(args, callback=None):  # what one rank meets may differ from the others: each says it
        raise TrainingDiverged("step 7: non-finite")

    monkeypatch.setattr("dca.training.train.train", diverge)
    assert main(ok) == 1
    assert capsys.readouterr().err == "dca train (rank 0): error: step 7: non-finite\n"


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    def bug(args, callback=None):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr("dca.training.train.train", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["train"])


def parsed_train_args(monkeypatch, argv):
    captured = []
    monkeypatch.setattr("dca.training.train.train", lambda args, callback=None: captured.append(args))
    assert main(["train", *argv]) == 0
    return captured[0]


def test_a_preset_starts_the_coprocessor_and_options_typed_override_it(monkeypatch):
    from dca import CoprocessorConfig

    assert parsed_train_args(monkeypatch, []).coprocessor == CoprocessorConfig()
    args = parsed_train_args(monkeypatch, ["--preset", "paper", "--num-latents", "4", "--lora-rank", "8"])
    assert args.preset == "paper"
    assert args.coprocessor == CoprocessorConfig.paper(num_latents=4, lora_rank=8)
    # the resolved config identifies the run, the preset's name does not (args.json records both)
    identity = args.identity()
    assert "preset" not in identity and identity["coprocessor"] == args.coprocessor.to_dict()
    args = parsed_train_args(monkeypatch, ["--preset", "paper", "--latent-scale", "gated", "--gate-init", "0.5"])
    assert args.coprocessor == CoprocessorConfig.paper(latent_scale="gated", gate_init=0.5)
    # typed options override the default preset too, and leave its other fields alone
    args = parsed_train_args(monkeypatch, ["--latent-positions", "after"])
    assert args.preset == "dca" and args.coprocessor == CoprocessorConfig(latent_positions="after")


def test_an_unknown_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "literal"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_a_runs_args_json_reruns_it_and_options_typed_beside_it_override(monkeypatch, tmp_path):
    import dataclasses
    import json

    from dca import CoprocessorConfig
    from dca.training.train import TrainArgs

    saved = TrainArgs(model="m", data="d", out=str(tmp_path / "run"), steps=7, lr=3e-4, bf16=True, preset="paper",
                      coprocessor=CoprocessorConfig.paper(num_latents=4, lora_rank=2, latent_scale="gated"))
    path = tmp_path / "args.json"
    path.write_text(json.dumps(dataclasses.asdict(saved)))  # what `dca train` writes into every run folder
    assert parsed_train_args(monkeypatch, ["--config", str(path)]) == saved
    args = parsed_train_args(monkeypatch, ["--config", str(path), "--steps", "3", "--num-latents", "8", "--no-bf16"])
    assert args == dataclasses.replace(saved, steps=3, bf16=False,
                                       coprocessor=dataclasses.replace(saved.coprocessor, num_latents=8))
    # a file written before latent_positions existed is read as its reader reads it ("after")
    old = {**dataclasses.asdict(saved), "coprocessor": {"num_latents": 2, "latent_anchor": "replay"}}
    path.write_text(json.dumps(old))
    assert parsed_train_args(monkeypatch, ["--config", str(path)]).coprocessor.latent_positions == "after"


def test_a_bad_config_file_is_one_line_naming_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("dca.training.train.train", lambda args, callback=None: pytest.fail("it ran"))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{\"steps\": ")
    (tmp_path / "unknown.json").write_text('{"steps": 3, "stepz": 4}')
    (tmp_path / "bad-value.json").write_text('{"steps": -1}')
    (tmp_path / "bad-field.json").write_text('{"coprocessor": {"num_latents": 0}}')
    (tmp_path / "ok.json").write_text('{"steps": 3}')
    cases = [
        (["--config", str(tmp_path / "missing.json")], "--config no such file"),
        (["--config", str(tmp_path / "list.json")], "must hold a JSON object of arguments, not list"),
        (["--config", str(tmp_path / "broken.json")], "is not a JSON file of arguments"),
        (["--config", str(tmp_path / "unknown.json")], "stepz not among the arguments of dca train"),
        (["--config", str(tmp_path / "bad-value.json")], "--steps must be"),
        (["--config", str(tmp_path / "bad-field.json")], "coprocessor: num_latents must be"),
        (["--config", str(tmp_path / "ok.json"), "--preset", "paper"], "--preset cannot be combined with --config"),
    ]
    for argv, expected in cases:
        assert main(["train", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (argv, err)


def test_a_report_records_the_command_that_reproduces_it(monkeypatch):
    args = CompareArgs(columns=["a.json:x", "b.json:y"])
    monkeypatch.setattr("sys.argv", ["/venv/bin/dca", "compare", "--columns", "a.json:x", "b dir/e.json:y"])
    assert invoked_command("compare", args) == "dca compare --columns a.json:x 'b dir/e.json:y'"
    monkeypatch.setattr("sys.argv", ["/venv/bin/dca", "cache", "build", "--out", "s"])
    assert invoked_command("cache build", args) == "dca cache build --out s"
    monkeypatch.setattr("sys.argv", ["pytest", "-q"])  # called from Python: the arguments themselves
    assert invoked_command("compare", args) == repr({"columns": ["a.json:x", "b.json:y"], "bootstrap": 1000,
                                                     "out": None})
