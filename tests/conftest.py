"""Test-wide set-up: Triton kernels run under the interpreter when there is no GPU, and
`gpu`-marked tests skip without CUDA."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Must happen before any module that defines a Triton kernel is imported: `triton.jit` decides
# at decoration time whether to build an interpreted function.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # `make test` runs one pytest worker per core: more threads per worker only contend (the
    # model tests took 8 s with one thread and 50-100 s with two on a loaded 2-core machine).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
