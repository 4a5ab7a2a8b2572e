"""Run the adapter tests single-threaded: tiny models gain nothing from intra-op threads, and on a
busy CPU the threads' synchronisation makes each forward take ~100x longer."""

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
