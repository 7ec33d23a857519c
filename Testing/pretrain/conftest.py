"""Fixtures of the pretraining tests (helpers live in pretrain_helpers.py)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Pretraining configs set torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
