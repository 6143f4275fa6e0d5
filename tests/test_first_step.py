"""First-step quantities through the ε conversion (memprune.prediction) on tiny ε and v pipelines, against hand
computations: the conversion itself, detection's noise norm, NeMo's noise difference, its MS-SSIM, its criterion
breaking when every value layer is zeroed, its calibration guidance, and Wen's joint per-prompt loss."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from scipy.ndimage import correlate1d

from memprune.detect import detection_scores
from memprune.generate import GenerationSettings
from memprune.methods.nemo_criterion import Deactivated, first_step, nemo_layers, noise_differences
from memprune.methods.nemo_ssim import max_pairwise, ms_ssim, scales_for
from memprune.prediction import to_epsilon
from tiny_pipelines import sd1_pipeline

THEIR_THRESHOLD = 0.428  # NeMo's threshold on SD v1.4


def with_prediction(pipe, prediction_type: str):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return pipe


def alphas(pipe, t) -> float:
    return float(pipe.scheduler.alphas_cumprod[int(t)])


def unet_by_hand(pipe, prompt: str, seed: int, steps: int, guidance: float = 1.0):
    """(x_T, t, conditional output, unconditional output) of the first step, two separate denoiser calls."""
    pipe.scheduler.set_timesteps(steps)
    t = pipe.scheduler.timesteps[0]
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed)) * pipe.scheduler.init_noise_sigma
    x = pipe.scheduler.scale_model_input(x, t)
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
    with torch.no_grad():
        out_c = pipe.unet(x, t, encoder_hidden_states=cond).sample
        out_u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
    return x.double().numpy(), int(t), out_c.double().numpy(), out_u.double().numpy()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_to_epsilon_matches_the_formula(kind):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    rng = np.random.default_rng(0)
    out, x = rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 4, 5, 5))
    t = np.array([999, 500, 20])
    a = scheduler.alphas_cumprod.double().numpy()[t].reshape(-1, 1, 1, 1)
    expected = {"epsilon": out, "v_prediction": np.sqrt(a) * out + np.sqrt(1 - a) * x,
                "sample": (x - np.sqrt(a) * out) / np.sqrt(1 - a)}[kind]
    got = to_epsilon(torch.tensor(out), torch.tensor(x), torch.tensor(t), scheduler)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    # a fractional timestep takes ᾱ interpolated between its neighbours
    half = to_epsilon(torch.tensor(out[:1]), torch.tensor(x[:1]), torch.tensor(499.5), scheduler)
    a_half = scheduler.alphas_cumprod.double().numpy()[499:501].mean()
    if kind == "v_prediction":
        np.testing.assert_allclose(half.numpy(), np.sqrt(a_half) * out[:1] + np.sqrt(1 - a_half) * x[:1], rtol=1e-10)


def test_detection_first_step_converts_v_to_epsilon():
    """On a v-model the first-step score is ‖ε_c − ε_u‖ = √ᾱ·‖v_c − v_u‖, not ‖v_c − v_u‖ (the raw output)."""
    pipe = with_prediction(sd1_pipeline(), "v_prediction")
    pipe.set_progress_bar_config(disable=True)
    scores = detection_scores(pipe, ["a red circle"], GenerationSettings(steps=4, seeds=1), progress=False)
    x, t, v_c, v_u = unet_by_hand(pipe, "a red circle", 0, 4)
    expected = np.sqrt(alphas(pipe, t)) * np.linalg.norm((v_c - v_u).ravel())
    assert scores.detection_score_first_step.iloc[0] == pytest.approx(expected, rel=1e-4)
    assert abs(expected - np.linalg.norm((v_c - v_u).ravel())) > 1e-3 * expected  # the test can tell them apart


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_nemo_noise_difference_is_epsilon_minus_x_by_hand(guidance):
    """NeMo's ε̂ − x_t on a v-model: ε̂ = √ᾱ·v + √(1−ᾱ)·x_t (guided: ε_u + g(ε_c − ε_u)), not v − x_t."""
    pipe = with_prediction(sd1_pipeline(), "v_prediction")
    pipe.set_progress_bar_config(disable=True)
    sample, eps = first_step(pipe, ["a red circle"], [0], 5, guidance)
    x, t, v_c, v_u = unet_by_hand(pipe, "a red circle", 0, 5)
    a = alphas(pipe, t)
    e_c, e_u = np.sqrt(a) * v_c + np.sqrt(1 - a) * x, np.sqrt(a) * v_u + np.sqrt(1 - a) * x
    expected = e_c if guidance == 1.0 else e_u + guidance * (e_c - e_u)
    np.testing.assert_allclose(sample.numpy(), x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eps.numpy(), expected, rtol=1e-4, atol=1e-5)
    diff = expected - x
    low, high = diff.min(axis=(2, 3), keepdims=True), diff.max(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(noise_differences(sample, eps).numpy(), (diff - low) / (high - low), atol=1e-4)


def text_driven(prediction_type: str, gain: float, plus_input: bool):
    """A tiny pipeline whose first-step output is dominated by its cross-attention (to_out gain), as a memorized
    prompt's; with `plus_input` an ε-model that, as a trained one at t = T, predicts x_t plus that text part."""
    pipe = with_prediction(sd1_pipeline(), prediction_type)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(gain)
    if plus_input:
        forward = pipe.unet.forward

        def plus(sample, timestep, *args, **kwargs):
            out = forward(sample, timestep, *args, **kwargs)
            return (out[0] + sample,) if isinstance(out, tuple) else out

        pipe.unet.forward = plus
    return pipe


@pytest.mark.parametrize(("prediction_type", "gain", "plus_input"),
                         [("epsilon", 100.0, True), ("v_prediction", 60.0, False)], ids=["epsilon", "v"])
def test_nemo_criterion_breaks_when_every_value_layer_is_zeroed(prediction_type, gain, plus_input):
    """Seeds of a text-driven prompt look alike (memorized by NeMo's criterion); with every value layer zeroed the
    similarity to the vanilla noise differences falls below the threshold. On the v-model the raw output − x_t
    (memprune before the ε conversion) neither detects (0.21) nor breaks (0.97)."""
    pipe = text_driven(prediction_type, gain, plus_input)
    linears = nemo_layers(pipe.unet, "all")
    everything = {name: list(range(linear.out_features)) for name, linear in linears.items()}
    seeds = list(range(6))
    vanilla = noise_differences(*first_step(pipe, ["a red circle"] * 6, seeds, 10))
    with Deactivated(linears, everything):
        zeroed = noise_differences(*first_step(pipe, ["a red circle"] * 6, seeds, 10))
    assert max_pairwise(vanilla).max() > THEIR_THRESHOLD + 0.05
    assert ms_ssim(vanilla, zeroed).max() < THEIR_THRESHOLD - 0.05


def test_zero_terminal_snr_v_model_is_refused_by_nemo_and_wen():
    """ᾱ_T = 0: ε̂ = x_T exactly whatever the prompt: NeMo and Wen refuse in one sentence (not NaN, not a no-op)."""
    from memprune.errors import MemPruneError

    pipe = sd1_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction",
                                               rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(MemPruneError, match="zero terminal SNR"):
        first_step(pipe, ["a red circle"] * 2, [0, 1], 10)
    with pytest.raises(MemPruneError, match="zero terminal SNR"):  # the criterion's own guard, whatever the cause
        noise_differences(torch.ones(2, 4, 8, 8), torch.ones(2, 4, 8, 8))
    from memprune.methods.wen import WenSettings, first_step_norms, wrap

    with pytest.raises(MemPruneError, match="Wen's first-step noise norm is undefined"):
        first_step_norms(pipe, ["a red circle"], 10, [0], 7.5)
    with pytest.raises(MemPruneError, match="zero terminal SNR"):
        wrap(pipe, WenSettings(target=1.0))(prompt=["a red circle"], num_inference_steps=10)


def test_wen_norm_converts_v_to_epsilon():
    """Wen's first-step norm on a v-model: √ᾱ·‖v_c − v_u‖ by hand (ε = √ᾱ·v + √(1−ᾱ)·x_t; x_t cancels)."""
    from memprune.methods.wen import first_step_norms

    pipe = with_prediction(sd1_pipeline(), "v_prediction")
    pipe.set_progress_bar_config(disable=True)
    norms = first_step_norms(pipe, ["a red circle"], 4, [0], 7.5)
    _, t, v_c, v_u = unet_by_hand(pipe, "a red circle", 0, 4)
    assert norms[0, 0] == pytest.approx(np.sqrt(alphas(pipe, t)) * np.linalg.norm((v_c - v_u).ravel()), rel=1e-4)


def _ssim_numpy(x: np.ndarray, y: np.ndarray, taps: int):
    """(mean SSIM, mean cs) over valid positions of one (C, H, W) pair: Gaussian σ 1.5, data range of the pair."""
    coords = np.arange(taps) - (taps - 1) / 2
    w = np.exp(-(coords**2) / (2 * 1.5**2))
    w /= w.sum()
    pad = taps // 2

    def blur(z):
        z = correlate1d(correlate1d(z, w, axis=-1, mode="constant"), w, axis=-2, mode="constant")
        return z[:, pad:z.shape[1] - pad, pad:z.shape[2] - pad]

    rng = max(np.ptp(x), np.ptp(y))
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = np.maximum(blur(x * x) - mx**2, 0), np.maximum(blur(y * y) - my**2, 0), blur(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    return ((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs).mean(), cs.mean()


def _pool(z):
    c, h, w = z.shape
    return z[:, : h // 2 * 2, : w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


@pytest.mark.parametrize("size", [8, 24, 48])
def test_ms_ssim_against_numpy(size):
    """Three scales at 48 px (their betas 0.33), two at 24 (0.5 each), SSIM with a 7-tap window at 8 (testbed)."""
    betas, taps = scales_for(size, size)
    assert (len(betas), taps) == {8: (1, 7), 24: (2, 11), 48: (3, 11)}[size]
    rng = np.random.default_rng(size)
    x = rng.uniform(size=(2, 4, size, size))
    y = np.clip(x + 0.3 * rng.normal(size=x.shape), 0, 1)
    expected = []
    for a, b in zip(x, y, strict=True):
        value = 1.0
        for scale, beta in enumerate(betas):
            s, cs = _ssim_numpy(a, b, taps)
            value *= max(s if scale == len(betas) - 1 else cs, 0) ** beta
            a, b = _pool(a), _pool(b)
        expected.append(value)
    np.testing.assert_allclose(ms_ssim(torch.tensor(x), torch.tensor(y)).numpy(), expected, rtol=1e-5)
    assert ms_ssim(torch.tensor(x), torch.tensor(x)).numpy() == pytest.approx(1.0, abs=1e-6)
