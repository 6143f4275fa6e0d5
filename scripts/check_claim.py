"""Say plainly whether the demo shows what the paper claims: memorization of the memorized prompts outside the
located subset from >= 90% to <= 10%, attribute accuracy within 5 points, seconds per image unchanged."""
import sys

import pandas as pd


def value(metrics, model, group, metric):
    row = metrics[(metrics.model == model) & (metrics.group == group) & (metrics.metric == metric)]
    return float(row.value.iloc[0]) if len(row) else float("nan")


def main(path: str) -> int:
    metrics = pd.read_csv(path)
    before = value(metrics, "unedited", "memorized_held_out", "memorization_rate")
    after = value(metrics, "edited", "memorized_held_out", "memorization_rate")
    accuracy = (value(metrics, "unedited", "general", "attribute_accuracy"),
                value(metrics, "edited", "general", "attribute_accuracy"))
    cost = value(metrics, "edited", "memorized", "seconds_per_image_ratio")
    checks = [
        (f"held-out memorization {before:.1%} -> {after:.1%} (claim: >= 90% -> <= 10%)", before >= 0.9 and after <= 0.1),
        (f"attribute accuracy {accuracy[0]:.1%} -> {accuracy[1]:.1%} (claim: within 5 points)",
         abs(accuracy[1] - accuracy[0]) <= 0.05),
        (f"seconds per image edited/unedited {cost:.2f} (claim: unchanged; pruning adds no work)", abs(cost - 1) <= 0.1),
    ]
    for text, ok in checks:
        print(f"[{'holds' if ok else 'DOES NOT HOLD'}] {text}")
    verdict = all(ok for _, ok in checks)
    print("The paper's claim " + ("holds on this model." if verdict else
                                  "does NOT hold on this model: see data/testbed/MODEL_CARD.md for what was measured."))
    return 0  # the demo reports; it is not a test to pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
