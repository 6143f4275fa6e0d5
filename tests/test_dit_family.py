"""DiT-family pipelines (PixArt-α, SD3, Flux): record, locate, prune, save, reload with stock diffusers."""
import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline

from helpers import run
from memprune.commands.locate import locate_to_folder
from memprune.commands.prune import prune_to_folder
from memprune.errors import MemPruneError
from memprune.generate import GenerationSettings, guidance_distilled, uses_cfg
from memprune.locate import LocateSettings, record_prompts
from memprune.masks import Masks
from memprune.methods.wanda import SelectionSettings
from memprune.models import denoiser, find_feedforwards, output_linears
from tiny_dit_pipelines import DIT_BUILDERS, TINY_SIZE

STOCK_CLASSES = {"pixart": PixArtAlphaPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
# The FeedForwards memprune must find (by type): SD3's last joint block and nothing in Flux's single blocks.
EXPECTED_LAYERS = {
    "pixart": ["transformer_blocks.0.ff", "transformer_blocks.1.ff"],
    "sd3": ["transformer_blocks.0.ff", "transformer_blocks.0.ff_context", "transformer_blocks.1.ff"],
    "flux": ["transformer_blocks.0.ff", "transformer_blocks.0.ff_context", "transformer_blocks.1.ff",
             "transformer_blocks.1.ff_context"],
}
GENERATION = GenerationSettings(steps=3, batch_size=2, height=TINY_SIZE, width=TINY_SIZE)


def sumsq_normed(x: np.ndarray) -> np.ndarray:
    """The statistic of memprune.stats in numpy: per unit, the sum over samples and tokens of (x_j / ||x||)^2."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return ((x / np.linalg.norm(x, axis=1, keepdims=True)) ** 2).sum(0)


def captured_inputs(pipe, prompts, generation) -> dict[str, list[torch.Tensor]]:
    """The input of every FeedForward's output Linear at every denoiser call, caught by plain hooks (no memprune)."""
    seen = {}
    handles = [linear.register_forward_pre_hook(
                   lambda module, args, layer=layer: seen.setdefault(layer, []).append(args[0].detach().clone()))
               for layer, linear in output_linears(denoiser(pipe)).items()]
    try:
        record_prompts(pipe, prompts, generation, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", list(DIT_BUILDERS))
def test_feedforwards_are_found_by_type(family):
    pipe = DIT_BUILDERS[family]()
    assert list(find_feedforwards(denoiser(pipe))) == EXPECTED_LAYERS[family]
    assert denoiser(pipe) is pipe.transformer


@pytest.mark.parametrize("family", list(DIT_BUILDERS))
def test_recorded_statistics_and_cfg_halves_match_a_hand_computation(family):
    pipe = DIT_BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "the green dog"]
    seen_by_layer = captured_inputs(pipe, prompts, GENERATION)
    assert list(seen_by_layer) == EXPECTED_LAYERS[family]
    # one denoiser call per step: CFG is batched (or absent), never a second call
    assert all(len(seen) == GENERATION.steps for seen in seen_by_layer.values())
    batch = seen_by_layer[EXPECTED_LAYERS[family][0]][0].shape[0]
    if family == "flux":
        assert guidance_distilled(pipe) and not uses_cfg(pipe, GENERATION)
        assert batch == len(prompts)  # no [uncond, cond] batch
        halves = {"both": slice(None)}
        for half in ("cond", "uncond"):
            with pytest.raises(MemPruneError, match="guidance-distilled.*--half both"):
                record_prompts(pipe, prompts, GENERATION, half=half, progress=False)
        from memprune.detect import require_cfg

        with pytest.raises(MemPruneError, match="guidance-distilled"):
            require_cfg(pipe, GENERATION)
    else:
        assert uses_cfg(pipe, GENERATION) and batch == 2 * len(prompts)
        halves = {"both": slice(None), "uncond": slice(0, len(prompts)), "cond": slice(len(prompts), None)}
    for half, rows in halves.items():
        stats = record_prompts(pipe, prompts, GENERATION, half=half, progress=False)
        assert stats.steps == list(range(GENERATION.steps)) and stats.layers == EXPECTED_LAYERS[family]
        for layer, seen in seen_by_layer.items():  # image and context (text-token) FeedForwards alike
            for step, x in enumerate(seen):
                expected = sumsq_normed(x[rows].numpy())
                accumulator = stats[(layer, step)]
                np.testing.assert_allclose(accumulator.sumsq_normed.numpy(), expected, rtol=1e-5)
                token_means = x[rows].double().mean(dim=1).numpy()
                np.testing.assert_allclose(accumulator.mean.numpy(), token_means.mean(0), rtol=1e-4, atol=1e-6)
                assert accumulator.count == token_means.shape[0] and accumulator.tokens == x[rows].shape[0] * x.shape[1]


@pytest.mark.parametrize("family", list(DIT_BUILDERS))
def test_locate_prune_save_and_reload_with_stock_diffusers(family, dit_folders, tmp_path, prompt_file):
    model = str(dit_folders[family])
    settings = LocateSettings(model=model, memorized=str(prompt_file), generation=GENERATION,
                              selection=SelectionSettings(ratio=0.25))
    locate_to_folder(settings, tmp_path / "located", device="cpu")
    masks = Masks.load(tmp_path / "located")
    assert masks.layers == EXPECTED_LAYERS[family] and masks.steps == [0, 1, 2]
    assert json.loads((tmp_path / "located" / "masks.json").read_text())["model"]["denoiser_class"] == \
        type(DIT_BUILDERS[family]().transformer).__name__
    summary = prune_to_folder(model, tmp_path / "located", tmp_path / "pruned", timesteps=2, device="cpu")
    assert "verified" in summary

    stock = STOCK_CLASSES[family]
    original = stock.from_pretrained(model).transformer.state_dict()
    pruned_pipe = stock.from_pretrained(str(tmp_path / "pruned"))  # stock diffusers, no memprune import needed
    assert type(pruned_pipe) is stock
    pruned = pruned_pipe.transformer.state_dict()
    union = masks.union_indices(2)
    assert sum(index.numel() for index in union.values()) > 0
    module_names = {id(module): name for name, module in pruned_pipe.transformer.named_modules()}
    weight_of = {
        module_names[id(linear)] + ".weight": ff for ff, linear in output_linears(pruned_pipe.transformer).items()
    }
    assert len(weight_of) == len(EXPECTED_LAYERS[family])
    for name, weight in original.items():
        if name not in weight_of or weight_of[name] not in union:
            torch.testing.assert_close(pruned[name], weight, rtol=0, atol=0)  # every other tensor untouched
            continue
        zeroed = torch.zeros(weight.numel(), dtype=torch.bool)
        zeroed[union[weight_of[name]]] = True
        zeroed = zeroed.view_as(weight)
        assert torch.count_nonzero(weight[zeroed]) == zeroed.sum()  # random weights: none was zero before
        assert torch.count_nonzero(pruned[name][zeroed]) == 0  # exactly the masked weights are zero ...
        torch.testing.assert_close(pruned[name][~zeroed], weight[~zeroed], rtol=0, atol=0)  # ... and no others change


def test_cli_locates_a_dit_at_a_given_size_and_flux_refuses_a_cfg_half(dit_folders, tmp_path, prompt_file):
    common = ["locate", "--memorized", str(prompt_file), "--steps", "2", "--height", "16", "--width", "16",
              "--device", "cpu"]
    ok = run(*common, "--model", dit_folders["pixart"], "--half", "cond", "--out", tmp_path / "pixart")
    assert ok.exit_code == 0, ok.output
    assert Masks.load(tmp_path / "pixart").layers == EXPECTED_LAYERS["pixart"]
    assert json.loads((tmp_path / "pixart" / "run.json").read_text())["settings"]["generation"]["height"] == 16
    refused = run(*common, "--model", dit_folders["flux"], "--half", "uncond", "--out", tmp_path / "flux")
    assert refused.exit_code == 1 and "guidance-distilled" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "flux").exists() and not (tmp_path / "flux.partial").exists()


# --------------------------------------------------------------------------------------------- Wen and the attack

@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_wen_and_the_attack_run_on_cfg_dits(family):
    """One Conditioning for every denoiser: Wen's mitigation and the attack optimise a DiT's prompt embedding."""
    from memprune.attack.embedding import AttackSettings, attack_prompt, generate_from_embeddings
    from memprune.conditioning import encode
    from memprune.detect import detection_scores
    from memprune.generate import generate
    from memprune.methods.wen import WenSettings, first_step_norms, wrap

    pipe = DIT_BUILDERS[family]()
    prompt = "a red circle"
    settings = GenerationSettings(steps=3, seeds=1, seed=0, height=TINY_SIZE, width=TINY_SIZE, guidance_scale=4.0)
    norms = first_step_norms(pipe, [prompt], 3, [0], 4.0)
    assert norms.shape == (1, 1) and np.isfinite(norms).all() and norms[0, 0] > 0
    if family == "sd3":  # the pipeline's own first denoiser call gives the same norm (PixArt's output adds variances)
        scores = detection_scores(pipe, [prompt], settings, progress=False)
        assert scores.loc[0, "detection_score_first_step"] == pytest.approx(norms[0, 0], rel=1e-4)
    mitigated = wrap(pipe, WenSettings(target=0.0, max_iterations=3))
    [(_, _, latent)] = generate(mitigated, [prompt], settings, output_type="latent", progress=False)
    record = mitigated.records[0]
    assert torch.isfinite(latent).all()
    assert record.iterations == 3 and record.last_norm < record.initial_norm

    image = torch.rand(3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0))
    result = attack_prompt(pipe, prompt, image, AttackSettings(attack_steps=3, noise_samples=2))
    assert np.isfinite(result.losses).all() and 0 < result.relative_norm
    if family == "pixart":  # the tiny SD3 VAE has no shift_factor, so its pipeline cannot decode images
        conditioning = encode(pipe, [prompt], None, (TINY_SIZE, TINY_SIZE))
        images = generate_from_embeddings(pipe, conditioning, conditioning.cond + result.delta,
                                          GenerationSettings(steps=2, seeds=2), (TINY_SIZE, TINY_SIZE))
        assert images.shape == (2, 3, TINY_SIZE, TINY_SIZE)


def test_wen_and_the_attack_refuse_guidance_distilled_flux():
    from memprune.attack.embedding import AttackSettings, attack_prompt
    from memprune.methods.wen import WenSettings, wrap

    pipe = DIT_BUILDERS["flux"]()
    with pytest.raises(MemPruneError, match="guidance-distilled.*no unconditional prediction"):
        wrap(pipe, WenSettings(target=1.0))
    with pytest.raises(MemPruneError, match="guidance-distilled"):
        attack_prompt(pipe, "a red circle", torch.rand(3, TINY_SIZE, TINY_SIZE), AttackSettings(attack_steps=1))
