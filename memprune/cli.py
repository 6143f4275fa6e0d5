"""memprune command line: thin wiring of files to the library (see DESIGN.md §3)."""
from __future__ import annotations


import click

from .cli_common import (FriendlyGroup, default_testbed_file, device_option, dtype_option, model_option, out_option,
                         overwrite_option, torch_dtype)
from .errors import MemPruneError
from .generate import GenerationSettings
from .methods.wanda import GRANULARITIES, NEURON_SCORES, SelectionSettings
from .models import DEFAULT_MODEL, testbed_captions


@click.group(cls=FriendlyGroup)
@click.version_option(package_name="memprune")
def main():
    """Locate and delete the neurons of a diffusion model that carry memorized training images."""


@main.command()
@model_option
@click.option("--memorized", default=None, type=click.Path(), help="Memorized prompts (.txt/.csv/.jsonl).")
@click.option("--label", "memorized_label", default=None, help="Keep only memorized prompts with this label (e.g. VM).")
@click.option("--reference", default="empty", show_default=True, help="'empty' (the empty prompt) or a file of non-memorized prompts.")
@click.option("--steps", default=50, show_default=True, help="Sampling steps per generation.")
@click.option("--seeds", default=1, show_default=True, help="Generations per prompt.")
@click.option("--seed", default=0, show_default=True, help="First seed.")
@click.option("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's).")
@click.option("--batch-size", default=8, show_default=True, help="Prompts per pipeline call.")
@click.option("--ratio", default=0.01, show_default=True, help="Share k/H of columns kept per output row (0, 1].")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="weight", show_default=True)
@click.option("--neuron-score", type=click.Choice(NEURON_SCORES), default="zscore", show_default=True)
@click.option("--half", type=click.Choice(["both", "cond", "uncond"]), default="both", show_default=True, help="CFG half to record.")
@click.option("--num-prompts", type=int, default=None, help="Locate on a seeded sample of this many memorized prompts.")
@click.option("--sample-seed", default=0, show_default=True, help="Seed of --num-prompts and of the subsets.")
@click.option("--subsets", default=0, show_default=True, help="N seeded subsets for the overlap analysis (0: none).")
@click.option("--subset-size", default=10, show_default=True, help="Prompts per subset (m).")
@click.option("--control", default=None, type=click.Path(), help="Non-memorized prompts for the overlap controls.")
@click.option("--height", type=int, default=None, help="Image height in pixels (default: the pipeline's).")
@click.option("--width", type=int, default=None, help="Image width in pixels (default: the pipeline's).")
@click.option("--processes", default=1, show_default=True,
              help="Split the generations over N local processes (gloo on CPU, one GPU each on CUDA); "
                   "or start it with `accelerate launch -m memprune locate ...`.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from the partial statistics in OUT.partial.")
@click.option("--checkpoint-every", default=60.0, show_default=True,
              help="Seconds between saves of the partial statistics (OUT.partial) that --resume continues from.")
@device_option
@dtype_option
@out_option
@overwrite_option
def locate(model, memorized, memorized_label, reference, steps, seeds, seed, guidance_scale, batch_size, ratio, granularity,
           neuron_score, half, num_prompts, sample_seed, subsets, subset_size, control, height, width, processes, resume,
           checkpoint_every, device, dtype, out, overwrite):
    """Record FFN activations of memorized vs reference prompts and select the memorization weights."""
    from .distributed import naming_this_rank
    from .locate import LocateSettings, locate_to_folder

    memorized = default_testbed_file(model, memorized, "memorized.csv", "--memorized")
    if subsets and control is None and testbed_captions(model) is not None:
        control = str(testbed_captions(model) / "non_memorized_same_style.csv")
    settings = LocateSettings(
        model=model or DEFAULT_MODEL,
        memorized=memorized,
        memorized_label=memorized_label,
        reference=reference,
        generation=GenerationSettings(steps=steps, seeds=seeds, seed=seed, guidance_scale=guidance_scale, batch_size=batch_size,
                                      height=height, width=width),
        selection=SelectionSettings(ratio=ratio, granularity=granularity, neuron_score=neuron_score),
        half=half,
        num_prompts=num_prompts,
        sample_seed=sample_seed,
        subsets=subsets,
        subset_size=subset_size,
        control=control,
    )
    with naming_this_rank():
        summary = locate_to_folder(settings, out, overwrite=overwrite, device=device, dtype=torch_dtype(dtype),
                                   processes=processes, resume=resume, checkpoint_seconds=checkpoint_every)
    if summary:  # empty on the other processes of a launcher
        click.echo(summary)


@main.command()
@model_option
@click.option("--method", type=click.Choice(["wanda", "uniforget"]), default="wanda", show_default=True,
              help="wanda: apply --masks from `memprune locate`; uniforget: train gates on neutral prompts first "
                   "(united with --masks when given).")
@click.option("--masks", "masks_folder", default=None, type=click.Path(), help="Output folder of `memprune locate`.")
@click.option("--timesteps", default=10, show_default=True, help="τ: prune the union of the masks of steps 0..τ-1.")
@click.option("--neutral", default=None, type=click.Path(), help="uniforget: neutral prompts (testbed default: general_train.csv, not the held-out captions evaluate scores).")
@click.option("--beta", default=1.0, show_default=True, help="uniforget: weight of the expected-L0 penalty.")
@click.option("--train-steps", default=100, show_default=True, help="uniforget: gate optimisation steps.")
@click.option("--lr", default=0.5, show_default=True, help="uniforget: Adam learning rate on the gates' log-alpha.")
@click.option("--sampling-steps", default=10, show_default=True,
              help="uniforget: DDIM steps of the trajectory whose final latents are matched.")
@click.option("--masks-out", default=None, type=click.Path(file_okay=False),
              help="uniforget: where the trained masks go (default: OUT-uniforget-masks).")
@device_option
@out_option
@overwrite_option
def prune(model, method, masks_folder, timesteps, neutral, beta, train_steps, lr, sampling_steps, masks_out, device, out,
          overwrite):
    """Zero the located weights and save an edited pipeline that stock diffusers loads."""
    from .prune import prune_to_folder

    model = model or DEFAULT_MODEL
    if method == "uniforget":
        from .runinfo import check_output_dir
        from .methods.uniforget import UniForgetSettings, uniforget_to_folder

        masks_out = masks_out or f"{str(out).rstrip('/')}-uniforget-masks"
        check_output_dir(out, overwrite)  # fail before minutes of training, not after
        settings = UniForgetSettings(beta=beta, train_steps=train_steps, lr=lr, sampling_steps=sampling_steps,
                                     steps=max(timesteps, 1))
        click.echo(uniforget_to_folder(model, neutral, masks_out, settings, wanda_masks=masks_folder,
                                       overwrite=overwrite, device=device))
        masks_folder = masks_out
    elif masks_folder is None:
        raise MemPruneError("--masks is required with --method wanda: give the output folder of `memprune locate`.")
    click.echo(prune_to_folder(model, masks_folder, out, timesteps=timesteps, overwrite=overwrite, device=device))


@main.command()
@model_option
@click.option("--edited", default=None, type=click.Path(), help="Edited pipeline folder (e.g. the output of `memprune prune`).")
@click.option("--compare", multiple=True, type=click.Path(),
              help="Another edited pipeline folder to evaluate side by side (repeatable; columns are named by folder).")
@click.option("--memorized", default=None, type=click.Path(), help="Memorized prompts (testbed default: its memorized.csv).")
@click.option("--reference", default=None, type=click.Path(),
              help="Non-memorized prompts (required off the testbed; testbed default: its control and general captions).")
@click.option("--control", default=None, help="Same-style non-memorized prompts, or 'none' (testbed default: its same-style file).")
@click.option("--general", default=None, help="General captions with attribute columns, or 'none' (testbed default: held-out).")
@click.option("--exclude-prompts", default=None, type=click.Path(),
              help="prompts_used.csv of locate: memorized prompts not in it form the memorized_held_out group.")
@click.option("--seeds", default=4, show_default=True, help="Generations per prompt.")
@click.option("--seed", default=0, show_default=True, help="First seed.")
@click.option("--steps", default=50, show_default=True, help="Sampling steps per generation.")
@click.option("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's).")
@click.option("--batch-size", default=8, show_default=True, help="Prompts per pipeline call.")
@click.option("--similarity", type=click.Choice(["ssim", "l2"]), default="ssim", show_default=True,
              help="Built-in similarity backend (used when no --sscd is given).")
@click.option("--sscd", default=None, type=click.Path(), help="SSCD model file (TorchScript, or .onnx with onnxruntime).")
@click.option("--threshold-percentile", default=95.0, show_default=True,
              help="Copy threshold: this percentile of non-memorized similarities.")
@click.option("--grid-prompts", default=8, show_default=True, help="Prompts (rows) per image grid; 0: no grids.")
@click.option("--attributes/--no-attributes", default=True, show_default=True,
              help="attribute_accuracy on the general captions with the testbed's classifier.")
@device_option
@dtype_option
@out_option
@overwrite_option
def evaluate(model, edited, compare, memorized, reference, control, general, exclude_prompts, seeds, seed, steps, guidance_scale,
             batch_size, similarity, sscd, threshold_percentile, grid_prompts, attributes, device, dtype, out, overwrite):
    """Generate with fixed seeds from the unedited and edited model; write metrics.csv, metrics.md and image grids."""
    from .evaluate import EvaluateSettings, evaluate_to_folder

    settings = EvaluateSettings(
        model=model or DEFAULT_MODEL, edited=edited, compare=tuple(compare), memorized=memorized, reference=reference, control=control,
        general=general, exclude_prompts=exclude_prompts,
        generation=GenerationSettings(steps=steps, seeds=seeds, seed=seed, guidance_scale=guidance_scale, batch_size=batch_size),
        similarity=similarity, sscd=sscd, threshold_percentile=threshold_percentile, grid_prompts=grid_prompts, attributes=attributes,
    )
    click.echo(evaluate_to_folder(settings, out, overwrite=overwrite, device=device, dtype=torch_dtype(dtype), log=click.echo))


@main.command()
@model_option
@click.option("--prompts", required=True, type=click.Path(), help="Prompt file; a label column (type/label) gives ROC AUC.")
@click.option("--steps", default=50, show_default=True, help="Sampling steps per generation.")
@click.option("--seeds", default=1, show_default=True, help="Generations per prompt (scores are averaged).")
@click.option("--seed", default=0, show_default=True, help="First seed.")
@click.option("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's; must be > 1).")
@click.option("--batch-size", default=8, show_default=True, help="Prompts per pipeline call.")
@device_option
@dtype_option
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Scores FILE.csv (ROC summary: FILE.json beside it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing FILE.csv and FILE.json.")
def detect(model, prompts, steps, seeds, seed, guidance_scale, batch_size, device, dtype, out, overwrite):
    """Score prompts with Wen et al.'s text-conditional noise norm; ROC AUC and TPR at 1% FPR for labelled files."""
    from .detect import DetectSettings, detect_to_file

    settings = DetectSettings(
        model=model or DEFAULT_MODEL, prompts=prompts,
        generation=GenerationSettings(steps=steps, seeds=seeds, seed=seed, guidance_scale=guidance_scale, batch_size=batch_size),
    )
    click.echo(detect_to_file(settings, out, overwrite=overwrite, device=device, dtype=torch_dtype(dtype)))


def _register_optional_commands() -> None:
    """Commands of modules that may be absent in a partial install are added only when importable."""
    try:
        from .testbed.cli import testbed
    except ImportError:
        return
    main.add_command(testbed)


_register_optional_commands()
