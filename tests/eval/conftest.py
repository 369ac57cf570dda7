"""Tiny random Llama models (2 blocks, vocab 256) and the byte tokenizer shared by the eval tests."""
import copy

import pytest

from xpert_dist.config import ModelConfig
from xpert_dist.data.sources import SAMPLE_DIR
from xpert_dist.models.loading import ByteTokenizer, load_model


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
