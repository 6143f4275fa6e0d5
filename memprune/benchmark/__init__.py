"""`memprune benchmark`: every arm of an arms file (methods from the registry with their settings) built on one
model, each weight edit beside its random control, one evaluate and one attack over all, one joined table.

- arms: the arms file (TOML), checked whole before any model loads;
- state: the benchmark folder and its state file, what `--resume` skips;
- run: building the arms, the evaluate and attack stages, the joined table;
- plot: comparison.png.
"""
