"""Test set-up: Triton's interpreter on machines without CUDA, and a backend fixture.

``TRITON_INTERPRET`` must be set before any kernel module is imported, so it happens here, at
collection time, before the tests import ``appo_kernels``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ("torch", "triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs a test once per backend (APPO_KERNELS_BACKEND); yields the backend name."""
    monkeypatch.setenv("APPO_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture
def gen():
    """A seeded generator so that a failing case can be reproduced from its test id."""
    return torch.Generator().manual_seed(0)
