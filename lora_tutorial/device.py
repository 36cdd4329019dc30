"""Choosing where to run."""

from __future__ import annotations

import torch

__all__ = ["default_device"]


def default_device() -> torch.device:
    """The best available device: CUDA if present, else Apple's MPS, else the CPU.

    The book's second source writes ``"mps" if torch.cuda.is_available() else "cpu"``,
    which asks for MPS exactly on the machines that have CUDA (and fails there)
    and never uses MPS on a Mac. Each backend must be asked about itself.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
