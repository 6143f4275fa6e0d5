"""Time to prune and save an SDXL-size UNet: zero the union of 10 steps' masks, save as safetensors, reload, verify.

The UNet is built from the real SDXL config with random weights (building is not timed); the masks select 1% of
every FeedForward output weight per step at random (the size of a ratio-0.01 Wanda mask), 10 steps. Timed: the
union over steps and zeroing (`memprune.prune.apply_masks`), `save_pretrained(safe_serialization=True)`, and a reload
with stock diffusers plus the check that every masked weight is zero.

    python bench/prune_save_time.py                    # float16: about 5 GB of memory and of disk
    python bench/prune_save_time.py --dtype float32    # about 10 GB
    python bench/prune_save_time.py --config sd15      # the SD 1.5 UNet
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_overhead import SD15_UNET, SDXL_UNET  # noqa: E402

from memprune.masks import Masks  # noqa: E402
from memprune.models import output_linears  # noqa: E402
from memprune.prune import apply_masks  # noqa: E402


def random_masks(unet, ratio: float, steps: int, seed: int = 0) -> Masks:
    generator = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for layer, linear in output_linears(unet).items():
        rows, columns = linear.weight.shape
        shapes[layer] = (rows, columns)
        for step in range(steps):
            picked = torch.randint(0, rows * columns, (int(ratio * rows * columns),), generator=generator)
            indices[(layer, step)] = picked.unique()  # sorted
    return Masks(indices=indices, shapes=shapes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["sdxl", "sd15"], default="sdxl")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to save (default: a temporary folder, removed after)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of the weights
    unet = UNet2DConditionModel(**(SDXL_UNET if args.config == "sdxl" else SD15_UNET)).eval()
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in unet.parameters())
    ff_weights = sum(linear.weight.numel() for linear in output_linears(unet).values())
    print(f"{args.config} UNet: {params / 1e9:.2f} B parameters ({args.dtype}), "
          f"{len(output_linears(unet))} FeedForwards "
          f"with {ff_weights / 1e6:.0f} M output weights; built in {time.perf_counter() - start:.0f} s (not timed); "
          f"{args.threads} CPU threads", flush=True)
    masks = random_masks(unet, args.ratio, args.timesteps)

    timings = {}
    start = time.perf_counter()
    result = apply_masks(SimpleNamespace(unet=unet), masks, timesteps=args.timesteps)
    timings["union + zero"] = time.perf_counter() - start
    folder = Path(args.dir or tempfile.mkdtemp(prefix="memprune-prune-bench-")) / "unet"
    start = time.perf_counter()
    unet.save_pretrained(str(folder), safe_serialization=True)
    timings["save (safetensors)"] = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.iterdir())
    del unet
    start = time.perf_counter()
    reloaded = UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)
    linears = output_linears(reloaded)
    for layer, indices in masks.union_indices(args.timesteps).items():
        assert torch.count_nonzero(linears[layer].weight.view(-1)[indices]) == 0, layer
    timings["reload + verify"] = time.perf_counter() - start
    print(f"zeroed {result.total_zeroed / 1e6:.1f} M weights ({result.total_zeroed / ff_weights:.2%} of the FF output "
          f"weights, union of {args.timesteps} steps at ratio {args.ratio}); saved {size / 2**30:.2f} GiB")
    for name, seconds in timings.items():
        print(f"  {name:<20} {seconds:7.2f} s")
    print(f"  {'prune + save':<20} {timings['union + zero'] + timings['save (safetensors)']:7.2f} s")
    if args.dir is None:
        shutil.rmtree(folder.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
