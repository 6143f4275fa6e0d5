"""The comparison table: one row per (model, group, metric), values taken from the right source, duplicates refused."""
import pandas as pd
import pytest

from memprune.compare import comparison_markdown, comparison_metrics, comparison_table
from memprune.errors import MemPruneError


def tidy(rows):
    return pd.DataFrame(rows, columns=["model", "group", "metric", "value"])


EVALUATION = tidy([
    ("unedited", "memorized_held_out", "memorization_rate", 0.925),
    ("unedited", "memorized_held_out", "copy_similarity", 0.55),
    ("wanda", "memorized_held_out", "memorization_rate", 0.55),
    ("wanda", "memorized", "seconds_per_image_ratio", 1.02),
    ("wanda", "general", "attribute_accuracy", 0.844),
    ("wen", "memorized", "seconds_per_image_ratio", 3.5),
])
ATTACK = tidy([
    ("unedited", "memorized_held_out", "memorization_rate", 0.9),  # the attack's own baseline: evaluate's wins
    ("unedited", "memorized_held_out", "memorization_rate_attacked", 1.0),
    ("wanda", "memorized_held_out", "memorization_rate_attacked", 0.8),
])


def test_comparison_has_one_row_per_model_group_metric():
    metrics = comparison_metrics(EVALUATION, ATTACK, {"wanda": 12.5, "unedited": 0.0})
    assert not metrics.duplicated(["model", "group", "metric"]).any()
    assert len(metrics) == len(EVALUATION) + 2 + 2  # two attacked rows, two edit_seconds rows
    value = metrics.set_index(["model", "group", "metric"]).value
    assert value["unedited", "memorized_held_out", "memorization_rate"] == 0.925
    assert value["wanda", "edit", "edit_seconds"] == 12.5


def test_duplicated_key_is_refused_with_its_name():
    doubled = pd.concat([EVALUATION, EVALUATION.iloc[:1]])
    with pytest.raises(MemPruneError, match="model 'unedited', group 'memorized_held_out', metric 'memorization_rate'"):
        comparison_metrics(doubled)


def test_non_tidy_input_is_refused():
    with pytest.raises(MemPruneError, match="no column 'value'"):
        comparison_metrics(EVALUATION.drop(columns="value"))


def test_table_rows_follow_models_and_drop_empty_columns():
    metrics = comparison_metrics(EVALUATION, ATTACK, {"wanda": 12.5})
    table = comparison_table(metrics, ["unedited", "wanda", "wen"], {"wanda": "Wanda 0.1"})
    assert list(table.index) == ["unedited", "Wanda 0.1", "wen"]
    assert table.loc["Wanda 0.1", "memorization under attack"] == 0.8
    assert table.loc["wen", "s / image vs unedited"] == 3.5
    assert "held-out memorization (strict)" not in table.columns  # no model has it
    text = comparison_markdown(table)
    assert "| Wanda 0.1 | 55.0% |" in text and "3.50×" in text and "| 12 |" in text  # 12.5 s, to the second
    assert text.count("\n") == 2 + 3
