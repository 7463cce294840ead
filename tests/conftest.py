"""Shared fixtures: tiny models of real Hugging Face architectures built inside the test, float64,
nothing downloaded."""

import pytest
import torch

from alphatoken.models import build_tiny_model, byte_tokenizer

TINY_ARCHS = ("llama", "qwen2", "gemma3")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request):
    """A tiny float64 model per architecture: Llama, Qwen2 (q/k/v biases), Gemma3 text
    (sliding-window + full layers); all with grouped-query attention (4 heads, 2 kv heads)."""
    return build_tiny_model(request.param, dtype=torch.float64)


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()
