"""Run a benchmark: build every arm (and its random control), one evaluate over all, one attack over all, one table.

Each arm is built by invoking memprune's own commands in this process (`runner`, handed in by the command layer:
the click group called with an argv), so an arm's options go through the same parsing, checks and defaults as
when a user types them, and an option the commands gain works here unchanged. In-process, not subprocesses: no
second import of torch and diffusers per command (seconds each on a small machine, most of a tiny test) and a
failing command's one-sentence error comes back as a MemPruneError naming the arm. With `processes` > 1 evaluate
and attack get --processes and start their own local processes (memprune.work_split): the same scores, sooner.

Random controls are built here with memprune.control.random_control_of (the control `memprune evaluate` builds
in memory: as many random non-zero weights per denoiser tensor as the edit zeroes, seeded per tensor) and saved as
models of their own, so the attack scores them too; evaluate therefore runs with --no-random-control.

Arms are built in file order, so an arm built from another (masks_from: the source's DIR/masks/NAME as its prune's
--masks; from: the source's DIR/models/NAME as its finetune's --from) finds its source built.

Resuming works at the granularity of models and scoring runs: a model in the state with a complete folder is not
rebuilt (unless what it is built from, its source arm or, for a control, its arm, was rebuilt by this run), a
finished evaluate or attack run is not rerun; a run killed midway is rerun whole (evaluate and attack
write their folders atomically at the end and have no resume of their own). By default one evaluate and one attack
score every model together (each model generated once; a kill loses the whole run). With `per_model` each model
gets its own evaluate (DIR/evaluate/NAME) and attack (DIR/attack/NAME), so a resume keeps every model's finished
scoring; the unedited model is then generated (and attacked) once per model, and its rows are taken from the
first run. Same seeds, same prompts and a threshold calibrated on the unedited model alone make the per-model
numbers those of the joint run (all but wall-clock timings).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd

from ..compare import comparison_markdown, comparison_metrics, comparison_table
from ..errors import MemPruneError
from .arms import Arm, CommandOptions, columns, labels
from .state import BenchmarkState

Runner = Callable[[list[str]], None]  # runs one memprune command line (argv without the program name)
Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchmarkSettings:
    """What evaluate and attack are asked (the same for every arm); recorded so that a resume can check them."""

    model: str
    steps: int = 50
    seeds: int = 4
    memorized: str | None = None  # evaluate --memorized, attack --prompts, and --memorized of arms that take it
    reference: str | None = None
    exclude_prompts: str | None = None  # default: prompts_used.csv of the first arm that located on a sample
    attack: bool = True
    attack_prompts: int | None = None
    threshold: float | None = None  # attack's copy threshold (default: evaluate's, --threshold-from)
    fixed_thresholds: tuple[float, ...] = ()
    similarity: str | None = None
    sscd: str | None = None
    control_seed: int = 0
    dtype: str = "float32"
    evaluate_args: tuple[str, ...] = ()  # more evaluate options, passed as they are
    attack_args: tuple[str, ...] = ()
    per_model: bool = False  # one evaluate and one attack per model instead of one over all

    def record(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def defaults(cls) -> dict:
        """Each setting's default, as record() writes it (a resumed older state lacks the newer settings)."""
        return {item.name: list(item.default) if isinstance(item.default, tuple) else item.default
                for item in fields(cls) if item.default is not MISSING}


@dataclass
class BenchmarkOutputs:
    folder: Path
    built: list[str] = field(default_factory=list)  # models built by this invocation
    skipped: list[str] = field(default_factory=list)  # models a resumed run found finished
    table: pd.DataFrame | None = None


def run_benchmark(arms: list[Arm], settings: BenchmarkSettings, state: BenchmarkState, runner: Runner,
                  commands: CommandOptions, device: str = "auto", log: Log = print,
                  processes: int = 1) -> BenchmarkOutputs:
    """Build the arms, score them with evaluate and attack (each over `processes` local processes), write the table."""
    outputs = BenchmarkOutputs(state.folder)
    models = [arm for arm in arms if arm.builds_model]
    for number, arm in enumerate(models, 1):
        # (column, how it is built, the column it is built from: an arm's source arm, a control's arm)
        for column, build, source in (
                (arm.name, lambda a=arm: build_arm(a, settings, state, runner, commands, device), arm.source),
                (arm.control, lambda a=arm: build_control(a, settings, state, device), arm.name)):
            if column is None:
                continue
            rebuilt_source = source in outputs.built  # built from what this run (re)built: kept would be stale
            if state.is_built(column) and not rebuilt_source:
                outputs.skipped.append(column)
                log(f"[{number}/{len(models)}] {column}: built before, kept.")
                continue
            why = f" (built from {source}, which was rebuilt)" if rebuilt_source and state.is_built(column) else ""
            log(f"[{number}/{len(models)}] building {column}{why} ...")
            state.forget_stages(column)
            tic = time.perf_counter()
            build()
            state.mark_built(column, time.perf_counter() - tic)
            outputs.built.append(column)
    model_columns = [column for column in columns(arms) if column in state.built]
    exclude = settings.exclude_prompts or held_out_source(state.folder, models)
    for scoring in scoring_runs(arms, model_columns, settings, state, exclude, device, processes):
        if scoring.stage in state.stages:
            log(f"{scoring.stage}: done before, kept.")
            continue
        log(f"{scoring.stage}: scoring the unedited model and {len(scoring.models)} more ...")
        run_command(runner, scoring.argv, f"the {scoring.stage} stage")
        state.mark_stage(scoring.stage)
    outputs.table = write_comparison(arms, settings, state, model_columns, exclude)
    return outputs


@dataclass(frozen=True)
class Scoring:
    """One evaluate or attack run: its state key ("evaluate", or "evaluate:NAME" per model), folder and argv."""

    stage: str
    folder: Path
    models: list[str]  # the model columns it scores besides the unedited one
    argv: list[str]

    @property
    def verb(self) -> str:
        return self.stage.split(":")[0]


def scoring_runs(arms: list[Arm], model_columns: list[str], settings: BenchmarkSettings, state: BenchmarkState,
                 exclude: str | None, device: str, processes: int = 1) -> list[Scoring]:
    """The evaluate run(s), then the attack run(s): one of each over all models, or one of each per model; each
    over `processes` local processes (their --processes: the same results, sooner)."""
    mitigations = [arm for arm in arms if arm.kind == "mitigation"]
    if not settings.per_model:
        groups = [("", model_columns, mitigations)]
    else:
        groups = [(f":{column}", [column], []) for column in model_columns]
        groups += [(f":{arm.name}", [], [arm]) for arm in mitigations]
    runs = []
    for suffix, models, mitigated in groups:
        folder = state.folder / "evaluate" / suffix[1:]
        runs.append(Scoring(f"evaluate{suffix}", folder, models,
                            evaluate_argv(mitigated, models, settings, state, exclude, device, folder, processes)))
    for suffix, models, _ in groups if settings.attack else []:
        if suffix and not models:
            continue  # an attack on a generation-time mitigation is not defined
        evaluation = state.folder / "evaluate" / suffix[1:]
        folder = state.folder / "attack" / suffix[1:]
        runs.append(Scoring(f"attack{suffix}", folder, models,
                            attack_argv(models, settings, state, exclude, device, folder, evaluation, processes)))
    return runs


def run_command(runner: Runner, argv: list[str], what: str) -> None:
    try:
        runner(argv)
    except MemPruneError as exc:
        raise MemPruneError(f"{what[0].upper()}{what[1:]} failed (memprune {argv[0]}): {exc}") from None


def build_arm(arm: Arm, settings: BenchmarkSettings, state: BenchmarkState, runner: Runner,
              commands: CommandOptions, device: str) -> None:
    """The arm's commands into DIR/masks/NAME (its selection, when it has one) and DIR/models/NAME."""
    masks, model = state.folder / "masks" / arm.name, state.model_folder(arm.name)
    common = ["--model", settings.model, "--device", device]

    def options(verb: str) -> list[str]:
        shared = []  # the benchmark's memorized prompts, where the arm's command takes them and the arm gives none
        if settings.memorized and "--memorized" in commands[verb] and "--memorized" not in arm.options.get(verb, {}):
            shared = ["--memorized", settings.memorized]
        return [*shared, *arm.argv(verb)]

    what = f"arm '{arm.name}'"
    source = []  # the arm it is built from: its located masks (masks_from) or its edited model (from)
    if arm.masks_from:
        source = ["--masks", str(state.folder / "masks" / arm.masks_from)]
    elif arm.from_arm:
        source = ["--from", str(state.model_folder(arm.from_arm))]
    if arm.stage == "locate":
        run_command(runner, ["locate", "--method", arm.method, *common, *options("locate"), "--out", str(masks),
                             "--overwrite"], what)
        # the prune after a locate applies its masks: the memorized prompts are for prune's own selections
        run_command(runner, ["prune", *common, "--masks", str(masks), *arm.argv("prune"), "--out", str(model),
                             "--overwrite"], what)
    elif arm.stage == "prune":
        run_command(runner, ["prune", "--method", arm.method, *common, *options("prune"), *source, "--masks-out",
                             str(masks), "--out", str(model), "--overwrite"], what)
    else:
        run_command(runner, ["finetune", "--method", arm.method, *common, *options("finetune"), *source, "--out",
                             str(model), "--overwrite"], what)


def build_control(arm: Arm, settings: BenchmarkSettings, state: BenchmarkState, device: str) -> None:
    """The arm's random control: the unedited model with as many random weights zeroed per tensor as the arm's."""
    import torch

    from ..control import random_control_of
    from ..models import load_pipeline, resolve_device
    from ..prune import save_pruned
    from ..runinfo import atomic_output_dir

    assert arm.control is not None
    target = resolve_device(device)
    base = load_pipeline(settings.model, target)
    edited = load_pipeline(str(state.model_folder(arm.name)), target)
    control, counts = random_control_of(base, edited, settings.control_seed)
    if control is None:
        raise MemPruneError(f"Arm '{arm.name}' zeroes no weight of the model, so it has no random control: set "
                            "control = false for it.")
    del base, edited
    info = {"source": str(settings.model), "method": "random", "random_control_of": arm.name,
            "seed": settings.control_seed, "zeroed_weights": counts, "total_zeroed": sum(counts.values())}
    with atomic_output_dir(state.model_folder(arm.control), overwrite=True, protected=[settings.model]) as staging:
        save_pruned(control.to(torch.device("cpu")), staging, info)


def held_out_source(folder: Path, arms: Sequence[Arm]) -> str | None:
    """prompts_used.csv of the first arm that wrote one: the memorized prompts not in it are the held-out group."""
    for arm in arms:
        used = folder / "masks" / arm.name / "prompts_used.csv"
        if used.is_file():
            return str(used)
    return None


def _processes(processes: int) -> list[str]:
    return ["--processes", str(processes)] if processes > 1 else []


def _shared_metric_options(settings: BenchmarkSettings) -> list[str]:
    shared = [arg for value in settings.fixed_thresholds for arg in ("--fixed-threshold", str(value))]
    if settings.sscd:
        shared += ["--sscd", settings.sscd]
    if settings.similarity:
        shared += ["--similarity", settings.similarity]
    return shared


def evaluate_argv(arms: list[Arm], model_columns: list[str], settings: BenchmarkSettings, state: BenchmarkState,
                  exclude: str | None, device: str, out: Path, processes: int = 1) -> list[str]:
    argv = ["evaluate", "--model", settings.model, "--no-random-control", "--steps", str(settings.steps),
            "--seeds", str(settings.seeds), "--device", device, *_processes(processes), "--dtype", settings.dtype]
    argv += [arg for column in model_columns for arg in ("--compare", str(state.model_folder(column)))]
    for arm in arms:
        if arm.kind == "mitigation":
            argv += ["--mitigation", arm.method, *arm.argv("evaluate")]
    for option, value in (("--memorized", settings.memorized), ("--reference", settings.reference),
                          ("--exclude-prompts", exclude)):
        argv += [option, value] if value else []
    return [*argv, *_shared_metric_options(settings), *settings.evaluate_args, "--out", str(out), "--overwrite"]


def attack_argv(model_columns: list[str], settings: BenchmarkSettings, state: BenchmarkState, exclude: str | None,
                device: str, out: Path, evaluation: Path, processes: int = 1) -> list[str]:
    argv = ["attack", "--model", settings.model, "--steps", str(settings.steps), "--device", device,
            *_processes(processes), "--dtype", settings.dtype]
    argv += [arg for column in model_columns for arg in ("--edited", str(state.model_folder(column)))]
    # evaluate's copy threshold (same backend) unless one is given: attacked and unattacked rates share it
    argv += ["--threshold", str(settings.threshold)] if settings.threshold is not None else \
        ["--threshold-from", str(evaluation)]
    for option, value in (("--prompts", settings.memorized), ("--exclude-prompts", exclude),
                          ("--num-prompts", settings.attack_prompts)):
        argv += [option, str(value)] if value else []
    return [*argv, *_shared_metric_options(settings), *settings.attack_args, "--out", str(out), "--overwrite"]


def _read_runs(runs: list[Scoring], renames: dict[str, str]) -> pd.DataFrame | None:
    """The metrics of finished runs of one verb, each model named by its arm; the unedited rows of the first run."""
    frames: list[pd.DataFrame] = []
    for scoring in runs:
        frame = pd.read_csv(scoring.folder / "metrics.csv")
        named = {**renames, **({"edited": scoring.models[0]} if len(scoring.models) == 1 else {})}  # attack's lone one
        frame["model"] = frame.model.replace(named)
        frames.append(frame if not frames else frame[frame.model != "unedited"])
    return pd.concat(frames, ignore_index=True) if frames else None


def joined_metrics(arms: list[Arm], settings: BenchmarkSettings, state: BenchmarkState, model_columns: list[str],
                   exclude: str | None = None, device: str = "auto") -> pd.DataFrame:
    """evaluate's and the attack's metrics with every model named by its arm, and each model's building seconds."""
    runs = [scoring for scoring in scoring_runs(arms, model_columns, settings, state, exclude, device)
            if scoring.stage in state.stages]
    renames = {arm.method: arm.name for arm in arms if arm.kind == "mitigation"}  # evaluate names it by method
    evaluation = _read_runs([scoring for scoring in runs if scoring.verb == "evaluate"], renames)
    if evaluation is None:
        raise MemPruneError(f"No finished evaluation in '{state.folder}': nothing to join.")
    attack = _read_runs([scoring for scoring in runs if scoring.verb == "attack"], {})
    seconds = {"unedited": 0.0, **{column: state.built[column] for column in model_columns}}
    seconds.update({arm.name: 0.0 for arm in arms if arm.kind == "mitigation"})  # its cost is per image
    return comparison_metrics(evaluation, attack, seconds)


def write_comparison(arms: list[Arm], settings: BenchmarkSettings, state: BenchmarkState, model_columns: list[str],
                     exclude: str | None) -> pd.DataFrame:
    """DIR/comparison.csv (tidy), comparison.md (one row per model) and comparison.png."""
    from .plot import comparison_figure, save_figure

    metrics = joined_metrics(arms, settings, state, model_columns, exclude)
    metrics.to_csv(state.folder / "comparison.csv", index=False)
    names = labels(arms)
    order = ["unedited", *[column for column in columns(arms) if column in set(metrics.model)]]
    table = comparison_table(metrics, order, names)
    held_out = f"held-out prompts: those not in {Path(exclude).name} of {Path(exclude).parent.name}" if exclude \
        else "no located sample: every memorized prompt is scored"
    header = (f"`memprune benchmark` of `{settings.model}`: {len(arms)} arms, {len(model_columns)} models built; "
              f"{settings.steps} sampling steps, {settings.seeds} evaluate seeds; {held_out}; editing cost in seconds "
              f"of the commands that built each model.\n\n")
    (state.folder / "comparison.md").write_text(header + comparison_markdown(table))
    save_figure(comparison_figure(metrics, order, names), state.folder / "comparison.png")
    return table
