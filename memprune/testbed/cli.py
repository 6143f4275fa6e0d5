"""`testbed` command group (registered in the main CLI as `memprune testbed ...`)."""
from __future__ import annotations

import dataclasses
import os
import shutil

import click

from ..cli_common import FriendlyGroup
from .presets import PRESETS


@click.group("testbed", cls=FriendlyGroup)
def testbed() -> None:
    """Train the tiny memorization testbed (a stock StableDiffusionPipeline)."""


@testbed.command("train")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write (must not exist).")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Seed for data, initialisation and batches.",
)
@click.option("--steps", default=None, type=click.IntRange(min=1), help="UNet training steps (default: the preset's).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch CPU threads.")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (a GPU when there is one), cpu, cuda or cuda:N. Batches and noise are the same on every device.",
)
@click.option("--preset", default="late12d_eps", show_default=True, type=click.Choice(sorted(PRESETS)),
              help="'late12d_eps' is the shipped recipe (data/testbed, ε-prediction as SD 1.x; 'late12d' its "
                   "v-prediction twin); 'tiny' is a seconds-long smoke test.")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Checkpoints; rerun the same command to resume. Default: OUT.work")
@click.option("--keep-work", is_flag=True, help="Keep the checkpoint folder after success.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(out, seed, steps, threads, device, preset, work_dir, keep_work, overwrite, quiet) -> None:
    """Train the testbed and write the pipeline folder, captions, images and model card to OUT."""
    from ..models import resolve_device
    from .train import train_testbed

    target = resolve_device(device)  # a MemPruneError becomes one sentence (FriendlyGroup)
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} already exists; pass --overwrite to replace it.")
    cfg = PRESETS[preset]()
    cfg = dataclasses.replace(cfg, seed=seed, threads=threads, steps=steps or cfg.steps)
    work_dir = os.path.abspath(work_dir or out + ".work")
    try:
        train_testbed(cfg, out, work_dir=work_dir, progress=not quiet, overwrite=overwrite, device=target)
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; rerun the same command to resume from {work_dir}.") from None
    except ImportError as e:
        raise click.ClickException(f"a testbed dependency is missing ({e}); install memprune[testbed].") from e
    except Exception as e:  # one sentence for the user, never a traceback
        raise click.ClickException(f"testbed training failed: {type(e).__name__}: {e}") from e
    if not keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    click.echo(f"wrote {out}")


def main() -> None:
    testbed()


if __name__ == "__main__":
    main()
