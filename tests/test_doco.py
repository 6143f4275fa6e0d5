"""DoCo's defaults: retention = the diffusion loss to the sampled noise on the anchor (retain) images, by hand with a
fixed generator (ε and v models); the trained group = all of cross-attention; --retention distill and --params kv
give the earlier port's loss and group."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from helpers import assert_refused, run
from memprune.finetune import FinetuneLoop, FinetuneSettings, apply_delta, cross_attention_linears
from memprune.methods import doco
from memprune.retain import generated_retain_data
from tiny_pipelines import sd1_pipeline

RETAIN = ["a red circle", "a blue square", "the green dog", "a white cat"]
MEMORIZED = ["a photo of the cat", "a blue square on white background"]
TINY = FinetuneSettings(steps=2, batch_size=2, sampling_steps=2, progress=False, seed=3)


@pytest.fixture(scope="module")
def tiny():
    pipe = sd1_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, generated_retain_data(pipe, RETAIN, TINY)


def _hand_batch(retain, seed: int, n: int, total: int):
    """The loop's first retain batch drawn by hand: numpy permutation for the indices, one torch generator for the
    noise then the timesteps."""
    index = np.random.default_rng(seed).permutation(len(retain.latents))[:n]
    x0 = retain.latents[torch.tensor(index)]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, total, (n,), generator=generator)
    return index, x0, noise, t


def _noised_by_hand(pipe, x0, noise, t):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2  # scaled_linear, as the pipeline
    alpha_bar = torch.from_numpy(np.cumprod(1 - betas)).float()[t].view(-1, 1, 1, 1)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, alpha_bar


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_default_retention_is_the_mse_to_the_sampled_noise(tiny, prediction):
    pipe, retain = tiny
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config, prediction_type=prediction)
    try:
        hooks = doco.DoCoHooks(doco.DoCoSettings(), MEMORIZED, None)
        assert hooks.retain_target == "data"
        loop = FinetuneLoop(pipe, TINY, retain, hooks.default_params)
        loss = loop.retain_loss(hooks.retain_target)
        index, x0, noise, t = _hand_batch(retain, TINY.seed, TINY.batch_size, 1000)
        x_t, alpha_bar = _noised_by_hand(pipe, x0, noise, t)
        conditioning = retain.conditioning.select(torch.tensor(index))
        with torch.no_grad():
            prediction_out = pipe.unet(x_t, t, **conditioning, return_dict=False)[0]
        target = noise if prediction == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
        assert loss.item() == pytest.approx(float(((prediction_out - target) ** 2).mean()), rel=1e-4)
        assert loss.item() > 1e-3  # not the teacher's prediction (that loss is 0 at the start)
    finally:
        pipe.scheduler = original


def test_distill_option_is_the_earlier_teacher_loss(tiny):
    pipe, retain = tiny
    hooks = doco.DoCoHooks(doco.DoCoSettings(retention="distill"), MEMORIZED, None)
    assert hooks.retain_target == "teacher"
    settings = FinetuneSettings(**{**TINY.__dict__, "params": "kv"})
    loop = FinetuneLoop(pipe, settings, retain, hooks.default_params)
    assert all(".to_k." in n or ".to_v." in n for n in loop.params)
    assert loop.retain_loss("teacher").item() == 0.0  # the student starts as the teacher
    name = next(iter(loop.params))
    with torch.no_grad():
        loop.params[name].add_(0.05)  # the student moves; the teacher keeps the originals
        try:
            loss = loop.retain_loss("teacher")
            index, x0, noise, t = _hand_batch(retain, TINY.seed, TINY.batch_size, 1000)
            # the second batch of the loop: draw it by hand after the first
            order = np.random.default_rng(TINY.seed).permutation(len(retain.latents))
            generator = torch.Generator().manual_seed(TINY.seed)
            torch.randn(x0.shape, generator=generator)
            torch.randint(0, 1000, (2,), generator=generator)
            index2 = torch.tensor(order[2:4])
            x0 = retain.latents[index2]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, 1000, (2,), generator=generator)
            x_t, _ = _noised_by_hand(pipe, x0, noise, t)
            conditioning = retain.conditioning.select(index2)
            student = pipe.unet(x_t, t, **conditioning, return_dict=False)[0]
            loop.params[name].sub_(0.05)
            teacher = pipe.unet(x_t, t, **conditioning, return_dict=False)[0]
            loop.params[name].add_(0.05)
        finally:
            loop.restore()
    assert loss.item() == pytest.approx(float(((student - teacher) ** 2).mean()), rel=1e-4) and loss.item() > 0


def _state(pipe):
    return {f"{c}/{n}": t.detach().clone() for c, m in pipe.components.items() if isinstance(m, nn.Module)
            for n, t in m.state_dict().items()}


def test_default_params_are_all_of_cross_attention_and_nothing_else_changes(tiny):
    pipe, retain = tiny
    settings = doco.default_settings()
    settings.discriminator_warmup = 0
    assert TINY.params is None and doco.DEFAULT_PARAMS == "xattn"
    before = _state(pipe)
    result = doco.train(pipe, TINY, settings, memorized_prompts=MEMORIZED, retain=retain)
    declared = {f"{name}.{p}" for name, linear in cross_attention_linears(pipe.unet).items()
                for p, _ in linear.named_parameters()}
    by_name = {k for k in dict(pipe.unet.named_parameters())
               if ".attn2.to_" in k}  # in SD 1.x, attn2 is the cross-attention: q, k, v, out (weights and biases)
    assert set(result.delta) == declared == by_name
    assert {part for k in declared for part in ("to_q", "to_k", "to_v", "to_out") if f".{part}." in k} == \
        {"to_q", "to_k", "to_v", "to_out"}
    apply_delta(pipe, result.delta)
    try:
        after = _state(pipe)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed <= {f"unet/{k}" for k in declared}
        assert any(".to_q." in k for k in changed) and any(".to_out." in k for k in changed)
    finally:
        pipe.unet.load_state_dict({k[len("unet/"):]: v for k, v in before.items() if k.startswith("unet/")})
    assert result.info["retention"].startswith("diffusion loss to the sampled noise")


def test_cli_defaults_and_retention_refused_off_doco(saved_pipelines, tmp_path):
    memorized, retain = tmp_path / "memorized.txt", tmp_path / "retain.txt"
    memorized.write_text("\n".join(MEMORIZED) + "\n")
    retain.write_text("\n".join(RETAIN) + "\n")
    common = ("finetune", "--model", saved_pipelines["sd1"], "--memorized", memorized, "--retain", retain,
              "--steps", 1, "--batch-size", 2, "--sampling-steps", 2, "--device", "cpu")
    result = run(*common, "--method", "doco", "--out", tmp_path / "doco")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "doco" / "memprune.json").read_text())
    assert info["trained_parameters"] == "xattn" and info["method_settings"]["retention"] == "noise"
    assert "--params xattn" in result.output
    result = run(*common, "--method", "doco", "--retention", "distill", "--params", "kv", "--out", tmp_path / "old")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "old" / "memprune.json").read_text())
    assert info["trained_parameters"] == "kv" and info["method_settings"]["retention"] == "distill"
    assert_refused(run(*common, "--method", "plain", "--retention", "noise", "--out", tmp_path / "x"),
                   "--retention is used by --method doco only")
