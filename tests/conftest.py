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


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "memorized.csv"
    path.write_text(";Caption;type\n0;a red circle;VM\n1;a blue square on white background;TM\n2;a photo of the cat;VM\n"
                    "3;the green dog;VM\n")
    return path
