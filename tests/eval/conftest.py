"""Tiny random Llama models (2 blocks, vocab 256) and the byte tokenizer shared by the eval tests."""
import copy

import pytest
import torch

from xpert_dist.config import ModelConfig
from xpert_dist.data.sources import SAMPLE_DIR
from xpert_dist.models.loading import ByteTokenizer, load_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared, loaded CPU two threads per process
    oversubscribe it (measured 30x slower); restored after each test so no other test is affected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model():
    return load_model(ModelConfig(tiny={}), seed=0)


@pytest.fixture(scope="module")
def tiny_model64(tiny_model):
    return copy.deepcopy(tiny_model).double().eval()


@pytest.fixture
def tok():
    return ByteTokenizer(256)


@pytest.fixture
def sample_data(monkeypatch):
    monkeypatch.setenv("XPERT_DATA_DIR", str(SAMPLE_DIR))
    return SAMPLE_DIR
