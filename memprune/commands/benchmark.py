"""`memprune benchmark`: resolve the arms file (--arms, --preset or, on --resume, the folder's copy), check it whole,
open (or resume) the benchmark folder, run memprune.benchmark with memprune's own commands as the runner, and
describe the run in OUT/run.json (the folder itself is not written atomically: it is what --resume continues).

The click group is handed in by memprune.cli (this layer never imports it): each arm's command line is run by it
in this process, and its commands' options are what an arms file may set.
"""
from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..benchmark.arms import CommandOptions, parse_arms
from ..benchmark.run import BenchmarkSettings, run_benchmark
from ..benchmark.state import ARMS_FILE, open_folder
from ..errors import MemPruneError
from . import defaults
from .output import protected_sources, write_run_json

BUILD_COMMANDS = ("locate", "prune", "finetune", "evaluate", "attack")


def command_options(cli: click.Group) -> CommandOptions:
    """verb -> {"--long-option": its click parameter} of the commands that build and score arms."""
    options: CommandOptions = {}
    for verb in BUILD_COMMANDS:
        command = cli.commands[verb]
        options[verb] = {opt: param for param in command.params for opt in param.opts if opt.startswith("--")}
        for param in command.params:  # --x/--no-x: the secondary switch names the same parameter
            options[verb].update({opt: param for opt in getattr(param, "secondary_opts", ()) if opt.startswith("--")})
    return options


def arms_text(options: dict[str, Any]) -> tuple[str, str]:
    """The arms file's text and its name for messages: --arms FILE, --preset NAME, or the copy a resumed run has."""
    arms_file, preset, out = options["arms_file"], options["preset"], Path(options["out"])
    if arms_file and preset:
        raise MemPruneError("Give --arms FILE or --preset NAME, not both.")
    if preset:
        return defaults.benchmark_preset(preset)
    if arms_file:
        path = Path(arms_file)
        if not path.is_file():
            raise MemPruneError(f"Arms file '{arms_file}' does not exist.")
        return path.read_text(), str(path)
    if options["resume"] and (out / ARMS_FILE).is_file():
        return (out / ARMS_FILE).read_text(), str(out / ARMS_FILE)
    raise MemPruneError("Give the arms: --arms FILE (TOML, [arms.NAME] tables) or --preset testbed.")


def invoker(cli: click.Group) -> Callable[[list[str]], None]:
    """Run `memprune ARGV` in this process; a refusal comes back as a MemPruneError with its one sentence."""
    def invoke(argv: list[str]) -> None:
        try:
            cli.main(args=argv, prog_name="memprune", standalone_mode=False)
        except click.ClickException as exc:
            raise MemPruneError(exc.format_message()) from None
    return invoke


def run(options: dict[str, Any], cli: click.Group, echo: Callable[[str], Any] = print) -> str:
    model = defaults.model_or_default(options["model"])
    text, source = arms_text(options)
    if options["preset"] == "testbed" and not defaults.is_testbed(model):
        raise MemPruneError(f"--preset testbed builds the testbed's arms on its captions; '{model}' is not a memprune "
                            "testbed: write an arms file for it and pass --arms.")
    if options["resume"] and options["overwrite"]:
        raise MemPruneError("Give --resume (continue) or --overwrite (start again), not both.")
    commands = command_options(cli)
    arms = parse_arms(text, commands, source)  # the whole file is checked before any model loads
    settings = BenchmarkSettings(
        model=model, steps=options["steps"], seeds=options["seeds"], memorized=options["memorized"],
        reference=options["reference"], exclude_prompts=options["exclude_prompts"], attack=options["attack"],
        attack_prompts=options["attack_prompts"], threshold=options["threshold"],
        fixed_thresholds=tuple(options["fixed_threshold"]), similarity=options["similarity"], sscd=options["sscd"],
        control_seed=options["control_seed"], dtype=options["dtype"],
        evaluate_args=tuple(arg for given in options["evaluate_option"] for arg in shlex.split(given)),
        attack_args=tuple(arg for given in options["attack_option"] for arg in shlex.split(given)),
        per_model=options["per_model"])
    # the arms file is read before anything is written, so it may be the copy in OUT that a resume re-reads
    protected = protected_sources(model, settings.memorized, settings.reference)
    state = open_folder(options["out"], arms, text, settings.record(), options["resume"], options["overwrite"],
                        protected, BenchmarkSettings.defaults())
    outputs = run_benchmark(arms, settings, state, invoker(cli), commands, device=options["device"], log=echo,
                            processes=options["processes"])
    folder = Path(options["out"])
    write_run_json(folder, settings, {"arms": folder / ARMS_FILE, "memorized": settings.memorized,
                                      "reference": settings.reference, "sscd": settings.sscd},
                   {f"build_{column}": seconds for column, seconds in state.built.items()},
                   arms={arm.name: arm.fingerprint() for arm in arms}, built_now=outputs.built,
                   kept=outputs.skipped, scored=state.stages)
    kept = f"; kept {len(outputs.skipped)} finished before" if outputs.skipped else ""
    return (f"Built {len(outputs.built)} models{kept}.\n{(folder / 'comparison.md').read_text()}"
            f"Table: {folder / 'comparison.csv'} and {folder / 'comparison.md'}; plot: {folder / 'comparison.png'}")
