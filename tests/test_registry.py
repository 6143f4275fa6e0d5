"""The method registry's promise: a weight edit registered from outside the package appears in the CLI's --method
choices and runs end to end (locate, then prune) without any change to a memprune module."""
import json
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from click.testing import CliRunner
from diffusers import DiffusionPipeline

from memprune import methods
from memprune.cli import main
from memprune.errors import MemPruneError
from memprune.masks import Masks
from memprune.methods import MethodInfo
from memprune.models import denoiser, prunable_linears

STEPS = 3


@dataclass
class ToySettings:
    steps: int = STEPS


def toy_module() -> ModuleType:
    """A weight edit that selects the first input column of every prunable layer at every step."""
    module = ModuleType("toy_method")
    module.METHOD = MethodInfo(name="toy", kind="weight_edit", summary="Toy: the first column of every layer.")

    def settings_from_options(options: dict) -> ToySettings:
        return ToySettings(steps=options.get("steps", STEPS))

    def edit(pipe, settings: ToySettings, memorized, reference, meta=None) -> Masks:
        dense = {}
        for name, linear in prunable_linears(denoiser(pipe)).items():
            mask = torch.zeros_like(linear.weight, dtype=torch.bool)
            mask[:, 0] = True
            for step in range(settings.steps):
                dense[(name, step)] = mask
        return Masks.from_dense(dense, meta={"selection": {"method": "toy"}, **(meta or {})})

    module.settings_from_options = settings_from_options
    module.edit = edit
    return module


@pytest.fixture
def toy():
    methods.register(toy_module())
    yield
    methods._registered.pop("toy", None)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_registered_method_is_listed_and_runs_locate_then_prune(toy, saved_pipelines, prompt_file, tmp_path):
    assert "toy" in run("locate", "--help")
    assert "toy" in run("prune", "--help")
    model = saved_pipelines["sd1"]
    located, pruned = tmp_path / "located", tmp_path / "pruned"
    summary = run("locate", "--model", model, "--method", "toy", "--memorized", prompt_file, "--reference", prompt_file,
                  "--steps", STEPS, "--device", "cpu", "--out", located)
    assert "toy selected" in summary and (located / "masks.safetensors").is_file()
    assert (located / "prompts_used.csv").is_file() and (located / "run.json").is_file()
    run("prune", "--model", model, "--method", "toy", "--masks", located, "--timesteps", STEPS, "--device", "cpu",
        "--out", pruned)

    original = prunable_linears(denoiser(DiffusionPipeline.from_pretrained(str(model))))
    edited = prunable_linears(denoiser(DiffusionPipeline.from_pretrained(str(pruned))))
    assert set(edited) == set(original) and edited
    for name, linear in edited.items():
        weight, before = linear.weight.detach(), original[name].weight.detach()
        assert torch.count_nonzero(weight[:, 0]) == 0, name  # the toy's selection is zeroed
        assert torch.equal(weight[:, 1:], before[:, 1:]), name  # and nothing else changed
    info = json.loads((pruned / "memprune.json").read_text())
    assert info["method"] == "toy"
    assert info["total_zeroed"] == sum(linear.weight.shape[0] for linear in edited.values())


def test_register_refuses_a_module_without_its_entry_points():
    module = ModuleType("half_method")
    module.METHOD = MethodInfo(name="half", kind="weight_edit", summary="no settings_from_options")
    module.edit = lambda pipe, settings, **inputs: None
    with pytest.raises(MemPruneError, match="defines no settings_from_options"):
        methods.register(module)
    assert "half" not in methods.names("weight_edit")
