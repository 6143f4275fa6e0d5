"""NeuronStats: per (layer, step) accumulators of FeedForward hidden activations, mergeable and saveable.

For every (layer, step) and hidden unit j:
- sumsq_normed[j] = sum over samples and tokens of (x_j / ||x||_2)^2  -> Wanda norm a[j] = sqrt(sumsq_normed[j])
- count, mean[j], m2[j] of the token-averaged activation per sample (Chan et al.'s parallel Welford), so
  two partial statistics merge exactly into the statistics of the union.
Raw activations are never stored: memory does not grow with the number of prompts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import MemPruneError
from .reduce import batch_statistics

Key = tuple[str, int]
FIELDS = ("sumsq_normed", "mean", "m2")


def merge_moments(count_a: int, mean_a: torch.Tensor, m2_a: torch.Tensor, count_b: int, mean_b: torch.Tensor,
                  m2_b: torch.Tensor) -> int:
    """Chan et al.'s parallel update, in place on (mean_a, m2_a): the moments of both samples together (m2: sum of
    squared deviations from the mean). Returns the joint count."""
    total = count_a + count_b
    delta = mean_b - mean_a
    mean_a.add_(delta, alpha=count_b / total)
    m2_a.add_(m2_b).addcmul_(delta, delta, value=count_a * count_b / total)
    return total


@dataclass
class Moments:
    """Float64 per-column mean and M2 of (samples, H) rows added batch by batch (NeMo's reference statistics)."""

    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        n, batch_mean = rows.shape[0], rows.mean(0)
        batch_m2 = (rows - batch_mean).square().sum(0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        self.count = merge_moments(self.count, self.mean, self.m2, n, batch_mean, batch_m2)

    @property
    def std(self) -> torch.Tensor:
        """Sample standard deviation (M2 / (count - 1); 0 with fewer than 2 samples)."""
        if self.m2 is None:
            raise ValueError("No rows were added.")
        return (self.m2 / max(self.count - 1, 1)).sqrt()

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the rows added; refuses when none were."""
        if self.mean is None:
            raise ValueError("No rows were added.")
        return self.mean, self.std


@dataclass
class Accumulator:
    """Statistics of one layer at one step."""

    sumsq_normed: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    count: int = 0  # samples (prompt x seed x CFG half) seen
    tokens: int = 0  # tokens seen (samples x spatial positions)

    @classmethod
    def zeros(cls, width: int, device, dtype) -> Accumulator:
        sumsq_normed, mean, m2 = (torch.zeros(width, device=device, dtype=dtype) for _ in FIELDS)
        return cls(sumsq_normed, mean, m2)

    def add_batch(self, x: torch.Tensor) -> None:
        """Reduce a (samples, tokens, H) activation into the accumulators, on its own device.

        This runs inside a hook on every FeedForward call, so the reduction is fused where it can be (see
        memprune.reduce), and an empty accumulator (the usual case: one batch per layer, step and pipeline call)
        takes the batch's statistics as they are, with no merge ops.
        """
        other = Accumulator.from_batch(x)
        if self.count == 0 and self.tokens == 0:
            dtype = self.mean.dtype
            self.sumsq_normed, self.mean, self.m2 = (getattr(other, name).to(dtype) for name in FIELDS)
            self.count, self.tokens = other.count, other.tokens
        else:
            self.merge(other)

    @classmethod
    def from_batch(cls, x: torch.Tensor) -> Accumulator:
        """The statistics of one (samples, tokens, H) activation batch, float32 on its device."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        samples, tokens, _ = x.shape
        return cls(*batch_statistics(x), count=samples, tokens=samples * tokens)

    def merge(self, other: Accumulator) -> None:
        self.sumsq_normed += other.sumsq_normed.to(self.sumsq_normed)
        if other.count:
            self.count = merge_moments(self.count, self.mean, self.m2, other.count, other.mean.to(self.mean),
                                       other.m2.to(self.m2))
        self.tokens += other.tokens

    @property
    def wanda_norm(self) -> torch.Tensor:
        return self.sumsq_normed.sqrt()

    @property
    def std(self) -> torch.Tensor:
        """Sample standard deviation of the token-averaged activation (0 with fewer than 2 samples)."""
        return (self.m2 / max(self.count - 1, 1)).sqrt()


@dataclass
class NeuronStats:
    """Accumulators for every recorded (layer, step), plus the scheduler timestep of each step."""

    accumulators: dict[Key, Accumulator] = field(default_factory=dict)
    timesteps: dict[int, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def update(self, layer: str, step: int, x: torch.Tensor) -> None:
        key = (layer, step)
        accumulator = self.accumulators.get(key)
        if accumulator is None:
            # float32 where the activations are (in the hook); float64 once on the host (see `to`).
            self.accumulators[key] = Accumulator.from_batch(x)
        else:
            accumulator.add_batch(x)

    def __getitem__(self, key: Key) -> Accumulator:
        return self.accumulators[key]

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.accumulators))

    @property
    def steps(self) -> list[int]:
        return sorted({step for _, step in self.accumulators})

    def merge(self, other: NeuronStats) -> NeuronStats:
        """Add `other` into self (in place) and return self: equals recording the union of both inputs."""
        for key, accumulator in other.accumulators.items():
            if key in self.accumulators:
                self.accumulators[key].merge(accumulator)
            else:
                mine = Accumulator.zeros(accumulator.mean.numel(), accumulator.mean.device, accumulator.mean.dtype)
                mine.merge(accumulator)
                self.accumulators[key] = mine
        self.timesteps.update(other.timesteps)
        return self

    def check_finite(self) -> None:
        for (layer, step), accumulator in self.accumulators.items():
            if not all(torch.isfinite(getattr(accumulator, name)).all() for name in FIELDS):
                raise MemPruneError(
                    f"Activations of {layer} at step {step} contain NaN or inf: run in float32 (--dtype float32) "
                    "or check the model weights."
                )

    def to(self, device) -> NeuronStats:
        """Move to `device`: float64 on the host (merging many partial statistics), float32 on an accelerator."""
        device = torch.device(device)
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        tensors = [getattr(acc, name) for acc in self.accumulators.values() for name in FIELDS]
        if tensors and device.type == "cpu" and any(t.device.type != "cpu" for t in tensors):
            # From an accelerator: one copy of everything (one sync), not one per vector.
            flat = torch.cat([t.reshape(-1).float() for t in tensors]).to(device, dtype)
            tensors = list(flat.split([t.numel() for t in tensors]))
        else:
            tensors = [t.to(device, dtype) for t in tensors]
        moved = iter(tensors)
        for accumulator in self.accumulators.values():
            for name in FIELDS:
                setattr(accumulator, name, next(moved))
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The accumulator vectors as a flat {"layer|step|field": tensor} dict (the safetensors layout)."""
        return {
            f"{layer}|{step}|{name}": getattr(acc, name).detach().cpu().contiguous()
            for (layer, step), acc in self.accumulators.items()
            for name in FIELDS
        }

    def sidecar(self) -> dict:
        """Counts, timesteps and meta: what the tensors do not hold."""
        return {
            "counts": {f"{layer}|{step}": [acc.count, acc.tokens] for (layer, step), acc in self.accumulators.items()},
            "timesteps": {str(step): value for step, value in self.timesteps.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], sidecar: dict) -> NeuronStats:
        stats = cls(timesteps={int(k): v for k, v in sidecar["timesteps"].items()}, meta=sidecar.get("meta", {}))
        for key, (count, tokens) in sidecar["counts"].items():
            layer, step = key.rsplit("|", 1)
            sumsq_normed, mean, m2 = (tensors[f"{key}|{name}"] for name in FIELDS)
            stats.accumulators[(layer, int(step))] = Accumulator(sumsq_normed, mean, m2, count=count, tokens=tokens)
        return stats

    def save(self, path: str | Path) -> None:
        """Write `path` (.safetensors) and a JSON sidecar with counts, timesteps and meta."""
        path = Path(path)
        save_file(self.tensors(), str(path))
        path.with_suffix(".json").write_text(json.dumps(self.sidecar(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> NeuronStats:
        path = Path(path)
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise MemPruneError(f"Statistics file '{path}' or its .json sidecar is missing.")
        return cls.from_parts(load_file(str(path)), json.loads(path.with_suffix(".json").read_text()))
