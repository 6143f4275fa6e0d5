"""Say plainly whether the demo shows what the paper claims, beside its control: memorization of the memorized
prompts outside the located subset from >= 90% to <= 10%, and far below a random mask of the same size (the
located subspace, not just any weights); attribute accuracy within 5 points; seconds per image unchanged."""
import math
import sys

import pandas as pd

from memprune.model_card import CARD_METRICS
from memprune.model_card import metric_value as value

MODELS = ("unedited", "edited", "random_control")
ROWS = CARD_METRICS  # the rows a pruned folder's model card shows: one table for both
MARGIN = 0.2  # the edit must beat its random control by this much held-out memorization to count as located


def table(metrics) -> str:
    width = max(len(label) for _, _, label, _ in ROWS) + 2
    lines = [" " * width + "".join(f"{m:>16s}" for m in MODELS)]
    for group, metric, label, percent in ROWS:
        cells = [value(metrics, m, group, metric) for m in MODELS]
        if all(math.isnan(v) for v in cells):
            continue
        text = ["" if math.isnan(v) else (f"{v:.1%}" if percent else f"{v:.3f}") for v in cells]
        lines.append(f"{label:{width}s}" + "".join(f"{t:>16s}" for t in text))
    return "\n".join(lines)


def main(path: str) -> int:
    metrics = pd.read_csv(path)
    print(table(metrics))
    print()
    rate = lambda model, metric="memorization_rate": value(metrics, model, "memorized_held_out", metric)  # noqa: E731
    before, after, control = rate("unedited"), rate("edited"), rate("random_control")
    strict_after = rate("edited", "memorization_rate_strict")
    strict_control = rate("random_control", "memorization_rate_strict")
    accuracy = (value(metrics, "unedited", "general", "attribute_accuracy"),
                value(metrics, "edited", "general", "attribute_accuracy"))
    cost = value(metrics, "edited", "memorized", "seconds_per_image_ratio")
    checks = [
        (f"held-out memorization {before:.1%} -> {after:.1%} (claim: >= 90% -> <= 10%)",
         before >= 0.9 and after <= 0.1),
        (f"the edit beats a random mask of the same size: {after:.1%} vs {control:.1%} (strict threshold: "
         f"{strict_after:.1%} vs {strict_control:.1%}; claim: at least {MARGIN:.0%} lower under both)",
         not math.isnan(control) and control - after >= MARGIN and strict_control - strict_after >= MARGIN),
        (f"attribute accuracy {accuracy[0]:.1%} -> {accuracy[1]:.1%} (claim: within 5 points)",
         abs(accuracy[1] - accuracy[0]) <= 0.05),
        (f"seconds per image edited/unedited {cost:.2f} (claim: unchanged; pruning adds no work)",
         abs(cost - 1) <= 0.1),
    ]
    for text, ok in checks:
        print(f"[{'holds' if ok else 'DOES NOT HOLD'}] {text}")
    if math.isnan(control):
        print("No random control in this evaluation (--no-random-control?): the edit cannot be told from any edit.")
    verdict = all(ok for _, ok in checks)
    print("The paper's claim " + ("holds on this model." if verdict else
                                  "does NOT hold on this model: see data/testbed/MODEL_CARD.md for what was measured."))
    return 0  # the demo reports; it is not a test to pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
