"""Read prompt files (.txt, .csv, .jsonl) with optional labels; draw seeded subsets."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MemPruneError

CAPTION_COLUMNS = ("Caption", "caption", "prompt", "text", "Prompt", "Text")
LABEL_COLUMNS = ("type", "label", "group")
IMAGE_COLUMNS = ("image", "image_file", "file")


@dataclass
class PromptList:
    """Prompts with optional per-prompt labels (e.g. VM/TM) and ground-truth image files."""

    prompts: list[str]
    source: str = ""
    labels: list[str] | None = None
    images: list[str | None] | None = None
    extra: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def image(self, i: int) -> str:
        """The training image file of prompt i; refuses a prompt without one."""
        image = self.images[i] if self.images is not None else None
        if not image:
            raise MemPruneError(f"Prompt file '{self.source}' row {i + 1} has no training image.")
        return image

    def subset(self, indices) -> PromptList:
        pick = lambda values: None if values is None else [values[i] for i in indices]  # noqa: E731
        return PromptList(
            prompts=[self.prompts[i] for i in indices],
            source=self.source,
            labels=pick(self.labels),
            images=pick(self.images),
            extra={k: [v[i] for i in indices] for k, v in self.extra.items()},
        )


def empty_prompts(count: int) -> PromptList:
    """Chavhan's default reference: the empty prompt, as many times as there are memorized prompts."""
    return PromptList(prompts=[""] * count, source="empty")


def _first_present(columns, candidates):
    return next((c for c in candidates if c in columns), None)


def _read_csv(path: Path, text: str) -> PromptList:
    first_line = text.splitlines()[0] if text else ""
    delimiter = ";" if first_line.count(";") > first_line.count(",") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter, strict=True)
    columns = reader.fieldnames or []
    caption_column = _first_present(columns, CAPTION_COLUMNS)
    if caption_column is None:
        raise MemPruneError(
            f"Prompt file '{path}' has no caption column: "
            f"name one of {', '.join(CAPTION_COLUMNS[:4])} in its header line."
        )
    rows = _csv_rows(path, reader, caption_column)
    label_column = _first_present(columns, LABEL_COLUMNS)
    image_column = _first_present(columns, IMAGE_COLUMNS)
    prompts = []
    for line_number, row in enumerate(rows, start=2):
        caption = row.get(caption_column)
        if caption is None:
            raise MemPruneError(f"Prompt file '{path}' line {line_number} has no {caption_column} value: "
                                "fix or remove that line.")
        prompts.append(caption.strip())
    images = None
    if image_column:
        images = [_image_path(path.parent, row[image_column]) if row.get(image_column) else None for row in rows]
    known = {caption_column, label_column, image_column, ""}
    extra = {c: [row.get(c) for row in rows] for c in columns if c not in known and c is not None}
    return PromptList(
        prompts=prompts,
        source=str(path),
        labels=[row[label_column] for row in rows] if label_column else None,
        images=images,
        extra=extra,
    )


def _csv_rows(path: Path, reader: csv.DictReader, caption_column: str) -> list[dict]:
    """All rows, refusing what a lenient reader would silently turn into one long caption or shifted columns:
    an unterminated quote, a caption spanning lines, more fields than the header names."""
    rows: list[dict] = []
    while True:
        start = reader.line_num + 1  # the physical line the next record starts on
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as exc:
            raise MemPruneError(f"Prompt file '{path}' line {start} is malformed CSV ({exc}): "
                                "check its quotes.") from exc
        if None in row:
            raise MemPruneError(f"Prompt file '{path}' line {start} has more fields than its header: quote captions "
                                "that contain the delimiter.")
        if "\n" in (row.get(caption_column) or "") or "\r" in (row.get(caption_column) or ""):
            raise MemPruneError(f"Prompt file '{path}' line {start}: the caption runs over several lines "
                                f"(to line {reader.line_num}), probably an unbalanced quote.")
        rows.append(row)


def _image_path(folder: Path, relative: str) -> str:
    """Image paths are relative to the prompt file; a file in a captions/ folder may name them relative to
    the dataset folder above it (the testbed writes captions/memorized.csv with images/memorized/000.png)."""
    for base in (folder, folder.parent):
        if (base / relative).is_file():
            return str((base / relative).resolve())
    return str((folder / relative).resolve())


def _read_jsonl(path: Path, text: str) -> PromptList:
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemPruneError(f"Prompt file '{path}' line {line_number} is not valid JSON: {exc.msg}.") from exc
        if isinstance(record, str):
            record = {"prompt": record}
        key = _first_present(record, CAPTION_COLUMNS) if isinstance(record, dict) else None
        if key is None:
            raise MemPruneError(f"Prompt file '{path}' line {line_number} has no caption/prompt/text field.")
        records.append(record)
    label_key = _first_present(records[0], LABEL_COLUMNS) if records else None
    return PromptList(
        prompts=[str(r[_first_present(r, CAPTION_COLUMNS)]).strip() for r in records],
        source=str(path),
        labels=[str(r.get(label_key, "")) for r in records] if label_key else None,
    )


def read_prompts(path: str | Path, label: str | None = None) -> PromptList:
    """Read a prompt file; `label` keeps only rows with that label (e.g. "VM")."""
    path = Path(path)
    if not path.is_file():
        raise MemPruneError(f"Prompt file '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MemPruneError(f"Prompt file '{path}' is not UTF-8 text.") from exc
    suffix = path.suffix.lower()
    if suffix == ".csv":
        prompts = _read_csv(path, text)
    elif suffix in (".jsonl", ".json"):
        prompts = _read_jsonl(path, text)
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        prompts = PromptList(prompts=lines, source=str(path))
    if label is not None:
        if prompts.labels is None:
            raise MemPruneError(f"Prompt file '{path}' has no label column, so it cannot be filtered by '{label}'.")
        prompts = prompts.subset([i for i, value in enumerate(prompts.labels) if value == label])
        if len(prompts) == 0:
            raise MemPruneError(f"Prompt file '{path}' holds no prompts with label '{label}'.")
    if len(prompts) == 0:
        raise MemPruneError(f"Prompt file '{path}' holds no prompts: give at least one caption.")
    if not any(prompts.prompts):  # captions are stripped: every row is empty or blank
        raise MemPruneError(f"Prompt file '{path}' holds only empty captions ({len(prompts)} rows): give at least one "
                            "caption.")
    return prompts


def require_available(count: int | None, available: int, option: str, what: str = "prompts") -> None:
    """Refuse asking for more prompts than there are, rather than silently using fewer: every command that takes a
    count of prompts (locate's --num-prompts and --subset-size, attack's --num-prompts) says it the same way."""
    if count is not None and count > available:
        raise MemPruneError(f"{option} {count} is more than the {available} {what}: give at most {available}.")


def normalise_caption(prompt: str) -> str:
    """A caption as captions are compared for overlap: whitespace collapsed, case-folded."""
    return " ".join(prompt.split()).casefold()


def overlapping_captions(captions: list[str], others: list[str]) -> list[int]:
    """Positions in `captions` of the captions that repeat one of `others` (after normalise_caption)."""
    normalised = {normalise_caption(p) for p in others}
    return [index for index, prompt in enumerate(captions) if normalise_caption(prompt) in normalised]


def seeded_subsets(n_items: int, n_subsets: int, size: int, seed: int = 0) -> list[list[int]]:
    """N random subsets of `size` indices, drawn without replacement inside each subset; same seed, same subsets."""
    if size > n_items:
        raise MemPruneError(f"Subset size {size} is larger than the {n_items} prompts available.")
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(n_items, size=size, replace=False).tolist()) for _ in range(n_subsets)]


def split_located(prompts: PromptList, size: int = 10, seed: int = 0) -> tuple[PromptList, PromptList]:
    """A seeded sample of `size` prompts to locate on, and the rest: the claim is about the rest (held out)."""
    located = seeded_subsets(len(prompts), 1, size, seed=seed)[0]
    chosen = set(located)
    return prompts.subset(located), prompts.subset([i for i in range(len(prompts)) if i not in chosen])


def write_prompts(prompts: list[str], path: str | Path) -> None:
    """A one-column `caption` CSV that read_prompts reads back (locate's prompts_used.csv)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["caption"])
        writer.writerows([prompt] for prompt in prompts)
