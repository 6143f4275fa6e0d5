"""memprune: locate and delete the neurons of a diffusion model that carry memorized training images."""
__version__ = "0.1.0"

from .errors import MemPruneError  # noqa: E402

__all__ = ["MemPruneError", "__version__"]
