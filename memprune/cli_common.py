"""What every memprune command group shares: error handling and the common options.

Its own module so that `memprune.cli` and `memprune.testbed.cli` both import it without importing each other.
"""
from __future__ import annotations

import click

from .errors import MemPruneError
from .models import testbed_captions


class FriendlyGroup(click.Group):
    """Every MemPruneError becomes one sentence on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MemPruneError as exc:
            raise click.ClickException(str(exc)) from None


def default_testbed_file(model: str | None, given: str | None, name: str, option: str) -> str:
    """Prompt files default to the embedded testbed's captions when the testbed is the model."""
    if given is not None:
        return given
    captions = testbed_captions(model)
    if captions is not None:
        return str(captions / name)
    raise MemPruneError(f"{option} is required when --model is not a memprune testbed.")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


model_option = click.option("--model", default=None, help="Diffusers pipeline folder or hub id (default: the embedded testbed).")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
dtype_option = click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
out_option = click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
