"""`memprune benchmark`'s click declaration (kept apart from cli.py, which holds the other commands', to keep both
short); main adds it with add_command. The arms are built through the root command, found from the click context."""
from __future__ import annotations

import click

from .cli_common import (
    RegistryEpilogCommand,
    device_option,
    dtype_option,
    fixed_threshold_option,
    model_option,
    out_option,
    overwrite_option,
    processes_option,
)
from .cli_types import FINITE_FLOAT


@click.command(cls=RegistryEpilogCommand)
@model_option
@click.option("--arms", "arms_file", default=None, type=click.Path(dir_okay=False),
              help="Arms file (TOML): one [arms.NAME] table per arm, method = \"NAME\" and that method's options as "
                   "the command line names them (ratio = 0.1, timesteps = 10); control = false: no random control; "
                   "masks_from = \"ARM\" (robust-wanda) / from = \"ARM\" (fine-tunes): start from an arm above.")
@click.option("--preset", type=click.Choice(["testbed", "field"]), default=None,
              help="A shipped arms file instead of --arms (testbed: the methods comparison of the embedded testbed; "
                   "field: the papers' edits at their authors' settings, for a real Stable Diffusion model).")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="Sampling steps of evaluate and attack.")
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(min=1), help="Evaluate seeds per prompt.")
@click.option("--memorized", default=None, type=click.Path(),
              help="Memorized prompts of evaluate, attack and every arm that takes --memorized (testbed default).")
@click.option("--reference", default=None, type=click.Path(), help="evaluate's non-memorized prompts.")
@click.option("--exclude-prompts", default=None, type=click.Path(),
              help="Held-out group: prompts not in this file (default: prompts_used.csv of the first located arm).")
@click.option("--attack/--no-attack", default=True, show_default=True, help="Run the attack stage.")
@click.option("--attack-prompts", default=None, type=click.IntRange(min=1), help="Attack the first N prompts only.")
@click.option("--threshold", type=FINITE_FLOAT, default=None,
              help="The attack's copy threshold (default: evaluate's calibrated one).")
@fixed_threshold_option
@click.option("--similarity", type=click.Choice(["ssim", "l2"]), default=None, help="Built-in similarity backend.")
@click.option("--sscd", default=None, type=click.Path(), help="SSCD model file of evaluate and attack.")
@click.option("--control-seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the random controls.")
@click.option("--evaluate-option", multiple=True,
              help="More options for evaluate, as typed (repeatable), e.g. --evaluate-option '--clip-model DIR'.")
@click.option("--attack-option", multiple=True, help="More options for attack, as typed (repeatable).")
@click.option("--per-model", is_flag=True,
              help="One evaluate and one attack per model (a resume keeps each finished one; the unedited model is "
                   "generated once per model) instead of one over all.")
@click.option("--resume", is_flag=True, help="Continue the benchmark in OUT: finished models and stages are kept.")
@processes_option("benchmark", "the generations of evaluate and attack (their --processes)")
@device_option
@dtype_option
@out_option
@overwrite_option
def benchmark(model, arms_file, preset, steps, seeds, memorized, reference, exclude_prompts, attack, attack_prompts,
              threshold, fixed_threshold, similarity, sscd, control_seed, evaluate_option, attack_option, per_model,
              resume, processes, device, dtype, out, overwrite):
    """Build every arm of an arms file (each weight edit beside its random control), evaluate and attack them all
    with the same seeds, and write comparison.csv, comparison.md and comparison.png into OUT."""
    options = dict(locals())
    from .commands import benchmark as command

    root = click.get_current_context().find_root().command
    assert isinstance(root, click.Group)  # benchmark is only ever added to the memprune group
    click.echo(command.run(options, cli=root, echo=click.echo))
