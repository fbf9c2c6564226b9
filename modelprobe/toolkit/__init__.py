"""The kind toolkit: what a claim kind is made of, so that a new kind is one short module.

- `prompts`: data rows checked field by field, seeded splits, encoding with a context-length check,
  answer / grader tokens checked against the vocabulary;
- `metrics`: logit difference, log-probability, probability, rank, accuracy, KL, faithfulness;
- `behaviour`: generate under interventions, grade, base rates, the "cannot be tested" rule;
- `steering`: ready-made residual-stream interventions (directional ablation, addition);
- `activations`: states at one token of each prompt, and their mean (concept / function vectors,
  patching sources);
- `controls`: random directions / vectors of the same norm, random circuits, random sources,
  shuffled labels, and the one alpha and p-value convention;
- `ablation_task`: prompts with one-token answers and aligned reference prompts, for ablation runs.

Layering: spec, stats and subject sit below; kinds sit above; nothing here imports a kind or the
report writers. Modules import torch lazily so that spec classes load without it.
"""
