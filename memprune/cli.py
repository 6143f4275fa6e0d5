"""memprune command line: click declarations only; each command body is one call into memprune.commands.<verb>."""
from __future__ import annotations

import click

from .cli_benchmark import benchmark
from .cli_common import (
    FriendlyGroup,
    MethodChoice,
    device_option,
    dtype_option,
    echo_summary,
    fixed_threshold_option,
    model_option,
    out_option,
    overwrite_option,
    processes_option,
    save_dtype_option,
    size_options,
    torch_dtype,
)
from .cli_types import FINITE_FLOAT, FiniteFloatRange
from .generate import GenerationSettings
from .methods.wanda import GRANULARITIES, NEURON_SCORES
from .models import DEFAULT_MODEL


@click.group(cls=FriendlyGroup)
@click.version_option(package_name="memprune")
def main():
    """Locate and delete the neurons of a diffusion model that carry memorized training images."""


@main.command()
@model_option
@click.option("--method", type=MethodChoice("weight_edit", "locate"), default="wanda", show_default=True,
              help="A registered weight edit; wanda: Chavhan et al.'s FFN weight selection; nemo: Hintersdorf et al.'s "
                   "cross-attention value neurons.")
@click.option("--memorized", default=None, type=click.Path(), help="Memorized prompts (.txt/.csv/.jsonl).")
@click.option("--label", "memorized_label", default=None, help="Keep only memorized prompts with this label (e.g. VM).")
@click.option("--reference", default=None,
              help="'empty' (the empty prompt) or a file of non-memorized prompts [wanda default: empty; nemo needs a "
                   "file, testbed default: its general_train.csv].")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="Sampling steps per generation. Masks are kept per denoiser call, which most schedulers make once "
                   "per step; PNDM (SD 1.5's default) makes steps + 1 (masks.json and the summary say how many).")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Generations per prompt [wanda: 1; nemo: 10, its criterion's seeds].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="First seed.")
@click.option("--guidance-scale", type=FiniteFloatRange(min=0), default=None,
              help="CFG scale (default: the pipeline's; nemo: 1, no guidance, for its criterion and threshold alike).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Prompts per pipeline call.")
@click.option("--ratio", default=None, type=FiniteFloatRange(0, 1, min_open=True),
              help="Share k/H of columns kept per output row, in (0, 1] [default: 0.01].")
@click.option("--k-per-row", type=click.IntRange(min=1), default=None,
              help="Columns kept per output row (the paper's units; instead of --ratio): k = ratio·H.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="weight", show_default=True)
@click.option("--neuron-score", type=click.Choice(NEURON_SCORES), default="zscore", show_default=True)
@click.option("--half", type=click.Choice(["both", "cond", "uncond"]), default="both", show_default=True,
              help="CFG half to record.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None,
              help="Locate on a seeded sample of this many memorized prompts.")
@click.option("--sample-seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of --num-prompts and of the subsets.")
@click.option("--subsets", default=0, show_default=True, type=click.IntRange(min=0),
              help="N seeded subsets for the overlap analysis (0: none).")
@click.option("--subset-size", default=10, show_default=True, type=click.IntRange(min=1),
              help="Prompts per subset (m).")
@click.option("--control", default=None, type=click.Path(), help="Non-memorized prompts for the overlap controls.")
@click.option("--theta", default=5.0, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="nemo: first z-score threshold θ of the search.")
@click.option("--min-theta", default=1.0, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="nemo: last θ tried.")
@click.option("--theta-step", default=0.25, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="nemo: θ decrease per try.")
@click.option("--ssim-threshold", type=FiniteFloatRange(-1, 1), default=None,
              help="nemo: memorization SSIM threshold (default: mean + 1 std of non-memorized pairwise SSIM).")
@click.option("--nemo-layers", type=click.Choice(["down_mid", "all"]), default="down_mid", show_default=True,
              help="nemo: value layers of the down and mid blocks (their code) or all cross-attentions.")
@click.option("--nemo-unbroken", type=click.Choice(["refine", "skip"]), default="refine", show_default=True,
              help="nemo: a prompt whose memorization θ_min does not break: refine its candidates anyway (their code) "
                   "or select nothing.")
@click.option("--height", type=click.IntRange(min=1), default=None,
              help="Image height in pixels (default: the pipeline's).")
@click.option("--width", type=click.IntRange(min=1), default=None,
              help="Image width in pixels (default: the pipeline's).")
@processes_option("locate")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from the partial statistics in OUT.partial.")
@click.option("--checkpoint-every", default=60.0, show_default=True, type=FiniteFloatRange(min=0),
              help="Seconds between saves of the partial statistics (OUT.partial) that --resume continues from.")
@device_option
@dtype_option
@out_option
@overwrite_option
def locate(model, method, memorized, memorized_label, reference, steps, seeds, seed, guidance_scale, batch_size, ratio,
           k_per_row, granularity, neuron_score, half, num_prompts, sample_seed, subsets, subset_size, control, theta,
           min_theta, theta_step, ssim_threshold, nemo_layers, nemo_unbroken, height, width, processes, resume,
           checkpoint_every, device, dtype, out, overwrite):
    """Record activations of memorized vs reference prompts and select the memorization weights (Wanda) or
    neurons (NeMo)."""
    options = {**locals(), "dtype": torch_dtype(dtype)}  # before the imports below add names to locals()
    from .commands import locate as command

    echo_summary(command.run, options)  # prints nothing on the other processes of a launcher


@main.command()
@model_option
@click.option("--method", type=MethodChoice("weight_edit"), default="wanda", show_default=True,
              help="A registered weight edit; wanda (or another method `memprune locate` ran): apply --masks from "
                   "`memprune locate`; uniforget: train gates on neutral prompts first (united with --masks when "
                   "given).")
@click.option("--masks", "masks_folder", default=None, type=click.Path(), help="Output folder of `memprune locate`.")
@click.option("--timesteps", default=10, show_default=True, type=click.IntRange(min=1),
              help="τ: prune the union of the masks of steps (denoiser calls) 0..τ-1.")
@click.option("--neutral", default=None, type=click.Path(),
              help="uniforget: neutral prompts (testbed default: general_train.csv, not the held-out captions evaluate "
                   "scores).")
@click.option("--beta", default=1.0, show_default=True, type=FiniteFloatRange(min=0),
              help="uniforget: weight of the sparsity penalty.")
@click.option("--gates", type=click.Choice(["sigmoid", "hard-concrete"]), default="sigmoid", show_default=True,
              help="uniforget: the paper's masks σ(0.4·M+1), or hard-concrete L0 gates on FeedForward neurons.")
@click.option("--mask-layers", type=click.Choice(["ffn+norm", "ffn", "norm"]), default=None,
              help="uniforget: masked layers [default: ffn+norm for sigmoid, ffn for hard-concrete].")
@click.option("--train-steps", default=100, show_default=True, type=click.IntRange(min=1),
              help="uniforget: gate optimisation steps.")
@click.option("--lr", default=0.5, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="uniforget: Adam learning rate on the gates' log-alpha.")
@click.option("--sampling-steps", default=10, show_default=True, type=click.IntRange(min=1),
              help="uniforget: DDIM steps of the trajectory whose final latents are matched.")
@click.option("--masks-out", default=None, type=click.Path(file_okay=False),
              help="uniforget: where the trained masks go (default: OUT-uniforget-masks).")
@click.option("--rounds", default=None, type=click.IntRange(min=1),
              help="robust-wanda: attack + re-locate rounds after the Wanda mask [default: 2].")
@click.option("--attack-steps", default=None, type=click.IntRange(min=0),
              help="robust-wanda: attack steps per located prompt and round [default: 50].")
@click.option("--memorized", default=None, type=click.Path(),
              help="robust-wanda: memorized prompts with an image column; uniforget: prompts the neutral ones must not "
                   "include (testbed default: its memorized.csv).")
@device_option
@save_dtype_option
@out_option
@overwrite_option
def prune(model, method, masks_folder, timesteps, neutral, beta, gates, mask_layers, train_steps, lr, sampling_steps,
          masks_out, rounds, attack_steps, memorized, device, dtype, out, overwrite):
    """Zero the located weights and save an edited pipeline that stock diffusers loads."""
    options = dict(locals())
    from .commands import prune as command

    command.run(options, echo=click.echo)


@main.command()
@model_option
@click.option("--edited", default=None, type=click.Path(),
              help="Edited pipeline folder (e.g. the output of `memprune prune`).")
@click.option("--compare", multiple=True, type=click.Path(),
              help="Another edited pipeline folder to evaluate side by side (repeatable; columns are named by folder).")
@click.option("--memorized", default=None, type=click.Path(),
              help="Memorized prompts (testbed default: its memorized.csv).")
@click.option("--reference", default=None, type=click.Path(),
              help="Non-memorized prompts (required off the testbed; testbed default: its control and general "
                   "captions).")
@click.option("--control", default=None,
              help="Same-style non-memorized prompts, or 'none' (testbed default: its same-style file).")
@click.option("--general", default=None,
              help="General captions with attribute columns, or 'none' (testbed default: held-out).")
@click.option("--exclude-prompts", default=None, type=click.Path(),
              help="prompts_used.csv of locate: memorized prompts not in it form the memorized_held_out group.")
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(min=1), help="Generations per prompt.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="First seed.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="Sampling steps per generation.")
@click.option("--guidance-scale", type=FiniteFloatRange(min=0), default=None,
              help="CFG scale (default: the pipeline's; nemo: 1, no guidance, for its criterion and threshold alike).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Prompts per pipeline call.")
@click.option("--similarity", type=click.Choice(["ssim", "l2"]), default="ssim", show_default=True,
              help="Built-in similarity backend (used when no --sscd is given).")
@click.option("--sscd", default=None, type=click.Path(),
              help="SSCD model file (TorchScript, or .onnx with onnxruntime).")
@click.option("--threshold-percentile", default=95.0, show_default=True, type=FiniteFloatRange(0, 100, min_open=True),
              help="Copy threshold: this percentile of non-memorized similarities.")
@click.option("--grid-prompts", default=8, show_default=True, type=click.IntRange(min=0),
              help="Prompts (rows) per image grid; 0: no grids.")
@click.option("--attributes/--no-attributes", default=True, show_default=True,
              help="attribute_accuracy on the general captions with the testbed's classifier.")
@click.option("--random-control/--no-random-control", default=True, show_default=True,
              help="Beside each edited model, a random edit zeroing as many weights per tensor (the control).")
@click.option("--random-control-seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the random control's choice of weights.")
@click.option("--mitigation", type=MethodChoice("mitigation"), default=None,
              help="Add a column: the unedited model with this generation-time mitigation (wen: Wen et al. 2024; "
                   "nemo_prompt: each prompt with its own NeMo neurons blocked), same seeds.")
@click.option("--wen-lr", default=0.05, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="wen: AdamW learning rate on the prompt embedding.")
@click.option("--wen-iterations", default=10, show_default=True, type=click.IntRange(min=1),
              help="wen: at most this many optimisation steps per embedding (per prompt, or per image).")
@click.option("--wen-target", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="wen: target first-step noise norm (default: median of the unedited model's non-memorized prompts).")
@click.option("--wen-mode", type=click.Choice(["prompt", "image"]), default="prompt", show_default=True,
              help="wen: one embedding per prompt, loss the joint norm of its seeds' images (theirs), or per image.")
@click.option("--nemo-neurons", default=None, type=click.Path(),
              help="nemo_prompt: the `memprune locate --method nemo` folder holding each prompt's neurons.")
@fixed_threshold_option
@click.option("--clip-model", default=None, help="CLIP score with this transformers CLIPModel folder (or hub id).")
@click.option("--fid-reference", default=None, type=click.Path(),
              help="FID/KID against this folder of images or .npz of mu/sigma (clean-fid/pytorch-fid statistics).")
@click.option("--fid-prompts", default=None, type=click.Path(), help="FID captions (default: the shipped 10,000 COCO).")
@click.option("--fid-count", default=None, type=click.IntRange(min=2), help="Use the first N FID captions.")
@click.option("--inception", default=None, type=click.Path(), help="FID Inception TorchScript file (clean-fid's).")
@processes_option("evaluate")
@size_options
@device_option
@dtype_option
@out_option
@overwrite_option
def evaluate(model, edited, compare, memorized, reference, control, general, exclude_prompts, seeds, seed, steps,
             guidance_scale, batch_size, similarity, sscd, threshold_percentile, grid_prompts, attributes,
             random_control, random_control_seed, mitigation, wen_lr, wen_iterations, wen_target, wen_mode,
             nemo_neurons, fixed_threshold, clip_model, fid_reference, fid_prompts, fid_count, inception, height, width,
             processes, device, dtype, out, overwrite):
    """Generate with fixed seeds from the unedited and edited model; write metrics.csv, metrics.md and image grids."""
    from .commands.evaluate import evaluate_to_folder
    from .evaluation.settings import EvaluateSettings

    settings = EvaluateSettings(
        model=model or DEFAULT_MODEL, edited=edited, compare=tuple(compare), memorized=memorized, reference=reference,
        control=control, general=general, exclude_prompts=exclude_prompts,
        generation=GenerationSettings(steps=steps, seeds=seeds, seed=seed, guidance_scale=guidance_scale,
                                      batch_size=batch_size, height=height, width=width),
        similarity=similarity, sscd=sscd, threshold_percentile=threshold_percentile, grid_prompts=grid_prompts,
        attributes=attributes,
        random_control=random_control, random_control_seed=random_control_seed,
        mitigation=mitigation, wen_lr=wen_lr, wen_iterations=wen_iterations, wen_target=wen_target,
        wen_mode=wen_mode, nemo_neurons=nemo_neurons,
        fixed_thresholds=fixed_threshold, clip_model=clip_model, fid_reference=fid_reference, fid_prompts=fid_prompts,
        fid_count=fid_count, inception=inception,
    )
    echo_summary(evaluate_to_folder, settings, out, overwrite=overwrite, device=device, dtype=torch_dtype(dtype),
                 log=click.echo, processes=processes)


@main.command()
@model_option
@click.option("--prompts", required=True, type=click.Path(),
              help="Prompt file; a label column (type/label) gives ROC AUC.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="Sampling steps per generation.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Generations per prompt (scores are averaged).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="First seed.")
@click.option("--guidance-scale", type=FiniteFloatRange(min=0), default=None,
              help="CFG scale (default: the pipeline's; must be > 1).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Prompts per pipeline call.")
@size_options
@device_option
@dtype_option
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Scores FILE.csv (ROC summary: FILE.json beside it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing FILE.csv and FILE.json.")
def detect(model, prompts, steps, seeds, seed, guidance_scale, batch_size, height, width, device, dtype, out,
           overwrite):
    """Score prompts with Wen et al.'s text-conditional noise norm; ROC AUC and TPR at 1% FPR for labelled files."""
    options = {**locals(), "dtype": torch_dtype(dtype)}
    from .commands import detect as command

    click.echo(command.run(options))


@main.command()
@model_option
@click.option("--method", type=MethodChoice("finetune"), default="gradproj", show_default=True,
              help="A registered finetune method; gradproj: project updates off the memorized captions' text subspace; "
                   "doco: adversarial "
                   "concept-domain correction with gradient surgery; plain: the step-matched control.")
@click.option("--memorized", default=None, type=click.Path(),
              help="Memorized captions (testbed default: its memorized.csv).")
@click.option("--retain", default=None, type=click.Path(),
              help="Retain captions the unedited model generates the fine-tuning data from "
                   "(testbed default: general_train.csv, never the held-out captions evaluate scores).")
@click.option("--retain-images", default=None, type=click.Path(file_okay=False),
              help="Instead of --retain: a folder of image/caption pairs (metadata.csv, or a .txt beside each image).")
@click.option("--anchors", default=None, type=click.Path(),
              help="doco: anchor captions (default: the retain captions).")
@click.option("--data", default=None, type=click.Path(),
              help="Instead of --retain: the images/captions to learn (a folder as --retain-images, or a CSV).")
@click.option("--protect", default=None, type=click.Path(),
              help="gradproj: captions of --data images that must not be learned (selective learning).")
@click.option("--params", type=click.Choice(["kv", "xattn", "unet"]), default=None,
              help="kv: cross-attention to_k/to_v only; xattn: all cross-attention Linears (q, k, v, out); unet: every "
                   "denoiser parameter [default: xattn for doco, kv otherwise].")
@click.option("--retention", type=click.Choice(["noise", "distill"]), default=None,
              help="doco: retention loss, noise (diffusion loss to the sampled noise on the anchor images) or distill "
                   "(match the unedited model) [default: noise].")
@click.option("--energy", default=0.97, show_default=True, type=FiniteFloatRange(0, 1, min_open=True),
              help="gradproj: share of singular-value energy the memorized subspace keeps.")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1), help="Optimiser steps.")
@click.option("--lr", default=1e-4, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="Adam learning rate.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="Retain latents per step.")
@click.option("--retain-prompts", default=128, show_default=True, type=click.IntRange(min=0),
              help="Seeded sample of retain captions generated (0: all).")
@click.option("--sampling-steps", default=20, show_default=True, type=click.IntRange(min=1),
              help="Sampling steps of the retain generations.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--rounds", default=None, type=click.IntRange(min=1),
              help="adversarial: attack + fine-tune rounds, each of --steps steps [default: 2].")
@click.option("--attack-steps", default=None, type=click.IntRange(min=0),
              help="adversarial: attack steps per memorized image and round [default: 50].")
@click.option("--round-attack", default=None, type=click.Choice(["dori", "bounded"]),
              help="adversarial: each round's attack, dori (memprune attack's) or bounded (lr 0.01) [default: dori].")
@click.option("--from", "from_dir", default=None, type=click.Path(file_okay=False),
              help="Start from this edit of --model (e.g. a pruned folder) instead of --model itself.")
@size_options
@device_option
@save_dtype_option
@out_option
@overwrite_option
def finetune(model, method, memorized, retain, retain_images, anchors, data, protect, params, retention, energy, steps,
             lr, batch_size, retain_prompts, sampling_steps, seed, rounds, attack_steps, round_attack, from_dir, height,
             width, device, dtype, out, overwrite):
    """Fine-tune the denoiser on retain data (gradient projection, DoCo, adversarial or the plain control); save it."""
    options = dict(locals())
    from .commands import finetune as command

    click.echo(command.run(options))


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--evaluation", required=True, type=click.Path(file_okay=False),
              help="Output folder of `memprune evaluate` that evaluated FOLDER.")
@click.option("--name", default=None,
              help="FOLDER's model column in that evaluation (default: found from its run.json).")
def card(folder, evaluation, name):
    """Rewrite the README.md model card of an edited FOLDER with the numbers of an evaluation."""
    from .commands import card as command

    click.echo(command.run(folder, evaluation, name))


@main.command()
@model_option
@click.option("--edited", multiple=True, type=click.Path(),
              help="Edited pipeline folder to attack (repeatable; one is named 'edited', several by folder, as "
                   "evaluate).")
@click.option("--prompts", default=None, type=click.Path(),
              help="Memorized prompts with an image column (testbed default: its memorized.csv).")
@click.option("--exclude-prompts", default=None, type=click.Path(),
              help="prompts_used.csv of locate: attack only the held-out prompts (group memorized_held_out).")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None,
              help="Attack the first N prompts (file order) only.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="Sampling steps per generation.")
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(min=1),
              help="Fresh generation seeds per prompt.")
@click.option("--seed", default=1000, show_default=True, type=click.IntRange(min=0),
              help="First fresh generation seed (not the attack's seed).")
@click.option("--guidance-scale", type=FiniteFloatRange(min=0), default=None,
              help="CFG scale (default: the pipeline's; nemo: 1, no guidance, for its criterion and threshold alike).")
@click.option("--attack-steps", default=50, show_default=True, type=click.IntRange(min=0),
              help="Adam steps on the embedding (DoRI: 50).")
@click.option("--attack-lr", default=0.1, show_default=True, type=FiniteFloatRange(min=0, min_open=True),
              help="Adam learning rate (DoRI: 0.1).")
@click.option("--bound", default=None, type=FiniteFloatRange(min=0),
              help="Optional budget ||delta|| <= bound * ||start embedding|| (default: none, as DoRI).")
@click.option("--noise-samples", default=8, show_default=True, type=click.IntRange(min=1),
              help="Fresh (t, noise) draws per attack step (DoRI: 8).")
@click.option("--init", "init", default="prompt", show_default=True, type=click.Choice(["prompt", "noise", "other"]),
              help="Start: the prompt's embedding, noise, or another non-memorized prompt's (--init-prompt).")
@click.option("--init-prompt", default=None,
              help="--init other: the prompt to start from (default: the first --controls caption).")
@click.option("--controls", default=None, type=click.Path(),
              help="Same-style non-memorized captions with images, attacked as a false-positive floor (testbed "
                   "default: its same-style captions; 'none': skip).")
@click.option("--unseen", default=None, type=click.Path(),
              help="Captions with images never seen in training, attacked as a floor (testbed default: its "
                   "unseen_same_style.csv; 'none': skip).")
@click.option("--num-controls", type=click.IntRange(min=1), default=None,
              help="Rows per control group (default: as many as memorized prompts are attacked).")
@click.option("--budget-step", "budget_steps", multiple=True, type=click.IntRange(min=0),
              default=(0, 5, 10, 25, 50), show_default=True,
              help="Attack steps of the attack-budget curve (repeatable; up to --attack-steps).")
@click.option("--attack-seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the attack's (t, noise) draws.")
@click.option("--threshold", type=FINITE_FLOAT, default=None,
              help="Copy threshold (default: calibrated as evaluate does).")
@click.option("--threshold-from", default=None, type=click.Path(file_okay=False),
              help="An evaluate output folder: use its copy_threshold.")
@fixed_threshold_option
@click.option("--control", default=None, type=click.Path(),
              help="Non-memorized prompts with training images that calibrate the threshold (testbed default: "
                   "same-style).")
@click.option("--threshold-percentile", default=95.0, show_default=True, type=FiniteFloatRange(0, 100, min_open=True),
              help="Calibration percentile.")
@click.option("--similarity", type=click.Choice(["ssim", "l2"]), default="ssim", show_default=True)
@click.option("--sscd", default=None, type=click.Path(),
              help="SSCD model file (TorchScript, or .onnx with onnxruntime).")
@processes_option("attack", "the attacks (with their generations)")
@size_options
@device_option
@dtype_option
@out_option
@overwrite_option
def attack(model, edited, prompts, exclude_prompts, num_prompts, steps, seeds, seed, guidance_scale, attack_steps,
           attack_lr, bound, noise_samples, init, init_prompt, controls, unseen, num_controls, budget_steps,
           attack_seed, threshold, threshold_from, control, threshold_percentile, fixed_threshold, similarity, sscd,
           height, width, processes, device, dtype, out, overwrite):
    """DoRI's attack: optimise a prompt embedding toward each memorized training image (and, as the false-positive
    floor, toward same-style control and unseen images), then count copies on fresh seeds
    (memorization_rate_attacked) for the unedited and every edited model."""
    from .attack.embedding import AttackSettings
    from .attack.run import AttackRunSettings
    from .commands.attack import attack_to_folder

    settings = AttackRunSettings(
        model=model or DEFAULT_MODEL, edited=tuple(edited), prompts=prompts, exclude_prompts=exclude_prompts,
        num_prompts=num_prompts, control=control, threshold=threshold, threshold_from=threshold_from,
        threshold_percentile=threshold_percentile, similarity=similarity, sscd=sscd, fixed_thresholds=fixed_threshold,
        generation=GenerationSettings(steps=steps, seeds=seeds, seed=seed, guidance_scale=guidance_scale, height=height,
                                      width=width),
        attack=AttackSettings(attack_steps=attack_steps, attack_lr=attack_lr, bound=bound, noise_samples=noise_samples,
                              attack_seed=attack_seed, init=init),
        controls=controls, unseen=unseen, num_controls=num_controls, init_prompt=init_prompt,
        budget_steps=tuple(budget_steps),
    )
    echo_summary(attack_to_folder, settings, out, overwrite=overwrite, device=device, dtype=torch_dtype(dtype),
                 log=click.echo, processes=processes)


def _register_optional_commands() -> None:
    """Commands of modules that may be absent in a partial install are added only when importable."""
    try:
        from .testbed.cli import testbed
    except ImportError:
        return
    main.add_command(testbed)


main.add_command(benchmark)


_register_optional_commands()
