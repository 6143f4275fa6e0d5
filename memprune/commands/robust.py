"""Attack-aware pruning's prune stage (`memprune prune --method robust-wanda --masks LOCATE_DIR --rounds K`): grow
locate's Wanda mask under the attack (memprune.methods.robust_wanda) and write the masks folder (masks, rounds.csv,
prompts_used.csv, run.json) that the prune then applies."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MemPruneError
from ..masks import MASKS_FILE, Masks
from ..methods.robust_wanda import LocatedWith, RobustSettings, contains, robust_rounds
from ..models import denoiser, layer_shapes, load_pipeline, resolve_device
from ..prompts import read_prompts, write_prompts
from .defaults import file_or_testbed_default
from .output import Timer, atomic_output_dir, refuse_output, write_run_json


def located_images(masks: Masks, memorized: str, source: str) -> tuple[list[str], list[str]]:
    """The located prompts (masks.json) and the training image of each, looked up by caption in `memorized`."""
    prompts = masks.meta.get("prompts")
    if not prompts:
        raise MemPruneError(f"'{source}' records no located prompts: give a masks folder of `memprune locate`.")
    table = read_prompts(memorized)
    images = {caption: table.image(i) for i, caption in enumerate(table.prompts) if table.images and table.images[i]}
    missing = [prompt for prompt in prompts if prompt not in images]
    if missing:
        raise MemPruneError(f"{len(missing)} located prompts have no training image in '{memorized}' (e.g. "
                            f"'{missing[0]}'): the attack needs each one's image; give --memorized a file with an "
                            "image column holding them.")
    absent = [images[p] for p in prompts if not Path(images[p]).is_file()]
    if absent:
        raise MemPruneError(f"Training image '{absent[0]}' named in '{memorized}' does not exist.")
    return list(prompts), [images[p] for p in prompts]


def robust_to_folder(model: str, options: dict[str, Any], out, settings: RobustSettings,
                     wanda_masks: str | None = None, overwrite: bool = False, device: str = "auto") -> str:
    """Run the rounds from locate's masks folder `wanda_masks` and write the grown masks folder `out`."""
    from ..conditioning import default_size
    from ..similarity import load_image

    if wanda_masks is None:
        raise MemPruneError("--method robust-wanda starts from Wanda masks: give --masks, the output folder of "
                            "`memprune locate`.")
    protected = refuse_output(out, overwrite, model, wanda_masks)
    masks = Masks.load(wanda_masks)
    LocatedWith.from_masks(masks, f"The masks in '{wanda_masks}'")  # refused before the model loads
    memorized = file_or_testbed_default(model, options.get("memorized"), "memorized", "--memorized")
    prompts, paths = located_images(masks, memorized, wanda_masks)
    timer = Timer()
    with timer("load"):
        pipe = load_pipeline(model, resolve_device(device))
    masks.check_compatible(layer_shapes(denoiser(pipe)))
    size = default_size(pipe)
    images = [load_image(path, size) for path in paths]
    with timer("rounds"):
        result = robust_rounds(pipe, settings, masks, prompts, images)
    assert all(contains(after, before) for before, after in zip(result.history, result.history[1:], strict=False))
    with atomic_output_dir(out, overwrite, protected) as staging:
        result.masks.save(staging)
        result.rounds.to_csv(Path(staging) / "rounds.csv", index=False)
        write_prompts(prompts, Path(staging) / "prompts_used.csv")
        write_run_json(staging, settings, {"wanda_masks": Path(wanda_masks) / MASKS_FILE, "memorized": memorized},
                       timer.seconds, rounds=result.rounds.to_dict(orient="records"))
    first, last = result.rounds.iloc[0], result.rounds.iloc[-1]
    return (f"robust-wanda: {settings.rounds} rounds on {len(prompts)} located prompts "
            f"({timer.seconds['rounds']:.0f} s); mask {int(first.mask_size)} -> {int(last.mask_size)} weights "
            f"(steps 0..{settings.timesteps - 1}); attacked copy similarity {first.copy_similarity_attacked:.3f} -> "
            f"{last.copy_similarity_attacked:.3f} on the located prompts. Compare with a random mask of "
            f"{int(last.mask_size)} weights before reading it as a gain.\n"
            f"Masks and rounds.csv: {out}")
