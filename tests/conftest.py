"""Fixtures shared by several test modules (opted into with ``pytest.mark.usefixtures``)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: the models are tiny, and on a shared 2-core machine spinning
    OpenMP threads make them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
