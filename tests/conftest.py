"""Shared fixtures: tiny models of real Hugging Face architectures built inside the test, float64,
nothing downloaded."""

import pytest
import torch

from alphatoken.models import build_tiny_model, byte_tokenizer

TINY_ARCHS = ("llama", "qwen2", "gemma3")

# A float64 Hugging Face model is not float64 everywhere: the RMSNorms of Llama, Qwen2 and Gemma3
# compute in float32 (`hidden_states.to(torch.float32)`) and eager attention takes its softmax in
# float32 (`softmax(..., dtype=torch.float32)`). Two computations that are the same mathematics but
# group their float64 sums differently (a batch of 4 against one sequence at a time: other padding,
# other matmul shapes, so other kernel blockings, which differ between CPUs) differ by ~1e-16 going
# into such a step, and that can flip one float32 rounding there (relative 2**-24 ~ 6e-8 per value),
# which the following layers carry on. Results that must not depend on how the work is batched
# therefore agree to float32 precision, not to float64's: measured up to 3.8e-8 (norm-relative) on
# one x86-64 CPU and 3e-16 on another. This is the tolerance for such comparisons; comparisons of
# one computation with an algebraic rewrite of it on the *same* forward keep float64 tolerances.
BATCHING_TOL = 1e-6


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
