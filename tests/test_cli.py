"""The command line is generated from the argument dataclasses; it must parse as a user types it."""

import pytest

from dca.cli import main


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


def test_invalid_values_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["train", "--positions", "0", "--out", str(tmp_path)]) == 2
    assert "positions must be at least 1" in capsys.readouterr().err
