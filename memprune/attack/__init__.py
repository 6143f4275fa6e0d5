"""`memprune attack`: does an edit survive an attacker? A DoRI-style adversarial-embedding robustness check.

- ``embedding``: the attack on one prompt (a bounded perturbation of its text embedding toward its training image)
  and generation from an embedding;
- ``run``: every memorized prompt on the unedited and every edited model, the copy threshold, the metrics;
- ``text_side``: the check that every attacked model shares the base model's tokenizers and text encoders.

memprune.commands.attack fills the testbed's default prompt files and writes the output folder.
"""
