import numpy as np
import pytest
import torch
from diffusers.models.attention import FeedForward
from torch import nn

from memprune.errors import MemPruneError
from memprune.record import ActivationRecorder
from memprune.stats import NeuronStats


class ToyDenoiser(nn.Module):
    """A denoiser-shaped module with two FeedForwards, called like a UNet: (sample, timestep, ...)."""

    def __init__(self, dim=4):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Module()
        self.block.ff = FeedForward(dim, mult=2, activation_fn="geglu")
        self.other = FeedForward(dim, mult=1, activation_fn="gelu")

    def forward(self, sample, timestep, encoder_hidden_states=None):
        return self.other(self.block.ff(sample))


def hand_statistics(x: np.ndarray):
    """Loops over samples and tokens, written straight from the definitions in memprune/stats.py."""
    samples, tokens, width = x.shape
    sumsq = np.zeros(width)
    for n in range(samples):
        for t in range(tokens):
            norm = np.sqrt(sum(x[n, t, j] ** 2 for j in range(width)))
            for j in range(width):
                sumsq[j] += (x[n, t, j] / norm) ** 2
    token_means = x.mean(axis=1)
    return sumsq, token_means.mean(0), token_means.var(0, ddof=1) if samples > 1 else np.zeros(width)


@pytest.mark.parametrize("half,rows", [("both", [0, 1, 2, 3]), ("uncond", [0, 1]), ("cond", [2, 3])])
def test_recorder_matches_hand_computation(half, rows):
    model = ToyDenoiser()
    sample = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(1))
    expected_input = model.block.ff.net[0](sample).detach().numpy()[rows]
    with ActivationRecorder(model, half=half, cfg=True) as recorder:
        recorder.new_generation()
        model(sample, torch.tensor(999))
        model(sample, torch.tensor(500))
    stats = recorder.stats
    assert stats.steps == [0, 1]
    assert stats.timesteps == {0: 999.0, 1: 500.0}
    accumulator = stats[("block.ff", 0)]
    sumsq, mean, var = hand_statistics(expected_input)
    np.testing.assert_allclose(accumulator.sumsq_normed.numpy(), sumsq, rtol=1e-5)
    np.testing.assert_allclose(accumulator.wanda_norm.numpy(), np.sqrt(sumsq), rtol=1e-5)
    np.testing.assert_allclose(accumulator.mean.numpy(), mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(accumulator.std.numpy() ** 2, var, rtol=1e-4, atol=1e-9)
    assert accumulator.count == len(rows) and accumulator.tokens == len(rows) * 3
    # Each token's normalised squares sum to one, so the total is the number of tokens.
    assert accumulator.sumsq_normed.sum().item() == pytest.approx(len(rows) * 3)


def test_merge_of_two_halves_equals_recording_the_union():
    model = ToyDenoiser()
    inputs = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(2))

    def record(batches):
        with ActivationRecorder(model, cfg=False) as recorder:
            for batch in batches:
                recorder.new_generation()
                model(batch, 10)
        return recorder.stats

    whole = record([inputs])
    merged = record([inputs[:2]]).merge(record([inputs[2:]]))
    for key, accumulator in whole.accumulators.items():
        for name in ("sumsq_normed", "mean", "m2"):
            torch.testing.assert_close(
                getattr(merged[key], name), getattr(accumulator, name), rtol=1e-6, atol=1e-6
            )  # float32 reductions, float64 merge
        assert merged[key].count == accumulator.count == 6


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_after_exception():
    model = ToyDenoiser()
    model.register_forward_pre_hook(lambda m, a: None)  # someone else's hook must survive
    before = hook_count(model)
    with ActivationRecorder(model):
        assert hook_count(model) == before + 3
    assert hook_count(model) == before
    with pytest.raises(RuntimeError):
        with ActivationRecorder(model):
            raise RuntimeError("boom")
    assert hook_count(model) == before


def test_steps_and_timesteps_of_a_real_pipeline():
    from memprune.generate import GenerationSettings
    from memprune.locate import record_prompts
    from tiny_pipelines import sd1_pipeline

    pipe = sd1_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stats = record_prompts(pipe, ["a red circle", "a cat"], GenerationSettings(steps=7, batch_size=1), progress=False)
    assert stats.steps == list(range(7))
    pipe.scheduler.set_timesteps(7)
    assert [stats.timesteps[s] for s in range(7)] == pipe.scheduler.timesteps.tolist()
    # 2 prompts x CFG halves = 4 samples per (layer, step), one pipeline call per prompt.
    assert {acc.count for acc in stats.accumulators.values()} == {4}


def test_statistics_memory_does_not_depend_on_prompt_count():
    model = ToyDenoiser()
    sizes = []
    for count in (2, 20):
        with ActivationRecorder(model, cfg=False) as recorder:
            for _ in range(count):
                recorder.new_generation()
                model(torch.randn(1, 3, 4), 1)
        sizes.append(
            sum(t.numel() for a in recorder.stats.accumulators.values() for t in (a.sumsq_normed, a.mean, a.m2))
        )
    assert sizes[0] == sizes[1]


def test_nan_activations_are_refused():
    stats = NeuronStats()
    stats.update("layer", 0, torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(MemPruneError, match="NaN or inf"):
        stats.check_finite()


def test_save_load_round_trip(tmp_path):
    stats = NeuronStats(timesteps={0: 999.0})
    stats.update("a.ff", 0, torch.randn(2, 3, 5))
    stats.save(tmp_path / "s.safetensors")
    loaded = NeuronStats.load(tmp_path / "s.safetensors")
    assert loaded.timesteps == {0: 999.0}
    torch.testing.assert_close(loaded[("a.ff", 0)].m2, stats[("a.ff", 0)].m2)
    assert loaded[("a.ff", 0)].count == 2
