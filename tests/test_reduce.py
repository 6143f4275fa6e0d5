"""The hook's reduction (memprune.reduce): eager and compiler-friendly forms equal the previous code and numpy."""
import numpy as np
import pytest
import torch

import memprune.reduce as reduce
from memprune.stats import Accumulator


def previous_add_batch(x: torch.Tensor):
    """The hook's reduction as it was before memprune.reduce (zeros, addmv, Chan merge into an empty accumulator)."""
    samples, tokens, width = x.shape
    squares = x.float().square()
    inverse_norms = squares.sum(-1).clamp_min(torch.finfo(torch.float32).tiny).reciprocal()
    sumsq = torch.zeros(width).addmv_(squares.view(-1, width).t(), inverse_norms.view(-1))
    sample_means = x.mean(dim=1, dtype=torch.float32)
    batch_mean = sample_means.mean(0)
    batch_var = (sample_means - batch_mean).square().mean(0)
    mean, m2 = torch.zeros(width), torch.zeros(width)
    delta = batch_mean - mean
    mean.add_(delta, alpha=1.0)
    m2.add_(batch_var, alpha=samples).addcmul_(delta, delta, value=0.0)
    return sumsq, mean, m2


def numpy_statistics(x: np.ndarray):
    x = x.astype(np.float64)
    normed = x / np.linalg.norm(x, axis=-1, keepdims=True)
    sample_means = x.mean(1)
    return (normed ** 2).sum((0, 1)), sample_means.mean(0), ((sample_means - sample_means.mean(0)) ** 2).sum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 9, 16), (1, 64, 40), (6, 1, 8)])
def test_eager_and_fusable_forms_equal_the_previous_code_and_numpy(dtype, shape):
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)
    previous = previous_add_batch(x)
    expected = numpy_statistics(x.float().numpy())  # of the values the activation really holds
    for form in (reduce.batch_statistics_eager, reduce.batch_statistics_fusable, reduce.batch_statistics):
        result = form(x)
        for got, old, want in zip(result, previous, expected, strict=True):
            assert got.dtype == torch.float32 and got.shape == (shape[-1],)
            torch.testing.assert_close(got, old, rtol=1e-5, atol=1e-6)  # today's numbers, whatever the dtype
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    accumulator = Accumulator.from_batch(x)
    assert (accumulator.count, accumulator.tokens) == (shape[0], shape[0] * shape[1])
    # fp16/bf16 inputs are widened, never summed in their own precision: the sum of normalised squares is exactly
    # the number of tokens up to float32 rounding.
    assert accumulator.sumsq_normed.sum().item() == pytest.approx(shape[0] * shape[1], rel=1e-5)


def test_compiled_path_only_on_cuda_and_a_compiler_failure_falls_back(monkeypatch, caplog):
    assert not reduce.fused_available(torch.device("cpu"))
    monkeypatch.setenv("MEMPRUNE_FUSED", "0")
    assert not reduce.fused_available(torch.device("cuda"))
    monkeypatch.delenv("MEMPRUNE_FUSED")

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(torch, "compile", broken_compile)
    for got, want in zip(
        reduce.batch_statistics(x), reduce.batch_statistics_eager(x), strict=True
    ):  # CPU: compile never asked
        assert torch.equal(got, want)
    monkeypatch.setattr(reduce, "_compiled", None)
    monkeypatch.setattr(reduce, "_compile_failed", False)
    monkeypatch.setattr(reduce, "fused_available", lambda device: not reduce._compile_failed)
    with caplog.at_level("WARNING"):
        result = reduce.batch_statistics(x)
    assert "no compiler here" in caplog.text and reduce._compile_failed
    for got, want in zip(result, reduce.batch_statistics_eager(x), strict=True):
        assert torch.equal(got, want)
