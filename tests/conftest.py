"""Fixtures shared by several test modules (opted into with ``pytest.mark.usefixtures``)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip the soak tests unless the ``-m`` expression names them (``pytest -m soak``)."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="soak test: run it with pytest -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread: the models are tiny, and on a shared 2-core machine spinning
    OpenMP threads make them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The final state of tests/restart_job.py run to its end with no fault (test_restart and
    test_preemption compare against it)."""
    from tests.restart_runs import launch

    run = launch(tmp_path_factory.mktemp("plain"), "plain")
    assert run.returncode == 0, run.output[-4000:]
    assert run.log == [{"attempt": 0, "resumed_from": 0}]
    return run.final()
