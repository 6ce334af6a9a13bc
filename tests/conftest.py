"""Shared test settings: one torch thread (two busy-waiting threads on 2 cores are slower)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    torch.set_num_threads(1)
    yield
