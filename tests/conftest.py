"""Fixtures every test module shares: the tiny pipelines saved once per session and a small prompt file.
The CLI helpers (`run`, `assert_refused`) live in helpers.py; the pipeline builders in tiny_pipelines.py and
tiny_dit_pipelines.py."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # the CI machine has 2 cores; one thread avoids oversubscription stalls

from tiny_pipelines import BUILDERS, save_builders  # noqa: E402


@pytest.fixture(scope="session")
def saved_pipelines(tmp_path_factory):
    """Each tiny UNet architecture (SD1, SD2, SDXL) saved once per session."""
    return save_builders(BUILDERS, tmp_path_factory, "model")


@pytest.fixture(scope="session")
def dit_folders(tmp_path_factory):
    """Each tiny DiT architecture (PixArt, SD3, Flux) saved once per session, built only when a test asks."""
    from tiny_dit_pipelines import DIT_BUILDERS
    return save_builders(DIT_BUILDERS, tmp_path_factory, "dit")


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "memorized.csv"
    path.write_text(
        ";Caption;type\n0;a red circle;VM\n1;a blue square on white background;TM\n2;a photo of the cat;VM\n"
        "3;the green dog;VM\n"
    )
    return path
