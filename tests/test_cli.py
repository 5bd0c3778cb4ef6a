"""`fastdpo demo` and the command-line parser."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fastdpo import cli

SMALL = ["--tokens", "96", "--hidden", "32", "--vocab", "700"]


def test_demo_runs_and_reports_agreement(capsys):
    assert cli.main(["demo", *SMALL, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "naive (full logits)" in out and "fastdpo (torch)" in out
    assert "N=96 tokens, H=32, V=700" in out
    assert out.count(" ok") == 3 and "MISMATCH" not in out


def test_demo_fails_when_the_fused_op_disagrees(monkeypatch, capsys):
    from fastdpo.demo import naive_logprobs
    from fastdpo.ops import linear_logprobs as op_module

    def off_by_a_bit(hidden, weight, targets, **kwargs):
        return naive_logprobs(hidden, weight, targets) + 1e-2

    monkeypatch.setattr(op_module, "linear_logprobs", off_by_a_bit)
    assert cli.main(["demo", *SMALL, "--device", "cpu"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_console_entry_point_runs_the_demo():
    proc = subprocess.run(
        [sys.executable, "-m", "fastdpo.cli", "demo", *SMALL],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "peak memory" in proc.stdout


def test_only_implemented_commands_are_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "demo" in help_text
    assert "precompute-ref" in help_text
    for missing in ("train", "eval", "score"):
        assert missing not in help_text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"])
    assert exit_info.value.code == 2


def test_demo_rejects_non_positive_sizes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--tokens", "0"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_a_subcommand_is_one_function_in_the_registry(monkeypatch):
    def add_hello(subparsers):
        parser = subparsers.add_parser("hello")
        parser.add_argument("--name", default="world")
        parser.set_defaults(handler=lambda args: 0 if args.name == "dpo" else 3)

    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, add_hello])
    assert cli.main(["hello", "--name", "dpo"]) == 0
    assert cli.main(["hello"]) == 3
    assert isinstance(cli.build_parser(), argparse.ArgumentParser)


@pytest.mark.gpu
def test_demo_on_cuda(capsys):
    assert cli.main(["demo", *SMALL, "--device", "cuda"]) == 0
    assert "MISMATCH" not in capsys.readouterr().out
