"""Split the ordered work of `evaluate` and `attack` over processes, and gather the results back in that order.

Both list their work in a fixed order before any process starts: evaluate its pipeline calls (a prompt batch with
one seed) of every prompt file, attack its (prompt, group) jobs (an attack and its generations). Process `rank` of
`world` does items rank, rank + world, ... (round-robin: balanced even when the cost drifts along the list), each
seeded by the item, never by the process; the main process gathers every rank's results keyed by their place in the
list and scores them alone, so what it scores and writes is what one process would have: the metrics are the same.

The processes themselves come from memprune.distributed (`--processes N` spawns them, `accelerate launch` starts
them), as for `locate`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .distributed import Processes, check_devices, current_processes, spawn
from .errors import MemPruneError


def share(count: int, processes: Processes) -> list[int]:
    """The places in a list of `count` items that this process does (round-robin)."""
    return list(range(processes.rank, count, processes.world))


def check_work(world: int, count: int, unit: str, what: str) -> None:
    """Refuse more processes than items of work: each process needs at least one. `what` says how the `count`
    items (`unit`: "pipeline calls") come about ("4 prompts x 2 seeds in batches of 2")."""
    if world > count:
        raise MemPruneError(f"--processes {world} is more than the work: {what} make {count} {unit}; "
                            f"use at most {count} processes.")


def gather_in_order(processes: Processes, local: dict) -> dict | None:
    """Every rank's {key: result} merged on the main process (None on the others). Keys are unique over the ranks
    (places in the work list, each done by one rank), so the merge loses nothing; the caller reads them back in its
    order."""
    parts = processes.gather_to_main(local)
    if parts is None:
        return None
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def start_processes(world: int, device: str, target: Callable[..., str], kwargs: dict[str, Any]) -> str:
    """`target(**kwargs)` in `world` local processes (memprune.distributed.spawn); the main process's summary."""
    if world < 1:
        raise MemPruneError(f"--processes must be at least 1, got {world}.")
    check_devices(device, world)
    return spawn(world, target, kwargs)


Result = TypeVar("Result")


def on_processes(world: int, target: Callable[..., str], kwargs: dict[str, Any],
                 check_size: Callable[[Any, int], None], run: Callable[..., Result | None],
                 log: Callable[[str], Any]) -> tuple[Processes, Result] | str:
    """The opening `evaluate` and `attack` share; `kwargs` are the command's (settings, out, overwrite, device,
    dtype, progress, log). With `world` > 1: `target(**kwargs)` started in that many local processes, and their
    summary (a str). Else `run(settings, ...)` in this process's group (one process, or a launcher's, its size
    checked by `check_size(settings, size)`): (group, result) on the main process; '' on the others, after waiting
    for the main process to write the folder (it calls group.barrier() when done)."""
    settings, device = kwargs["settings"], kwargs["device"]
    if world != 1:
        check_size(settings, max(world, 1))
        return start_processes(world, device, target, kwargs)
    group = current_processes(device)
    if group.distributed:
        check_size(settings, group.world)
    result = run(settings, device=device, dtype=kwargs["dtype"], progress=kwargs["progress"], log=log,
                 processes=group if group.distributed else None)
    if result is None:
        group.barrier()
        return ""
    return group, result
