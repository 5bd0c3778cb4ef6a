"""`fastdpo train`: YAML + overrides end to end; usage mistakes are one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from fastdpo import cli
from fastdpo.testing.models import tiny_model
from fastdpo.testing.tokenizer import build_tiny_tokenizer
from fastdpo.train.command import TOKENIZATION_FIELDS
from fastdpo.train.config import TrainConfig, field_docs


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [
        {"prompt": f"Say {i}.", "chosen": f"{i}, thank you.", "rejected": "No."} for i in range(6)
    ]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": str(root / "model"),
        "data": str(root / "prefs.jsonl"),
        "output_dir": str(root / "run"),
        "max_steps": 2,
        "pairs_per_step": 3,
        "max_tokens_per_batch": 128,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "device": "cpu",
        "report_to": "none",
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def test_train_from_yaml_with_overrides(run_files, capsys):
    code = cli.main(
        [
            "train",
            str(run_files / "run.yaml"),
            "--beta",
            "0.25",
            "--max-length",
            "48",
            "--no-progress",
            "--label-smoothing",
            "0.1",
            "--learning-rate",
            "2e-3",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"final model in {run_files / 'run' / 'final'}" in out
    saved = yaml.safe_load((run_files / "run" / "config.yaml").read_text())
    assert (saved["beta"], saved["max_length"], saved["progress"]) == (0.25, 48, False)
    assert saved["learning_rate"] == 2e-3
    assert saved["loss_params"] == {"label_smoothing": 0.1}
    assert saved["max_steps"] == 2  # from the file
    rows = (run_files / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--betta", "0.1"], "fastdpo train: error: unknown key 'betta'; did you mean 'beta'?"),
        (["--beta", "-2"], "fastdpo train: error: beta: got -2.0; allowed: a finite number > 0"),
        (["--max-steps", "many"], "fastdpo train: error: argument --max-steps: expected an "),
        (["--data", "missing.jsonl"], "fastdpo train: error: data: no such file: 'missing.jsonl'"),
        (["--learning-rate", "fast"], "fastdpo train: error: argument --learning-rate: expected"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_status_2(run_files, argv, message):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastdpo.cli",
            "train",
            str(run_files / "run.yaml"),
            *argv,
            "--output-dir",
            str(run_files / "bad"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_a_missing_config_file_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "fastdpo.cli", "train", "/nonexistent/run.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "fastdpo train: error: config file /nonexistent/run.yaml does not exist"
    )


def test_train_and_precompute_ref_share_tokenization_options_and_defaults():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    precompute = commands["precompute-ref"].parse_args(
        ["--model", "m", "--data", "d", "--out", "o"]
    )
    defaults = TrainConfig(model="m", data="d")
    for name in TOKENIZATION_FIELDS:
        assert getattr(precompute, name) == getattr(defaults, name), name
    assert precompute.max_length == 1024
    train_options = {a.dest for a in commands["train"]._actions}
    assert set(TOKENIZATION_FIELDS) <= train_options


def test_every_option_has_help_text():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("train", "precompute-ref"):
        for action in commands[name]._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    assert set(field_docs()) == {f for f in TrainConfig.__dataclass_fields__}


def test_the_trainer_tokenizes_with_exactly_the_fingerprinted_settings():
    from fastdpo.reference_fingerprint import TOKENIZATION_KEYS

    assert TOKENIZATION_FIELDS == TOKENIZATION_KEYS
