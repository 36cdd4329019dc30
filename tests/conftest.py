"""Shared fixtures for the unit tests."""

import pytest


@pytest.fixture
def global_rng_untouched():
    """Fail the test if it changed PyTorch's global RNG state."""
    import torch  # here, not at the top: runs that collect no unit test need not load torch

    before = torch.get_rng_state().clone()
    yield
    assert torch.equal(torch.get_rng_state(), before), "the global RNG state changed"
