"""What `memprune evaluate` is asked to do: the models, the prompt files by role and the measurement settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MemPruneError
from ..generate import GenerationSettings
from ..models import DEFAULT_MODEL
from .fixed_thresholds import backend_name, check_fixed_thresholds
from .utility import check_utility_settings

if TYPE_CHECKING:
    from ..methods.wen import WenSettings

NONE = "none"  # --control none / --general none: leave the testbed default out
PROMPT_ROLES = ("memorized", "reference", "control", "general")


@dataclass
class EvaluateSettings:
    model: str = DEFAULT_MODEL
    edited: str | None = None
    compare: tuple[str, ...] = ()  # more edited models, side by side (named by their folder)
    memorized: str | None = None
    reference: str | None = None  # non-memorized prompts; testbed default: pool of control and general
    control: str | None = None  # same-style non-memorized prompts ("none": leave out)
    general: str | None = None  # general captions with attribute columns ("none": leave out)
    exclude_prompts: str | None = None  # prompts_used.csv of locate: gives the memorized_held_out group
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(steps=50, seeds=4))
    similarity: str = "ssim"  # built-in backend: ssim or l2 (ignored when sscd is given)
    sscd: str | None = None  # SSCD TorchScript or ONNX file
    threshold_percentile: float = 95.0
    grid_prompts: int = 8  # prompts (rows) per image grid
    attributes: bool = True  # attribute_accuracy on the general captions (testbed classifier)
    random_control: bool = True  # beside each edited model, a random edit zeroing as many weights per tensor
    random_control_seed: int = 0
    mitigation: str | None = None  # a generation-time mitigation (wen) of the unedited model, as one more column
    wen_lr: float = 0.05  # --wen-lr
    wen_iterations: int = 10  # --wen-iterations
    wen_target: float | None = None  # --wen-target; None: calibrated in the run (memprune.methods.wen)
    wen_mode: str = "prompt"  # --wen-mode: one embedding per prompt (Wen et al.) or per image
    nemo_neurons: str | None = None  # --nemo-neurons: `locate --method nemo` folder (--mitigation nemo_prompt)
    fixed_thresholds: tuple[float, ...] = ()  # --fixed-threshold: memorization_rate@<t> (fixed_thresholds)
    clip_model: str | None = None  # --clip-model: a transformers CLIPModel folder or hub id (clip_score)
    fid_reference: str | None = None  # --fid-reference: images folder or .npz statistics (memprune.evaluation.fid)
    fid_prompts: str | None = None  # --fid-prompts; None: the shipped COCO captions
    fid_count: int | None = None  # --fid-count: the first N FID captions; None: all
    inception: str | None = None  # --inception: the FID Inception TorchScript file

    def __post_init__(self) -> None:
        self.model = self.model or DEFAULT_MODEL
        if self.generation.steps < 1 or self.generation.seeds < 1:
            raise MemPruneError("--steps and --seeds must be at least 1.")
        if self.generation.batch_size < 1:
            raise MemPruneError("--batch-size must be at least 1.")
        if not 0 < self.threshold_percentile <= 100:
            raise MemPruneError(f"--threshold-percentile must be in (0, 100], got {self.threshold_percentile}.")
        if self.grid_prompts < 0:
            raise MemPruneError("--grid-prompts must be 0 or more.")
        if self.sscd is None and self.similarity not in ("ssim", "l2"):
            raise MemPruneError(f"Unknown similarity '{self.similarity}': use ssim or l2, or give --sscd FILE.")
        self.fixed_thresholds = check_fixed_thresholds(self.fixed_thresholds, backend_name(self.similarity, self.sscd))
        check_utility_settings(self)
        if self.mitigation is not None:
            from ..methods import get

            get(self.mitigation, "mitigation")
            self.wen_settings()  # refuse a bad --wen-lr/--wen-iterations/--wen-target now
            if self.mitigation == "nemo_prompt" and self.nemo_neurons is None:
                raise MemPruneError("--mitigation nemo_prompt needs --nemo-neurons FOLDER (the output of "
                                    "`memprune locate --method nemo`).")
            if self.mitigation in self.edited_models():
                raise MemPruneError(f"An edited model is named '{self.mitigation}', the name of the mitigation column: "
                                    "rename its folder.")

    def edited_models(self) -> dict[str, str]:
        """Name -> folder of every edited model: "edited" for a lone --edited, else each folder's name."""
        folders = ([self.edited] if self.edited else []) + list(self.compare)
        return edited_model_names(folders, by_folder=bool(self.compare))

    def wen_settings(self) -> WenSettings:
        from ..methods.wen import WenSettings

        return WenSettings(lr=self.wen_lr, max_iterations=self.wen_iterations, target=self.wen_target,
                           mode=self.wen_mode)

    def prompt_file(self, role: str) -> str | None:
        """The file of a role (memorized, reference, control, general), None when absent or "none"."""
        value = getattr(self, role)
        return None if value in (None, NONE) else value

    def check_prompt_files(self) -> None:
        """Refuse settings that leave evaluate without memorized or without non-memorized prompts."""
        for name in ("memorized", "reference"):
            if getattr(self, name) == NONE:
                raise MemPruneError(f"--{name} none is not allowed: evaluate needs that prompt file.")
        if self.memorized is None:
            raise MemPruneError("--memorized is required: evaluate needs the memorized prompts.")
        if all(self.prompt_file(name) is None for name in ("reference", "control", "general")):
            raise MemPruneError("No non-memorized prompts: give --reference FILE (or keep --control/--general).")


def edited_model_names(folders: list[str], by_folder: bool) -> dict[str, str]:
    """Name -> folder: a lone folder is "edited" unless `by_folder`; otherwise each is named by its folder's name
    ("_<position>" added to a repeated name or to "unedited"), so that the columns of every command join."""
    if len(folders) == 1 and not by_folder:
        return {"edited": folders[0]}
    named: dict[str, str] = {}
    for folder in folders:
        name = Path(folder).expanduser().resolve().name or "edited"
        if name == "unedited" or name in named:
            name = f"{name}_{len(named) + 1}"
        named[name] = folder
    return named
