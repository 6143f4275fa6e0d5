"""Evaluation of edited models: memorization, diversity, utility, detection and cost, all on the same seeds.

- ``settings``: EvaluateSettings, what a run is asked to do;
- ``inputs``: the edited models' provenance and the prompt files read into groups;
- ``run``: ``evaluate()``, which generates every prompt file with every model and returns an EvaluationResult;
- ``scoring``: from images to the per-generation table and the tidy metrics (thresholds, copies, detection);
- ``metrics``: the primitives (copy threshold, memorization rate, diversity, attribute accuracy);
- ``classifier``: the attribute classifier; ``mitigation``: the ``--mitigation`` column;
- ``schema``: the names and order of metrics.csv; ``report``: markdown and summary text.

`memprune evaluate` (memprune.commands.evaluate) fills the testbed's default prompt files and writes the folder.
This package imports nothing here so that readers of ``schema`` do not load the evaluation.
"""
