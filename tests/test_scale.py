"""What full-size pipelines showed (issue 26), checked on the tiny ones: masks made sparse as they are selected
(int32 indices, old int64 files load the same), the source's dtypes kept on save, --height/--width everywhere,
evaluate's pipelines sharing what the edit left unchanged, and mask steps counted as denoiser calls (PNDM)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from helpers import run
from memprune.control import random_control_of, zeroed_counts
from memprune.evaluation.fid import Reference
from memprune.evaluation.run import add_random_controls, evaluate, load_pipes
from memprune.evaluation.settings import EvaluateSettings
from memprune.evaluation.utility import Utility, fid_rows
from memprune.finetune import FinetuneSettings
from memprune.generate import GenerationSettings, generate
from memprune.locate import record_prompts
from memprune.masks import MASKS_FILE, Masks
from memprune.methods import adversarial
from memprune.methods.wanda import SelectionSettings, neuron_mask, select, wanda_mask
from memprune.models import output_linears
from memprune.prompts import PromptList
from memprune.retain import generated_retain_data
from memprune.similarity import tensor_to_pil
from tiny_pipelines import sd1_pipeline, sdxl_pipeline

PROMPTS = ["a red circle", "the green dog"]


# ------------------------------------------------------------------------------------ 1. sparse masks, int32


@pytest.fixture(scope="module")
def recorded():
    pipe = sd1_pipeline()
    generation = GenerationSettings(steps=3, seeds=1)
    memorized = record_prompts(pipe, PROMPTS, generation, progress=False)
    reference = record_prompts(pipe, ["", ""], generation, progress=False)
    weights = {name: linear.weight for name, linear in output_linears(pipe.unet).items()}
    return weights, memorized, reference


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_sparse_selection_equals_the_dense_path(recorded, granularity):
    weights, memorized, reference = recorded
    settings = SelectionSettings(ratio=0.1, granularity=granularity)
    masks = select(weights, memorized, reference, settings)
    # The old path: every dense mask first, then Masks.from_dense (the old code's nonzero over the flat mask).
    dense = {}
    for layer, weight in weights.items():
        k = settings.keep(weight.shape[1])
        for step in memorized.steps:
            mem, ref = memorized[(layer, step)], reference[(layer, step)]
            dense[(layer, step)] = (wanda_mask(weight, mem.wanda_norm, ref.wanda_norm, k=k) if granularity == "weight"
                                    else neuron_mask(weight, mem, ref, k=k))
    assert list(masks.indices) == list(dense) and masks.shapes == {n: tuple(w.shape) for n, w in weights.items()}
    for key, mask in dense.items():
        expected = mask.flatten().nonzero().squeeze(1)  # int64, as masks were before
        assert masks.indices[key].dtype == torch.int32
        assert torch.equal(masks.indices[key].long(), expected), key
        assert torch.equal(masks.dense(*key), mask)
    assert sum(masks.count().values()) > 0


def test_int32_files_are_half_and_int64_files_load_the_same(recorded, tmp_path):
    weights, memorized, reference = recorded
    masks = select(weights, memorized, reference, SelectionSettings(ratio=0.1))
    masks.save(tmp_path / "new")
    # A file as older versions wrote it: the same selection with int64 indices.
    old = tmp_path / "old"
    old.mkdir()
    save_file({f"{layer}|{step}": idx.long() for (layer, step), idx in masks.indices.items()}, str(old / MASKS_FILE))
    (old / "masks.json").write_text((tmp_path / "new" / "masks.json").read_text())
    tensors = load_file(str(tmp_path / "new" / MASKS_FILE))
    assert {t.dtype for t in tensors.values()} == {torch.int32}
    new_bytes = sum(t.numel() for t in tensors.values()) * 4
    assert new_bytes * 2 == sum(t.numel() * 8 for t in load_file(str(old / MASKS_FILE)).values())
    loaded_new, loaded_old = Masks.load(tmp_path / "new"), Masks.load(old)
    for key, idx in masks.indices.items():
        assert torch.equal(loaded_new.indices[key], idx) and torch.equal(loaded_old.indices[key], idx)
        assert loaded_old.indices[key].dtype == torch.int32
    for layer in masks.layers:
        assert torch.equal(loaded_old.union(2)[layer], masks.union(2)[layer])


# ------------------------------------------------------------------------------------ 2. dtypes kept on save


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16") / "model"
    sd1_pipeline().to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(str(next((folder / component).glob("*.safetensors"))))


def test_prune_keeps_an_fp16_source_fp16_with_exactly_the_masked_weights_zeroed(fp16_model, prompt_file, tmp_path):
    result = run("locate", "--model", fp16_model, "--memorized", prompt_file, "--steps", 2, "--ratio", 0.1,
                 "--device", "cpu", "--out", tmp_path / "loc")
    assert result.exit_code == 0, result.output
    result = run("prune", "--model", fp16_model, "--masks", tmp_path / "loc", "--timesteps", 2, "--device", "cpu",
                 "--out", tmp_path / "pruned")
    assert result.exit_code == 0, result.output
    assert "Saved in float16 (the source's dtypes, --dtype keep)." in result.output
    for component in ("unet", "vae", "text_encoder"):
        assert {t.dtype for t in _weights(tmp_path / "pruned", component).values()} == {torch.float16}, component
    source, pruned = _weights(fp16_model, "unet"), _weights(tmp_path / "pruned", "unet")
    union = Masks.load(tmp_path / "loc").union(2)
    for layer, mask in union.items():
        key = f"{layer}.net.2.weight"
        assert torch.equal(pruned[key][mask], torch.zeros(int(mask.sum()), dtype=torch.float16))
        assert torch.equal(pruned[key][~mask], source[key][~mask])  # every other weight exactly as in the source
    others = set(source) - {f"{layer}.net.2.weight" for layer in union}
    assert all(torch.equal(pruned[name], source[name]) for name in others)
    record = json.loads((tmp_path / "pruned" / "run.json").read_text())
    assert record["saved_dtypes"]["unet"] == "float16" and record["settings"]["dtype"] == "keep"

    result = run("prune", "--model", fp16_model, "--masks", tmp_path / "loc", "--timesteps", 2, "--device", "cpu",
                 "--dtype", "float32", "--out", tmp_path / "fp32")
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in _weights(tmp_path / "fp32", "unet").values()} == {torch.float32}


def test_finetune_saves_in_the_source_dtype(fp16_model, tmp_path):
    (tmp_path / "memorized.txt").write_text("a red circle\n")
    (tmp_path / "retain.txt").write_text("the green dog\na photo of the cat\n")
    result = run("finetune", "--model", fp16_model, "--memorized", tmp_path / "memorized.txt", "--retain",
                 tmp_path / "retain.txt", "--method", "plain", "--steps", 1, "--batch-size", 1, "--sampling-steps", 1,
                 "--height", 16, "--width", 16, "--device", "cpu", "--out", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    assert "Saved in float16 (the source's dtypes, --dtype keep). Trained in float32." in result.output
    for component in ("unet", "vae", "text_encoder"):
        assert {t.dtype for t in _weights(tmp_path / "tuned", component).values()} == {torch.float16}, component


# ------------------------------------------------------------------------------------ 3. --height/--width


def test_sdxl_evaluates_at_the_asked_size(saved_pipelines, tmp_path):
    model = str(saved_pipelines["sdxl"])  # default size 16 px
    (tmp_path / "memorized.txt").write_text("a red circle\n")
    (tmp_path / "reference.txt").write_text("the green dog\n")
    result = run("evaluate", "--model", model, "--memorized", tmp_path / "memorized.txt", "--reference",
                 tmp_path / "reference.txt", "--steps", 2, "--seeds", 1, "--height", 24, "--width", 32,
                 "--grid-prompts", 0, "--device", "cpu", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    generation = json.loads((tmp_path / "ev" / "run.json").read_text())["settings"]["generation"]
    assert (generation["height"], generation["width"]) == (24, 32)
    settings = EvaluateSettings(model=model, memorized=str(tmp_path / "memorized.txt"),
                                reference=str(tmp_path / "reference.txt"), random_control=False,
                                generation=GenerationSettings(steps=2, seeds=1, height=24, width=32))
    images = evaluate(settings, device="cpu", progress=False).images
    assert {tuple(value.shape[-2:]) for value in images.values()} == {(24, 32)}


@pytest.mark.parametrize("command", ["evaluate", "attack", "detect", "finetune", "locate"])
def test_every_generating_command_takes_the_image_size(command):
    output = run(command, "--help").output
    assert "--height" in output and "--width" in output


def test_adversarial_finetune_attacks_and_trains_at_the_asked_size(tmp_path, monkeypatch):
    pipe = sdxl_pipeline()  # default size 16 px; SDXL's time ids carry the size
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path / "memorized.png"
    tensor_to_pil(torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(0))).save(path)
    settings = FinetuneSettings(steps=1, batch_size=1, sampling_steps=1, height=24, width=32, progress=False)
    retain = generated_retain_data(pipe, ["the green dog", "a white cat"], settings)
    latent_size = (24 // pipe.vae_scale_factor, 32 // pipe.vae_scale_factor)
    assert tuple(retain.latents.shape[-2:]) == latent_size
    surrogates = adversarial.surrogate_latents(pipe, ["a red circle"], retain, "prompt", settings)
    assert tuple(surrogates.shape[-2:]) == latent_size
    attacked = []
    original = adversarial.attack_prompt

    def spy(pipe, prompt, image, attack, conditioning):
        attacked.append((tuple(image.shape), conditioning.kwargs["added_cond_kwargs"]["time_ids"][0].tolist()))
        return original(pipe, prompt, image, attack, conditioning)

    monkeypatch.setattr(adversarial, "attack_prompt", spy)
    result = adversarial.train(pipe, settings, adversarial.AdversarialSettings(rounds=1, attack_steps=1),
                               memorized_prompts=["a red circle"], memorized_images=[str(path)], retain=retain)
    assert attacked == [((3, 24, 32), [24.0, 32.0, 0.0, 0.0, 24.0, 32.0])]
    assert result.history.adversarial_loss.notna().all()


# ------------------------------------------------------------------------------------ 4. shared components


def _edited(base: Path, folder: Path, change_vae: bool = False) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    with torch.no_grad():
        for linear in output_linears(pipe.unet).values():
            linear.weight[:, :2] = 0
        if change_vae:
            next(pipe.vae.parameters()).add_(1.0)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / "memprune.json").write_text(json.dumps({"source": str(base)}))
    return folder


@pytest.mark.parametrize("change_vae", [False, True])
def test_edited_and_control_pipelines_share_unchanged_components(saved_pipelines, tmp_path, change_vae):
    base = saved_pipelines["sd1"]
    edited = _edited(base, tmp_path / "edited", change_vae)
    settings = EvaluateSettings(model=str(base), edited=str(edited), memorized="m", reference="r")
    pipes = load_pipes(settings, None, None, "cpu", None)
    add_random_controls(pipes, settings, [])
    unedited, edited_pipe, control = pipes["unedited"], pipes["edited"], pipes["random_control"]
    for shared in ("text_encoder", "tokenizer"):
        assert getattr(edited_pipe, shared) is getattr(unedited, shared)
    assert (edited_pipe.vae is unedited.vae) is not change_vae
    assert edited_pipe.unet is not unedited.unet and edited_pipe.scheduler is not unedited.scheduler
    # The control is the unedited pipeline itself, its random weights zeroed only while it generates.
    before = {name: p.detach().clone() for name, p in unedited.unet.named_parameters()}
    copy, counts = random_control_of(unedited, edited_pipe, seed=0)
    with control.applied() as pipe:
        assert pipe is unedited
        assert zeroed_counts(copy.unet, pipe.unet) == {} and zeroed_counts(pipe.unet, copy.unet) == {}
        assert sum(zeroed_counts(StableDiffusionPipeline.from_pretrained(str(base)).unet, pipe.unet).values()) == \
            sum(counts.values())
    assert all(torch.equal(p, before[name]) for name, p in unedited.unet.named_parameters())  # restored exactly
    # The copy random_control still makes (library callers) copies only the denoiser.
    assert copy.vae is unedited.vae and copy.text_encoder is unedited.text_encoder and copy.unet is not unedited.unet


def test_fid_generates_the_random_control_with_its_weights_zeroed(saved_pipelines, tmp_path):
    # FID generates every model column again (its own captions): the control's weights must be zeroed there too.
    base = saved_pipelines["sd1"]
    settings = EvaluateSettings(model=str(base), edited=str(_edited(base, tmp_path / "edited")), memorized="m",
                                reference="r")
    pipes = load_pipes(settings, None, None, "cpu", None)
    add_random_controls(pipes, settings, [])
    unedited = pipes["unedited"]
    copy, _ = random_control_of(unedited, pipes["edited"], seed=0)
    before = {name: p.detach().clone() for name, p in unedited.unet.named_parameters()}
    seen: list[torch.Tensor] = []

    def extractor(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.clone())
        return images.mean((2, 3)).double()

    captions = PromptList(["a red circle", "the green dog", "a photo of the cat"])
    reference = Reference(np.zeros(3), np.eye(3), None, "zeros")
    generation = GenerationSettings(steps=2, seeds=1)
    rows = fid_rows(Utility(extractor=extractor, reference=reference, fid_prompts=captions),
                    {"random_control": pipes["random_control"]}, generation, progress=False)
    expected = torch.stack([image.to(torch.float32).clamp(0, 1) for _, _, image in
                            generate(copy, captions.prompts, generation, output_type="pt", progress=False)])
    assert torch.equal(torch.cat(seen), expected)  # the copy's images: the same weights were zeroed
    fid = dict((metric, value) for _, _, metric, value in rows)["fid"]
    means = expected.mean((2, 3)).double().numpy()
    by_hand = (means.mean(0) ** 2).sum() + np.trace(np.cov(means, rowvar=False)) + 3 \
        - 2 * np.sqrt(np.clip(np.linalg.eigvals(np.cov(means, rowvar=False)).real, 0, None)).sum()
    assert fid == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
    assert all(torch.equal(p, before[name]) for name, p in unedited.unet.named_parameters())  # restored after


# ------------------------------------------------------------------------------------ 5. denoiser calls (PNDM)


def test_pndm_mask_steps_are_denoiser_calls(prompt_file, tmp_path):
    pipe = sd1_pipeline()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.save_pretrained(str(tmp_path / "pndm"), safe_serialization=True)
    result = run("locate", "--model", tmp_path / "pndm", "--memorized", prompt_file, "--steps", 3, "--ratio", 0.1,
                 "--device", "cpu", "--out", tmp_path / "loc")
    assert result.exit_code == 0, result.output
    # PNDM with skip_prk_steps calls the denoiser steps + 1 times: its first step twice.
    assert "4 denoiser calls for --steps 3 with PNDMScheduler" in result.output
    meta = json.loads((tmp_path / "loc" / "masks.json").read_text())
    assert meta["steps"] == [0, 1, 2, 3]
    assert meta["denoiser_calls"] == {"per_generation": 4, "steps": 3, "scheduler": "PNDMScheduler",
                                      "text": "4 denoiser calls for --steps 3 with PNDMScheduler"}
    ok = run("prune", "--model", tmp_path / "pndm", "--masks", tmp_path / "loc", "--timesteps", 4, "--device", "cpu",
             "--out", tmp_path / "pruned")
    assert ok.exit_code == 0, ok.output
    refused = run("prune", "--model", tmp_path / "pndm", "--masks", tmp_path / "loc", "--timesteps", 5,
                  "--device", "cpu", "--out", tmp_path / "too_far")
    assert refused.exit_code != 0 and "use at most 4" in refused.output
