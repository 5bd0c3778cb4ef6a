"""The public surface of ARCHITECTURE.md resolves, with the documented keyword arguments."""

import importlib.metadata
import inspect
import subprocess
import sys

import pytest

import fastdpo


@pytest.mark.parametrize("name", fastdpo.__all__)
def test_every_public_name_resolves(name):
    """Each name is the object of that name in the fastdpo module that defines it (a mapping
    slip such as pack_pairs -> collate_pairs fails here)."""
    value = getattr(fastdpo, name)
    if name == "__version__":
        assert value == importlib.metadata.version("fastdpo")
    elif name == "LOSSES":
        from fastdpo.losses import LOSSES

        assert value is LOSSES and "sigmoid" in value
    else:
        assert value.__name__ == name, f"fastdpo.{name} is {value.__module__}.{value.__name__}"
        assert value.__module__.startswith("fastdpo.")
        assert getattr(sys.modules[value.__module__], name) is value


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        fastdpo.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    ("name", "params"),
    [
        (
            "linear_logprobs",
            ["bias", "softcap", "temperature", "ignore_index", "return_lse", "impl"],
        ),
        ("preference_loss", ["loss", "beta", "chosen_lengths", "rejected_lengths"]),
        ("load_preference_data", ["columns", "on_bad_row"]),
        ("tokenize_pairs", ["max_length"]),
        ("pack_pairs", ["max_tokens_per_batch", "seed", "epoch"]),
    ],
)
def test_documented_keywords(name, params):
    signature = inspect.signature(getattr(fastdpo, name))
    for param in params:
        assert param in signature.parameters, f"fastdpo.{name} lost keyword {param!r}"


def test_import_is_light():
    # `import fastdpo` must not pull transformers or triton: the public names load lazily.
    code = "import sys, fastdpo; print(any(m in sys.modules for m in ('transformers', 'triton')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
