"""What every memprune command group shares: error handling and the common options.

Its own module so that `memprune.cli` and `memprune.testbed.cli` both import it without importing each other.
"""
from __future__ import annotations

import logging

import click

from .cli_types import FiniteFloatRange
from .errors import MemPruneError  # neither imports transformers, so the filter below is in place in time


class _LibraryChatter(logging.Filter):
    """Drops library notices that are not about the user's run (transformers announcing, on every command, that
    image processors fall back to PIL without torchvision: memprune never uses them). Real warnings pass."""

    NOTICES = ("requires torchvision (not installed); falling back",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in self.NOTICES)


def silence_library_chatter() -> None:
    # The logger exists before transformers is imported (getLogger creates it), so the filter is in place in time.
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _LibraryChatter) for f in logger.filters):
        logger.addFilter(_LibraryChatter())


silence_library_chatter()


class FriendlyGroup(click.Group):
    """Every MemPruneError becomes one sentence on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MemPruneError as exc:
            raise click.ClickException(str(exc)) from None


class MethodChoice(click.Choice):
    """--method choices read from the method registry when used (--help, parsing), so a method registered after
    the CLI module was imported is listed and accepted."""

    def __init__(self, kind: str, stage: str | None = None):
        self.kind, self.stage = kind, stage
        super().__init__((), case_sensitive=True)

    @property
    def choices(self):
        from .methods import names

        return tuple(names(self.kind, self.stage))

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it; the registry is the source
        pass


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


model_option = click.option("--model", default=None,
                            help="Diffusers pipeline folder or hub id (default: the embedded testbed).")
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
dtype_option = click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
                            show_default=True)
save_dtype_option = click.option(
    "--dtype", type=click.Choice(["keep", "float32", "float16", "bfloat16"]), default="keep", show_default=True,
    help="Dtype of the saved pipeline's components; keep: each component in the dtype of the source's weights.")
out_option = click.option("--out", required=True, type=click.Path(file_okay=False),
                          help="Output folder (must not exist).")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
# [-1, 1] holds every backend's similarity range; the settings refuse a value outside the chosen backend's.
fixed_threshold_option = click.option(
    "--fixed-threshold", multiple=True, type=FiniteFloatRange(-1, 1),
    help="Also report memorization_rate@T at this fixed copy threshold (repeatable; the field uses 0.7 and 0.5).")


def size_options(command):
    """--height/--width: the generated image size (default: the pipeline's, e.g. 1024 px for SDXL)."""
    command = click.option("--width", type=click.IntRange(min=1), default=None,
                           help="Image width in pixels (default: the pipeline's).")(command)
    return click.option("--height", type=click.IntRange(min=1), default=None,
                        help="Image height in pixels (default: the pipeline's).")(command)


class RegistryEpilogCommand(click.Command):
    """A command whose --help ends with the registered methods (read from the registry when help is shown)."""

    def format_epilog(self, ctx, formatter) -> None:
        from .methods import available

        super().format_epilog(ctx, formatter)
        with formatter.section("Methods an arm may name"):
            formatter.write_dl([(name, f"{module.METHOD.kind.replace('_', ' ')}: {module.METHOD.summary}")
                                for name, module in sorted(available().items())])


def processes_option(command: str, what: str = "the generations"):
    """--processes N of a command that splits its work over local processes (memprune.distributed)."""
    return click.option("--processes", default=1, show_default=True, type=click.IntRange(min=1),
                        help=f"Split {what} over N local processes (gloo on CPU, one GPU each on CUDA); "
                             f"or start it with `accelerate launch -m memprune {command} ...`.")


def echo_summary(run, *args, **kwargs) -> None:
    """Print what `run(*args, **kwargs)` returns; under a launcher its errors name the rank, and the other
    processes (which return '') print nothing."""
    from .distributed import naming_this_rank  # imports torch: only when a command runs

    with naming_this_rank():
        summary = run(*args, **kwargs)
    if summary:
        click.echo(summary)
