"""The command-line parser (each command's own tests: test_demo.py, test_train_cli.py, ...)."""

from __future__ import annotations

import argparse

import pytest

from fastdpo import cli


def test_only_implemented_commands_are_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for command in ("demo", "train", "precompute-ref", "eval", "score"):
        assert command in help_text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval"])  # no --model: a usage error
    assert exit_info.value.code == 2
    capsys.readouterr()
    assert cli.main(["train"]) == 2  # no model: one line, no traceback
    assert (
        capsys.readouterr().err.strip()
        == "fastdpo train: error: model: required (a model folder or Hub id)"
    )


def test_a_subcommand_is_one_function_in_the_registry(monkeypatch):
    def add_hello(subparsers):
        parser = subparsers.add_parser("hello")
        parser.add_argument("--name", default="world")
        parser.set_defaults(handler=lambda args: 0 if args.name == "dpo" else 3)

    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, add_hello])
    assert cli.main(["hello", "--name", "dpo"]) == 0
    assert cli.main(["hello"]) == 3
    assert isinstance(cli.build_parser(), argparse.ArgumentParser)
