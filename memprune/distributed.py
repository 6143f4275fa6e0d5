"""Locate across processes: shard the pipeline calls, gather every rank's NeuronStats, merge them in rank order.

Two ways in, one code path:
- `accelerate launch [--cpu] --num_processes N -m memprune locate ...`: accelerate (torchrun) starts the processes;
  each finds its rank in the environment (`current_processes`) through accelerate's `PartialState`.
- `memprune locate --processes N`: `spawn` starts N local processes (gloo on CPU, NCCL on GPUs) with the same
  environment, watches them, and stops the others when one fails, naming it.

The unit of work is one pipeline call (a prompt batch with one seed): a call's float32 statistics do not depend on
the process that runs it, every rank merges its calls into float64 in call order, and the ranks' totals are merged
in rank order, so the result equals one process up to float64 rounding (about 1e-16 relative) and the masks are the
same.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MemPruneError
from .stats import NeuronStats

# A test hook: "RANK:CALLS" makes process RANK raise after CALLS pipeline calls (counted over the whole run),
# "RANK:CALLS:exit" makes it die without cleanup (a killed process). Used to test resume and rank failures.
FAULT_ENV = "MEMPRUNE_INJECT_FAULT"


class FaultInjector:
    """Counts this process's pipeline calls and fails where FAULT_ENV asks (tests only; a no-op otherwise)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.calls = 0
        spec = os.environ.get(FAULT_ENV, "")
        parts = spec.split(":") if spec else []
        self.target = (int(parts[0]), int(parts[1]), len(parts) > 2 and parts[2] == "exit") if parts else None

    def before_call(self) -> None:
        if self.target is not None and self.target[0] == self.rank and self.calls == self.target[1]:
            if self.target[2]:
                os._exit(3)  # die like a killed process: no cleanup, no message
            raise RuntimeError(f"injected fault in process {self.rank} after {self.calls} pipeline calls")
        self.calls += 1


@dataclass
class Processes:
    """This process's place among the processes of one run (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # the launcher's device for this rank (None: --device decides)
    faults: FaultInjector | None = None  # counts this run's pipeline calls (FAULT_ENV)

    def __post_init__(self):
        self.faults = self.faults or FaultInjector(self.rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, items: list) -> list:
        """This rank's contiguous block of `items` (sizes differ by at most one; early ranks get the extra)."""
        base, extra = divmod(len(items), self.world)
        start = self.rank * base + min(self.rank, extra)
        return items[start:start + base + (self.rank < extra)]

    def gather(self, item) -> list:
        """Every rank's `item`, in rank order, on every rank (accelerate's all-gather of picklable objects)."""
        if not self.distributed:
            return [item]
        from accelerate.utils import gather_object

        return gather_object([item])

    def gather_to_main(self, item) -> list | None:
        """Every rank's `item`, in rank order, on the main process only (None on the others): what only the main
        process scores (images) is not copied to every rank."""
        if not self.distributed:
            return [item]
        parts: list | None = [None] * self.world if self.is_main else None
        torch.distributed.gather_object(item, parts, dst=0)
        return parts

    def barrier(self) -> None:
        if self.distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def launched_world_size() -> int:
    """The number of processes a launcher (accelerate launch, torchrun, `spawn`) started, 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def naming_this_rank():
    """Under a launcher every process prints its own errors: prefix them with the rank that had them."""
    try:
        yield
    except MemPruneError as exc:
        if launched_world_size() <= 1:
            raise
        raise MemPruneError(f"Process {os.environ.get('RANK', '?')} of {launched_world_size()}: {exc}") from exc


def current_processes(device: str = "auto") -> Processes:
    """This process's rank from the launcher's environment; joins the process group (gloo on CPU, else NCCL)."""
    world = launched_world_size()
    if world <= 1:
        return Processes()
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    return Processes(rank=state.process_index, world=state.num_processes, device=state.device)


def reduce_stats(processes: Processes, local: NeuronStats) -> NeuronStats:
    """The union of every rank's statistics, identical on every rank: merged in rank order, in float64."""
    if not processes.distributed:
        return local
    merged = NeuronStats()
    for part in processes.gather(local.to("cpu")):
        merged.merge(part)
    merged.meta = dict(local.meta)
    return merged


# ---------------------------------------------------------------------------------------------------------------------
# `--processes N`: start N local processes with a launcher's environment and watch them.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # so `finally` blocks (temporary output folders) run when a sibling failed


def _is_communication_error(exc: BaseException) -> bool:
    """A rank that only lost its peers (a sibling died first) is not the cause of the failure."""
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(exc, dist_error) or any(word in str(exc)
                                              for word in ("Connection closed", "Connection reset", "gloo"))


def _worker(rank: int, world: int, port: int, threads: int, report_dir: str, target, kwargs: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": str(threads)})  # accelerate would pick its own count when it is unset
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    torch.set_num_threads(threads)
    report = Path(report_dir)
    try:
        result = target(**kwargs)
    except (SystemExit, KeyboardInterrupt):
        raise  # stopped because a sibling failed: not a cause worth reporting
    except BaseException as exc:
        (report / f"error-{rank}.json").write_text(json.dumps({
            "rank": rank, "time": time.time(), "message": str(exc) or type(exc).__name__,
            "type": type(exc).__name__, "memprune": isinstance(exc, MemPruneError),
            "communication": _is_communication_error(exc), "traceback": traceback.format_exc(),
        }))
        raise SystemExit(1) from None
    if rank == 0:
        (report / "result.json").write_text(json.dumps({"result": result}))


def _failure_message(report: Path, world: int, rank: int, exit_code: int | None) -> str:
    errors = [json.loads(path.read_text()) for path in report.glob("error-*.json")]
    causes = [e for e in errors if not e["communication"]] or errors
    if causes:
        first = min(causes, key=lambda e: e["time"])
        detail = first["message"] if first["memprune"] else f"{first['type']}: {first['message']}"
        return (f"Process {first['rank']} of {world} failed ({detail}); "
                "the other processes were stopped and nothing was written.")
    code = exit_code if exit_code is not None else 0
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return (f"Process {rank} of {world} {how} without a message; "
            "the other processes were stopped and nothing was written.")


def check_devices(device: str, world: int) -> None:
    """Refuse more local processes than GPUs on CUDA (each process takes one)."""
    from .models import resolve_device

    if resolve_device(device).type == "cuda" and world > torch.cuda.device_count():
        raise MemPruneError(f"--processes {world} on CUDA takes one GPU each, but {torch.cuda.device_count()} "
                            "are visible: use at most that many, or --device cpu.")


def spawn(world: int, target, kwargs: dict, threads: int | None = None):
    """Run `target(**kwargs)` in `world` local processes (ranks 0..world-1); return rank 0's (JSON-able) result.

    When one process fails, the others are stopped at once and a MemPruneError names the failed rank."""
    import torch.multiprocessing as mp

    if launched_world_size() > 1:
        raise MemPruneError("--processes starts its own processes: "
                            "do not combine it with accelerate launch or torchrun.")
    threads = threads or max(1, torch.get_num_threads() // world)
    with tempfile.TemporaryDirectory(prefix="memprune-ranks-") as report_dir:
        context = mp.start_processes(_worker, args=(world, free_port(), threads, report_dir, target, kwargs),
                                     nprocs=world, join=False, start_method="spawn")
        try:
            while not context.join():
                pass
        # join() has already stopped the other processes
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            message = _failure_message(Path(report_dir), world, exc.error_index, getattr(exc, "exit_code", None))
            raise MemPruneError(message) from None
        return json.loads((Path(report_dir) / "result.json").read_text())["result"]
