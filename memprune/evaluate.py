"""`memprune evaluate`: generate with fixed seeds from the unedited and an edited model and measure
memorization, diversity, utility, detection and cost (DESIGN.md §5). `--compare DIR` (repeatable) adds more
edited models (e.g. a Wanda and a UniForget prune) as further columns, all from the same seeds; with it
every edited model is named by its folder.

Groups (the `group` column of metrics.csv):
- ``memorized``: the --memorized prompts; ``memorized_held_out``: those of them NOT used for locating
  (captions absent from --exclude-prompts, a locate prompts_used.csv) — the generalisation claim;
- ``non_memorized``: the --reference prompts; on the embedded testbed without --reference, the pool of
  the two non-memorized groups below (no extra generation);
- ``same_style_control`` (--control; testbed default: non-memorized emoji, each seen once in training)
  and ``general`` (--general; testbed default: held-out shape captions with their attributes).

Copy threshold and memorization rate. When training images are known (an ``image`` column), a
generation's *copy similarity* is its similarity to its prompt's training image; the threshold is the
`threshold_percentile` (95) of the similarity of the unedited model's non-memorized generations to their
*nearest* known training image (any group), calibrated on ``same_style_control`` if present, else
``non_memorized``. Without training images (real SD) the unedited model's generation of a memorized
prompt stands in for its training image (NeMo's "SSCD gen"): the threshold is the percentile of the
unedited non-memorized generations' similarity to the nearest unedited memorized generation, and the
edited model's memorized generations count as copies when their similarity to the unedited generation
(same prompt and seed) is above it; the unedited model's rate is then undefined and not written.
Memorization rate = share of generations strictly above the threshold, over generations that have a
copy reference. One threshold (from the unedited model) serves every model. With training images, a second,
*strict* threshold is the same percentile of the unedited controls' similarity to their OWN training image
(``copy_threshold_strict``, ``memorization_rate_strict``): damaged but recognisable copies count under it.
``copy_similarity_ecdf.png`` draws the distributions of every model with both thresholds.

Random control. Beside each edited model (unless ``random_control=False``, ``--no-random-control``), the
unedited model with as many weights zeroed at random per tensor as the edit zeroes (memprune.control; seed
``random_control_seed``, recorded in run.json) is generated and scored as a further column, named
``random_control`` (one ``--edited``) or ``<name>_random_control``: the edit is evidence only where it beats it.

Other metrics: ``diversity`` = mean pairwise similarity between the seeds of one prompt (higher = less
diverse), averaged over prompts; ``detection_score`` = Wen et al.'s noise norm (memprune.detect),
``detection_auc`` = ROC AUC of the per-prompt score (mean over seeds), all memorized prompts (positive)
vs the row's non-memorized group; ``attribute_accuracy`` (general captions, testbed classifier);
``seconds_per_image`` per model and group, both models timed in the same run with the same settings
(generation alternates unedited/edited per prompt file after one warm-up call each).

``--mitigation wen`` adds the column ``wen``: the unedited model wrapped by Wen et al.'s inference-time mitigation
(memprune.methods.wen), generated on the same seeds and timed like the others, so its seconds_per_image_ratio is the
mitigation's cost per image in this run. Its target noise norm (``--wen-target``; default: the median first-step
noise norm of the unedited model on the threshold's calibration group, computed before generation), the mean AdamW
iterations per image and the share of images that reached the target are the metrics ``mitigation_target``,
``mitigation_iterations`` and ``mitigation_target_reached`` of that column.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pandas as pd
import torch

from .detect import generate_with_scores, roc_summary, summarize_steps
from .errors import MemPruneError
from .generate import GenerationSettings, uses_cfg
from .models import DEFAULT_MODEL, TESTBED_CAPTION_FILES, check_model_source, testbed_captions
from .prompts import PromptList, read_prompts
from .similarity import SimilarityBackend, load_image, make_backend, mean_pairwise, tensor_to_pil

GROUPS = ("memorized", "memorized_held_out", "non_memorized", "same_style_control", "general")
MEMORIZED_GROUPS = ("memorized", "memorized_held_out")
NON_MEMORIZED_GROUPS = ("non_memorized", "same_style_control", "general")
METRICS = (
    "n_prompts", "n_generations", "copy_threshold", "copy_threshold_strict", "memorization_rate",
    "memorization_rate_strict", "copy_similarity", "similarity_to_unedited",
    "diversity", "attribute_accuracy", "detection_score", "detection_score_first_step", "detection_auc",
    "detection_auc_first_step", "seconds_per_image", "seconds_per_image_ratio",
    "mitigation_target", "mitigation_iterations", "mitigation_target_reached",
)
TESTBED_FILES = {role: TESTBED_CAPTION_FILES[role] for role in ("memorized", "control", "general")}  # evaluate's roles
NONE = "none"  # --control none / --general none: leave the testbed default out


class AttributeClassifier(Protocol):
    """Predicts the known attributes of generated images: (N, 3, H, W) in [0, 1] -> one {attribute: value} per image.

    Attribute names are matched with the columns of the general prompt file (e.g. shape, colour, background, size).
    """

    def __call__(self, images: torch.Tensor) -> list[dict[str, str]]: ...


def load_testbed_classifier(model_folder: str | Path = DEFAULT_MODEL, log: Callable[[str], None] | None = None
                            ) -> AttributeClassifier | None:
    """The testbed's attribute classifier as an AttributeClassifier, or None when memprune.testbed is not importable.

    Uses `memprune.testbed.attributes.load_classifier(model_folder)` when the testbed provides it (saved weights),
    else trains the classifier with `train_attribute_classifier()` (deterministic: fixed seeds, one torch thread;
    minutes on a CPU). Either object's `predict(uint8 N×H×W×3) -> {attribute: names}` is adapted to the protocol.
    """
    try:
        from .testbed import attributes
    except ImportError:
        return None
    factory = getattr(attributes, "load_classifier", None)
    if callable(factory):
        classifier = factory(str(model_folder))
    elif callable(getattr(attributes, "train_attribute_classifier", None)):
        (log or (lambda message: None))("Training the testbed attribute classifier (deterministic; minutes on a CPU).")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            classifier = attributes.train_attribute_classifier()
        finally:
            torch.set_num_threads(threads)
    else:
        return None
    if not hasattr(classifier, "predict"):
        return classifier

    def classify(images: torch.Tensor) -> list[dict[str, str]]:
        array = (images.detach().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        predicted = classifier.predict(array)
        return [{name: str(values[i]) for name, values in predicted.items()} for i in range(len(array))]

    return classify


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

    def __post_init__(self):
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
        if self.mitigation is not None:
            from .methods import get

            get(self.mitigation, "mitigation")
            self.wen_settings()  # refuse a bad --wen-lr/--wen-iterations/--wen-target now
            if self.mitigation in self.edited_models():
                raise MemPruneError(f"An edited model is named '{self.mitigation}', the name of the mitigation column: "
                                    "rename its folder.")

    @property
    def is_testbed(self) -> bool:
        return is_testbed(self.model)

    def edited_models(self) -> dict[str, str]:
        """Name -> folder of every edited model: "edited" for a lone --edited, else each folder's name."""
        folders = ([self.edited] if self.edited else []) + list(self.compare)
        if len(folders) == 1 and not self.compare:
            return {"edited": folders[0]}
        named: dict[str, str] = {}
        for folder in folders:
            name = Path(folder).expanduser().resolve().name or "edited"
            if name == "unedited" or name in named:
                name = f"{name}_{len(named) + 1}"
            named[name] = folder
        return named

    def wen_settings(self):
        from .methods.wen import WenSettings

        return WenSettings(lr=self.wen_lr, max_iterations=self.wen_iterations, target=self.wen_target)

    def with_defaults(self) -> "EvaluateSettings":
        """Fill the testbed's caption files where none were given; require --memorized/--reference otherwise.

        Idempotent; "none" stays in the settings (as given) and means "no such group".
        """
        values = {}
        captions = testbed_captions(self.model)
        if captions is not None:
            for name, filename in TESTBED_FILES.items():
                if getattr(self, name) is None:
                    values[name] = str(captions / filename)
        else:
            for name in ("memorized", "reference"):
                if getattr(self, name) is None:
                    raise MemPruneError(f"--{name} is required when --model is not the embedded testbed.")
        for name in ("memorized", "reference"):
            if getattr(self, name) == NONE:
                raise MemPruneError(f"--{name} none is not allowed: evaluate needs that prompt file.")
        settings = replace(self, **values)
        if all(settings.prompt_file(name) is None for name in ("reference", "control", "general")):
            raise MemPruneError("No non-memorized prompts: give --reference FILE (or keep --control/--general).")
        return settings

    def prompt_file(self, role: str) -> str | None:
        """The file of a role (memorized, reference, control, general), None when absent or "none"."""
        value = getattr(self, role)
        return None if value in (None, NONE) else value


def is_testbed(model: str | None) -> bool:
    return testbed_captions(model) is not None


# --------------------------------------------------------------------------------------------- edited model

def same_model(a: str, b: str) -> bool:
    """Local folders compare by resolved path, hub ids by name."""
    path_a, path_b = Path(a).expanduser(), Path(b).expanduser()
    if path_a.exists() or path_b.exists():
        return path_a.exists() and path_b.exists() and path_a.resolve() == path_b.resolve()
    return a.strip().rstrip("/") == b.strip().rstrip("/")


def check_edited(model: str, edited: str) -> str:
    """Refuse an edited model whose memprune.json names another base; return a note on what was checked."""
    from .prune import PRUNE_INFO

    check_model_source(edited)
    info_path = Path(edited).expanduser() / PRUNE_INFO
    if not info_path.is_file():
        return f"Edited model '{edited}' has no {PRUNE_INFO}: its base model could not be checked."
    try:
        source = json.loads(info_path.read_text())["source"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MemPruneError(f"'{info_path}' is not a valid memprune.json (no 'source'): re-run memprune prune.") from exc
    if not same_model(str(source), str(model)):
        raise MemPruneError(
            f"Edited model '{edited}' was edited from '{source}', not from --model '{model}': "
            f"evaluate it against its own base (--model {source})."
        )
    return f"Edited model '{edited}' was edited from '{source}' (= --model)."


# --------------------------------------------------------------------------------------------- inputs

@dataclass
class Group:
    name: str
    members: list[tuple[str, int]]  # (source, prompt index)


def _read_sources(settings: EvaluateSettings) -> tuple[dict[str, PromptList], dict[str, str]]:
    """Prompt files by role (memorized, reference, control, general); a file given twice is read (and generated) once.

    Returns the prompt lists by source key and, per role, the source key it uses.
    """
    sources: dict[str, PromptList] = {}
    by_path: dict[Path, str] = {}
    roles: dict[str, str] = {}
    for role in ("memorized", "reference", "control", "general"):
        path = settings.prompt_file(role)
        if path is None:
            continue
        resolved = Path(path).expanduser().resolve()
        if resolved in by_path:
            roles[role] = by_path[resolved]
            continue
        sources[role] = read_prompts(path)
        by_path[resolved] = roles[role] = role
    for prompts in sources.values():
        _locate_training_images(prompts)
    return sources, roles


def _locate_training_images(prompts: PromptList) -> None:
    """Every named training image must exist (read_prompts resolves them; see prompts._image_path)."""
    for index, image in enumerate(prompts.images or []):
        if image and not Path(image).is_file():
            raise MemPruneError(f"Prompt file '{prompts.source}' row {index + 1}: training image '{image}' does not exist.")


def _build_groups(settings: EvaluateSettings, sources: dict[str, PromptList], roles: dict[str, str]) -> tuple[dict[str, Group], list[str]]:
    notes = []
    memorized = sources[roles["memorized"]]
    groups = {"memorized": Group("memorized", [(roles["memorized"], i) for i in range(len(memorized))])}
    if settings.exclude_prompts is not None:
        used = set(read_prompts(settings.exclude_prompts).prompts)
        held_out = [i for i, caption in enumerate(memorized.prompts) if caption not in used]
        if len(held_out) == len(memorized):
            raise MemPruneError(
                f"None of the captions in '{settings.exclude_prompts}' is a memorized prompt of '{memorized.source}': "
                "was it written by locate on another --memorized file?"
            )
        if held_out:
            groups["memorized_held_out"] = Group("memorized_held_out", [(roles["memorized"], i) for i in held_out])
        else:
            notes.append("Every memorized prompt was used for locating: no memorized_held_out group.")
    members = lambda role: [(roles[role], i) for i in range(len(sources[roles[role]]))]  # noqa: E731
    if "reference" in roles:
        groups["non_memorized"] = Group("non_memorized", members("reference"))
    else:
        groups["non_memorized"] = Group("non_memorized", [m for role in ("control", "general") if role in roles for m in members(role)])
    if "control" in roles:
        groups["same_style_control"] = Group("same_style_control", members("control"))
    if "general" in roles:
        groups["general"] = Group("general", members("general"))
    return groups, notes


# --------------------------------------------------------------------------------------------- result

@dataclass
class EvaluationResult:
    metrics: pd.DataFrame  # tidy: model, group, metric, value
    generations: pd.DataFrame  # one row per model, source, prompt and seed
    threshold: float
    threshold_info: dict
    backend: str  # the similarity backend's description
    images: dict[tuple[str, str], torch.Tensor]  # (model, source) -> (prompts, seeds, 3, H, W) in [0, 1]
    sources: dict[str, PromptList]
    groups: dict[str, Group]
    training_images: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    random_controls: dict[str, dict] = field(default_factory=dict)  # control name -> of, seed, zeroed weights

    def value(self, model: str, group: str, metric: str) -> float:
        rows = self.metrics[(self.metrics.model == model) & (self.metrics.group == group) & (self.metrics.metric == metric)]
        if rows.empty:
            raise KeyError((model, group, metric))
        return float(rows.value.iloc[0])


def calibrate_threshold(similarities, percentile: float = 95.0) -> float:
    """The copy threshold: the given percentile (linear interpolation, numpy's default) of non-memorized similarities."""
    values = np.asarray(similarities, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise MemPruneError("No non-memorized generations to calibrate the copy threshold on.")
    return float(np.percentile(values, percentile))


def strict_threshold(copy_similarity: dict, members: list[tuple[str, int]], percentile: float = 95.0) -> float | None:
    """The strict copy threshold: the percentile of the unedited control generations' similarity to their OWN
    training image (not the nearest of all known images), None when the controls have no training images.

    A same-style caption renders its own image's content without being a copy of it; above this, a generation
    resembles its training image more than a non-memorized caption's generation resembles its own."""
    own = np.concatenate([copy_similarity["unedited", source][i] for source, i in members])
    return calibrate_threshold(own, percentile) if np.isfinite(own).any() else None


def memorization_rate(similarities, threshold: float) -> float:
    """Share of generations whose copy similarity is strictly above the threshold (NaN entries are left out)."""
    values = np.asarray(similarities, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.mean(values > threshold)) if values.size else float("nan")


def diversity(backend: SimilarityBackend, features: torch.Tensor) -> float:
    """Mean over prompts of the mean pairwise similarity between seeds: features (prompts, seeds, ...)."""
    values = [mean_pairwise(backend, prompt_features) for prompt_features in features]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _attribute_predictions(classifier: AttributeClassifier, images: torch.Tensor) -> list[dict[str, str]]:
    predictions = classifier(images)
    if isinstance(predictions, pd.DataFrame):
        predictions = predictions.to_dict("records")
    elif isinstance(predictions, dict):
        keys = list(predictions)
        predictions = [{k: predictions[k][i] for k in keys} for i in range(len(images))]
    predictions = list(predictions)
    if len(predictions) != len(images):
        raise MemPruneError(f"The attribute classifier returned {len(predictions)} predictions for {len(images)} images.")
    return predictions


def attribute_accuracy(predictions: list[dict], expected: list[dict]) -> float:
    """Share of (image, attribute) pairs predicted right, over the attributes both sides name (case-insensitive)."""
    alias = {"color": "colour"}
    hits = []
    for predicted, truth in zip(predictions, expected):
        truth = {alias.get(k, k): v for k, v in truth.items() if v not in (None, "")}
        for key, value in predicted.items():
            key = alias.get(key, key)
            if key in truth:
                hits.append(str(value).strip().lower() == str(truth[key]).strip().lower())
    return float(np.mean(hits)) if hits else float("nan")


# --------------------------------------------------------------------------------------------- evaluate

def generate_images(pipe, prompts: list[str], generation: GenerationSettings, desc: str, progress: bool):
    """Images (P, S, 3, H, W), per-generation Wen scores (P, S) mean and first step (NaN without CFG)."""
    n, seeds = len(prompts), generation.seeds
    images: list[list[torch.Tensor | None]] = [[None] * seeds for _ in range(n)]
    mean = np.full((n, seeds), np.nan)
    first = np.full((n, seeds), np.nan)
    for index, seed, image, per_step in generate_with_scores(pipe, prompts, generation, "pt", progress, desc):
        s = seed - generation.seed
        images[index][s] = image.detach().to("cpu", torch.float32).clamp(0, 1)
        if per_step is not None:
            mean[index, s], first[index, s] = summarize_steps(per_step)
    return torch.stack([torch.stack(row) for row in images]), mean, first


def _warm_up(pipe, prompt: str, generation: GenerationSettings) -> None:
    """One short call so that the first timed group does not pay for lazy initialisation."""
    from .generate import generate

    warm = replace(generation, steps=min(2, generation.steps), seeds=1, batch_size=1)
    for _ in generate(pipe, [prompt], warm, output_type="latent", progress=False):
        pass


def evaluate(settings: EvaluateSettings, pipe=None, edited_pipe=None, attribute_classifier="auto",
             device: str = "auto", dtype=None, progress: bool = True, log: Callable[[str], None] | None = None) -> EvaluationResult:
    """Generate every prompt file with both models (same seeds) and compute the metrics (see the module docstring).

    `pipe`/`edited_pipe` may be given loaded; otherwise they are loaded from settings.model / settings.edited.
    `attribute_classifier`: "auto" (the testbed's, if importable and the model is the testbed), None, or a callable.
    """
    import time

    from .models import load_pipeline, resolve_device

    log = log or (lambda message: None)
    settings = settings.with_defaults()
    notes: list[str] = []
    edited_folders = settings.edited_models()
    for folder in edited_folders.values():
        notes.append(check_edited(settings.model, folder))
    backend = make_backend(settings.similarity, settings.sscd)
    log(f"Similarity backend: {backend.description}")
    sources, roles = _read_sources(settings)
    groups, group_notes = _build_groups(settings, sources, roles)
    notes += group_notes
    if attribute_classifier == "auto":
        wanted = settings.attributes and settings.is_testbed and "general" in groups
        attribute_classifier = load_testbed_classifier(settings.model, log) if wanted else None
        if wanted and attribute_classifier is None:
            notes.append("No testbed attribute classifier is importable: attribute_accuracy is skipped.")

    timings: dict[str, float] = {}
    start = time.perf_counter()
    target = resolve_device(device)
    if pipe is None:
        pipe = load_pipeline(settings.model, target, dtype)
    pipes = {"unedited": pipe}
    for index, (name, folder) in enumerate(edited_folders.items()):
        given = edited_pipe if index == 0 and settings.edited is not None else None
        pipes[name] = given if given is not None else load_pipeline(folder, target, dtype)
    if edited_pipe is not None and len(pipes) == 1:
        pipes["edited"] = edited_pipe
    random_controls = _add_random_controls(pipes, settings, notes) if settings.random_control else {}
    timings["load"] = round(time.perf_counter() - start, 3)
    cfg = uses_cfg(pipe, settings.generation)
    if not cfg:
        notes.append("No classifier-free guidance (guidance scale <= 1): detection metrics are skipped.")

    mitigated: dict[str, object] = {}
    if settings.mitigation is not None:
        tic = time.perf_counter()
        mitigated = _mitigation_pipes(settings, pipe, sources, groups, notes, log)
        pipes.update(mitigated)
        timings["mitigation_calibration"] = round(time.perf_counter() - tic, 3)

    generation = settings.generation
    first_prompt = sources[roles["memorized"]].prompts[0]
    for model_pipe in pipes.values():
        _warm_up(model_pipe, first_prompt, generation)
    for model_pipe in mitigated.values():
        model_pipe.records.clear()  # the warm-up's records are not part of the evaluation
    images, det_mean, det_first, seconds = {}, {}, {}, {}
    mitigation_records: dict[tuple[str, str], list] = {}
    for source, prompts in sources.items():
        for model, model_pipe in pipes.items():  # alternate models per file: load drift hits both alike
            if model in mitigated:
                model_pipe.records.clear()
            tic = time.perf_counter()
            images[model, source], det_mean[model, source], det_first[model, source] = generate_images(
                model_pipe, prompts.prompts, generation, f"{model}: {source}", progress)
            seconds[model, source] = time.perf_counter() - tic
            timings[f"generate_{model}_{source}"] = round(seconds[model, source], 3)
            if model in mitigated:
                mitigation_records[model, source] = list(model_pipe.records)

    tic = time.perf_counter()
    computed = _compute(settings, backend, sources, groups, pipes, images, det_mean, det_first, seconds, cfg,
                        attribute_classifier)
    timings["metrics"] = round(time.perf_counter() - tic, 3)
    metrics, generations, threshold, threshold_info, training = computed
    if mitigated:
        metrics = _add_mitigation_metrics(metrics, settings, mitigated, mitigation_records, groups, list(pipes))
    return EvaluationResult(metrics=metrics, generations=generations, threshold=threshold, threshold_info=threshold_info,
                            backend=backend.description, images=images, sources=sources, groups=groups,
                            training_images=training, timings=timings, notes=notes, random_controls=random_controls)


def random_control_name(edited_name: str) -> str:
    return "random_control" if edited_name == "edited" else f"{edited_name}_random_control"


def _add_random_controls(pipes: dict, settings: EvaluateSettings, notes: list[str]) -> dict[str, dict]:
    """Beside each edited model, the unedited model with as many random weights zeroed per tensor (memprune.control)."""
    from .control import random_control_of

    controls = {}
    for name, edited_pipe in list(pipes.items())[1:]:
        control, counts = random_control_of(pipes["unedited"], edited_pipe, settings.random_control_seed)
        if control is None:
            notes.append(f"'{name}' zeroes no weight of the base model: no random control beside it.")
            continue
        control_name = random_control_name(name)
        pipes[control_name] = control
        controls[control_name] = {"of": name, "seed": settings.random_control_seed, "zeroed_weights": sum(counts.values()),
                                  "tensors": len(counts)}
        notes.append(f"'{control_name}': the unedited model with {sum(counts.values())} random weights zeroed, as many "
                     f"per tensor as '{name}' zeroes ({len(counts)} tensors, seed {settings.random_control_seed}).")
    return controls


def _calibration_group(groups: dict[str, Group]) -> str:
    """The non-memorized group that calibrates the copy threshold (and Wen's default target)."""
    return "same_style_control" if "same_style_control" in groups else "non_memorized"


def _mitigation_pipes(settings: EvaluateSettings, pipe, sources, groups, notes: list[str], log) -> dict[str, object]:
    """{name: wrapped unedited pipeline} of the --mitigation; Wen's target is calibrated here when not given."""
    from .generate import guidance_scale
    from .methods import get
    from .methods.wen import calibrate_target

    module = get(settings.mitigation, "mitigation")
    generation = settings.generation
    if not uses_cfg(pipe, generation):
        raise MemPruneError(f"--mitigation {settings.mitigation} needs classifier-free guidance: use a guidance scale "
                            "above 1.")
    wen = settings.wen_settings()
    if wen.target is None:
        calibration = _calibration_group(groups)
        prompts = [sources[source].prompts[i] for source, i in groups[calibration].members]
        seeds = list(range(generation.seed, generation.seed + generation.seeds))
        wen = replace(wen, target=calibrate_target(pipe, prompts, generation.steps, seeds, guidance_scale(pipe, generation)))
        notes.append(f"Wen mitigation target noise norm {wen.target:.4g}: median first-step noise norm of the unedited "
                     f"model on the {len(prompts)} {calibration} prompts x {len(seeds)} seeds (lr {wen.lr:g}, at most "
                     f"{wen.max_iterations} iterations).")
    else:
        notes.append(f"Wen mitigation target noise norm {wen.target:.4g} (given; lr {wen.lr:g}, at most "
                     f"{wen.max_iterations} iterations).")
    log(notes[-1])
    return {settings.mitigation: module.wrap(pipe, wen)}


def _add_mitigation_metrics(metrics: pd.DataFrame, settings, mitigated, records, groups, models) -> pd.DataFrame:
    """Per group: the target, the mean AdamW iterations per image and the share of images that reached the target.

    Records come in generate()'s order: seeds outer, prompts inner (batches keep the prompt order).
    """
    rows = []
    seeds = settings.generation.seeds
    for model, wrapped in mitigated.items():
        per_source = {}
        for (name, source), items in records.items():
            if name == model:
                count = len(items) // seeds
                iterations = np.array([r.iterations for r in items], dtype=float).reshape(seeds, count).T
                reached = np.array([r.reached for r in items], dtype=float).reshape(seeds, count).T
                per_source[source] = (iterations, reached)
        for name, group in groups.items():
            rows.append((model, name, "mitigation_target", float(wrapped.settings.target)))
            rows.append((model, name, "mitigation_iterations",
                         float(np.mean([per_source[s][0][i] for s, i in group.members]))))
            rows.append((model, name, "mitigation_target_reached",
                         float(np.mean([per_source[s][1][i] for s, i in group.members]))))
    metrics = pd.concat([metrics, pd.DataFrame(rows, columns=metrics.columns)], ignore_index=True)
    order = {name: i for i, name in enumerate(METRICS)}
    return metrics.assign(
        _m=metrics.model.map({m: i for i, m in enumerate(models)}), _g=metrics.group.map({g: i for i, g in enumerate(GROUPS)}),
        _k=metrics.metric.map(order),
    ).sort_values(["_m", "_g", "_k"], kind="stable").drop(columns=["_m", "_g", "_k"]).reset_index(drop=True)


def _compute(settings, backend, sources, groups, pipes, images, det_mean, det_first, seconds, cfg, classifier):
    models = list(pipes)
    size = next(iter(images.values())).shape[-2:]
    # Features of every generation, (P, S, ...), and of the known training images.
    features = {key: backend.features(value.flatten(0, 1)) for key, value in images.items()}
    features = {key: value.view(*images[key].shape[:2], *value.shape[1:]) for key, value in features.items()}
    training: dict[str, list[torch.Tensor | None]] = {}
    training_features: dict[str, list[torch.Tensor | None]] = {}
    pool, pool_paths = [], set()
    for source, prompts in sources.items():
        paths = prompts.images or [None] * len(prompts)
        training[source] = [load_image(path, tuple(size)) if path else None for path in paths]
        known = [i for i, image in enumerate(training[source]) if image is not None]
        encoded = backend.features(torch.stack([training[source][i] for i in known])) if known else None
        training_features[source] = [None] * len(prompts)
        for row, i in enumerate(known):
            training_features[source][i] = encoded[row]
            if paths[i] not in pool_paths:
                pool_paths.add(paths[i])
                pool.append(encoded[row])

    shape = lambda source: images[models[0], source].shape[:2]  # noqa: E731
    nan = lambda source: np.full(tuple(shape(source)), np.nan)  # noqa: E731
    copy_sim, to_unedited = {}, {}
    for (model, source), feats in features.items():
        values = nan(source)
        for i, reference in enumerate(training_features[source]):
            if reference is not None:
                values[i] = backend.paired(feats[i], reference[None].expand_as(feats[i])).numpy()
        copy_sim[model, source] = values
        if model != "unedited":
            unedited = features["unedited", source]
            to_unedited[model, source] = backend.paired(feats.flatten(0, 1), unedited.flatten(0, 1)).view(shape(source)).numpy()

    # Threshold calibration on the unedited model's non-memorized generations.
    memorized_source = groups["memorized"].members[0][0]
    mode = "training_image" if any(f is not None for f in training_features[memorized_source]) else "unedited_generation"
    calibration = "same_style_control" if "same_style_control" in groups else "non_memorized"
    members = groups[calibration].members
    calib_feats = torch.stack([features["unedited", source][i] for source, i in members]).flatten(0, 1)
    if mode == "training_image":
        pool_tensor = torch.stack(pool)
        pool_text = f"{len(pool)} known training images"
    else:
        pool_tensor = features["unedited", memorized_source].flatten(0, 1)
        pool_text = f"{len(pool_tensor)} unedited memorized generations (stand-ins for the training images)"
    nearest = backend.matrix(calib_feats, pool_tensor).max(dim=1).values.numpy()
    threshold = calibrate_threshold(nearest, settings.threshold_percentile)
    threshold_info = {
        "value": threshold, "percentile": settings.threshold_percentile, "calibrated_on": calibration,
        "mode": mode, "generations": int(len(nearest)),
        "description": f"{settings.threshold_percentile:g}th percentile of the similarity of {len(nearest)} unedited "
                       f"{calibration} generations to their nearest of {pool_text}; backend {backend.name}",
    }
    nearest_by_member = dict(zip(members, nearest.reshape(len(members), -1)))
    strict = strict_threshold(copy_sim, members, settings.threshold_percentile) if mode == "training_image" else None
    if strict is not None:
        threshold_info["strict"] = {
            "value": strict, "percentile": settings.threshold_percentile, "calibrated_on": calibration,
            "description": f"{settings.threshold_percentile:g}th percentile of the similarity of the unedited "
                           f"{calibration} generations to their OWN training image; backend {backend.name}",
        }

    copy_reference = {}
    for model, source in images:
        if mode == "training_image":
            copy_reference[model, source] = copy_sim[model, source]
        elif model != "unedited" and source == memorized_source:
            copy_reference[model, source] = to_unedited[model, source]
        else:
            copy_reference[model, source] = nan(source)

    attributes = {}
    if classifier is not None and "general" in groups:
        general_source = groups["general"].members[0][0]
        prompts = sources[general_source]
        expected = [{k: prompts.extra[k][i] for k in prompts.extra} for i in range(len(prompts))]
        for model in models:
            batch = images[model, general_source]
            predictions = _attribute_predictions(classifier, batch.flatten(0, 1))
            truth = [expected[i] for i in range(batch.shape[0]) for _ in range(batch.shape[1])]
            attributes[model] = attribute_accuracy(predictions, truth)

    # Per-generation table.
    records = []
    for (model, source), imgs in images.items():
        prompts = sources[source]
        for i in range(imgs.shape[0]):
            for s in range(imgs.shape[1]):
                near = nearest_by_member.get((source, i))
                records.append({
                    "model": model, "source": source, "prompt_index": i, "caption": prompts.prompts[i],
                    "seed": settings.generation.seed + s,
                    "copy_similarity": copy_sim[model, source][i, s],
                    "similarity_to_unedited": to_unedited[model, source][i, s] if model != "unedited" else np.nan,
                    "nearest_training_similarity": near[s] if near is not None and model == "unedited" else np.nan,
                    "copy_reference_similarity": copy_reference[model, source][i, s],
                    "is_copy": (copy_reference[model, source][i, s] > threshold
                                if np.isfinite(copy_reference[model, source][i, s]) else np.nan),
                    "is_copy_strict": (copy_reference[model, source][i, s] > strict
                                       if strict is not None and np.isfinite(copy_reference[model, source][i, s])
                                       else np.nan),
                    "detection_score": det_mean[model, source][i, s],
                    "detection_score_first_step": det_first[model, source][i, s],
                })
    generations = pd.DataFrame(records)

    rows = [("unedited", calibration, "copy_threshold", threshold)]
    if strict is not None:
        rows.append(("unedited", calibration, "copy_threshold_strict", strict))
    pick = lambda table, members: np.stack([table[source][i] for source, i in members])  # noqa: E731
    for model in models:
        per_model = lambda table: {source: table[model, source] for source in sources}  # noqa: E731
        for name, group in groups.items():
            add = lambda metric, value: rows.append((model, name, metric, float(value)))  # noqa: E731
            add("n_prompts", len(group.members))
            add("n_generations", len(group.members) * settings.generation.seeds)
            reference_values = pick(per_model(copy_reference), group.members)
            if np.isfinite(reference_values).any():
                add("memorization_rate", memorization_rate(reference_values, threshold))
                if strict is not None:
                    add("memorization_rate_strict", memorization_rate(reference_values, strict))
            copy_values = pick(per_model(copy_sim), group.members)
            if np.isfinite(copy_values).any():
                add("copy_similarity", np.nanmean(copy_values))
            if model != "unedited":
                add("similarity_to_unedited", pick(per_model(to_unedited), group.members).mean())
            if settings.generation.seeds > 1:
                add("diversity", diversity(backend, torch.stack([features[model, s][i] for s, i in group.members])))
            if name == "general" and model in attributes and math.isfinite(attributes[model]):
                add("attribute_accuracy", attributes[model])
            if cfg:
                add("detection_score", pick(per_model(det_mean), group.members).mean())
                add("detection_score_first_step", pick(per_model(det_first), group.members).mean())
            used = {source for source, _ in group.members}
            time_per_image = (sum(seconds[model, s] for s in used)
                              / sum(images[model, s].shape[0] * images[model, s].shape[1] for s in used))
            add("seconds_per_image", time_per_image)
            if model != "unedited":
                baseline = (sum(seconds["unedited", s] for s in used)
                            / sum(images["unedited", s].shape[0] * images["unedited", s].shape[1] for s in used))
                add("seconds_per_image_ratio", time_per_image / baseline)
        if cfg:
            positives = {key: pick(per_model(table), groups["memorized"].members).mean(axis=1)
                         for key, table in (("mean", det_mean), ("first", det_first))}
            for name in NON_MEMORIZED_GROUPS:
                if name not in groups:
                    continue
                for key, metric in (("mean", "detection_auc"), ("first", "detection_auc_first_step")):
                    table = det_mean if key == "mean" else det_first
                    negatives = pick(per_model(table), groups[name].members).mean(axis=1)
                    labels = np.r_[np.ones(len(positives[key])), np.zeros(len(negatives))]
                    roc = roc_summary(labels, np.r_[positives[key], negatives])
                    if roc["auc"] is not None:
                        rows.append((model, name, metric, roc["auc"]))
    metrics = pd.DataFrame(rows, columns=["model", "group", "metric", "value"])
    order = {name: i for i, name in enumerate(METRICS)}
    metrics = metrics.assign(
        _m=metrics.model.map({m: i for i, m in enumerate(models)}), _g=metrics.group.map({g: i for i, g in enumerate(GROUPS)}),
        _k=metrics.metric.map(order),
    ).sort_values(["_m", "_g", "_k"], kind="stable").drop(columns=["_m", "_g", "_k"]).reset_index(drop=True)
    return metrics, generations, threshold, threshold_info, training


# --------------------------------------------------------------------------------------------- outputs

def threshold_lines(result: EvaluationResult, prefix: str = "") -> list[str]:
    """Which threshold each memorization rate used, in words."""
    lines = [f"{prefix}Copy threshold {result.threshold:.4g} (memorization_rate): {result.threshold_info['description']}."]
    strict = result.threshold_info.get("strict")
    if strict:
        lines.append(f"{prefix}Strict copy threshold {strict['value']:.4g} (memorization_rate_strict): "
                     f"{strict['description']}.")
    return lines


def _format(value: float) -> str:
    if value is None or not math.isfinite(value):
        return ""
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def metrics_markdown(result: EvaluationResult, settings: EvaluateSettings, grids: list[str] = ()) -> str:
    """A before/after table, one row per group and metric (written by hand: no tabulate dependency)."""
    table = _before_after(result.metrics)
    lines = [
        "# memprune evaluate",
        "",
        f"- Model: `{settings.model}`" + "".join(f"; {name}: `{folder}`" for name, folder in settings.edited_models().items()),
        f"- Similarity backend: {result.backend}",
        *threshold_lines(result, "- "),
        f"- Generation: {settings.generation.steps} steps, seeds {settings.generation.seed}.."
        f"{settings.generation.seed + settings.generation.seeds - 1}, guidance "
        f"{settings.generation.guidance_scale if settings.generation.guidance_scale is not None else 'pipeline default'}",
        "- diversity is a mean pairwise similarity between seeds: higher means less diverse.",
        *[f"- Note: {note}" for note in result.notes],
        "",
    ]
    models = list(table.columns)
    lines.append("| group | metric | " + " | ".join(models) + " |")
    lines.append("|---|---|" + "---:|" * len(models))
    for (group, metric), row in table.iterrows():
        lines.append(f"| {group} | {metric} | " + " | ".join(_format(row.get(m)) for m in models) + " |")
    if grids:
        lines += ["", "## Image grids", "", "Rows: prompts; columns: training image (where known), unedited model by seed, "
                  "each edited model by seed. The number under a generation is its copy similarity (* above the threshold).", ""]
        lines += [f"![{Path(g).stem}]({g})" for g in grids]
    return "\n".join(lines) + "\n"


def evaluate_to_folder(settings: EvaluateSettings, out, overwrite: bool = False, device: str = "auto", dtype=None,
                       progress: bool = True, log: Callable[[str], None] | None = None) -> str:
    """The `memprune evaluate` command as a function: metrics.csv, metrics.md, generations.csv, grids/, run.json."""
    from .plots import image_grid
    from .prune import PRUNE_INFO
    from .runinfo import atomic_output_dir, check_output_dir, write_run_json

    settings = settings.with_defaults()
    protected = [p for p in (settings.model, *settings.edited_models().values()) if p and Path(p).exists()]
    check_output_dir(out, overwrite, protected)
    result = evaluate(settings, device=device, dtype=dtype, progress=progress, log=log)
    with atomic_output_dir(out, overwrite, protected) as staging:
        result.metrics.to_csv(staging / "metrics.csv", index=False)
        result.generations.to_csv(staging / "generations.csv", index=False)
        grids = []
        if settings.grid_prompts:
            (staging / "grids").mkdir()
            seen = []
            for name, group in result.groups.items():
                pooled = len({source for source, _ in group.members}) > 1
                if pooled or group.members in seen:
                    continue
                seen.append(group.members)
                image_grid(result, name, settings.grid_prompts).save(staging / "grids" / f"{name}.png")
                grids.append(f"grids/{name}.png")
        if result.generations.copy_similarity.notna().any():
            from .plots import copy_similarity_ecdf, save_figure

            save_figure(copy_similarity_ecdf(result), staging / "copy_similarity_ecdf.png")
            grids.append("copy_similarity_ecdf.png")
        (staging / "metrics.md").write_text(metrics_markdown(result, settings, grids))
        inputs = {role: settings.prompt_file(role) for role in ("memorized", "reference", "control", "general")}
        inputs["exclude_prompts"] = settings.exclude_prompts
        inputs["sscd"] = settings.sscd
        for name, folder in settings.edited_models().items():
            inputs[f"{name}_memprune_json"] = str(Path(folder) / PRUNE_INFO)
        write_run_json(staging, settings, inputs, result.timings, similarity_backend=result.backend,
                       copy_threshold=result.threshold_info, notes=result.notes, random_controls=result.random_controls,
                       groups={name: len(group.members) for name, group in result.groups.items()})
    lines = [f"Similarity backend: {result.backend}", *threshold_lines(result)]
    lines += [f"Note: {note}" for note in result.notes]
    lines.append(_summary_table(result))
    lines.append(f"Metrics: {Path(out) / 'metrics.csv'} and {Path(out) / 'metrics.md'}")
    return "\n".join(lines)


def _summary_table(result: EvaluationResult) -> str:
    key = ["memorization_rate", "copy_similarity", "similarity_to_unedited", "diversity", "attribute_accuracy",
           "detection_auc", "seconds_per_image"]
    table = result.metrics[result.metrics.metric.isin(key)]
    if table.empty:
        return ""
    return _before_after(table).round(4).to_string()


def _before_after(metrics: pd.DataFrame) -> pd.DataFrame:
    """Rows (group, metric) in GROUPS and METRICS order, one column per model (unedited first)."""
    table = metrics.pivot_table(index=["group", "metric"], columns="model", values="value", sort=False)
    order = sorted(table.index, key=lambda key: (GROUPS.index(key[0]), METRICS.index(key[1])))
    return table.loc[order, list(dict.fromkeys(metrics.model))]
