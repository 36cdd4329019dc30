"""Shared fixtures for the unit tests."""

import pytest
import torch


@pytest.fixture
def global_rng_untouched():
    """Fail the test if it changed PyTorch's global RNG state."""
    before = torch.get_rng_state().clone()
    yield
    assert torch.equal(torch.get_rng_state(), before), "the global RNG state changed"
