"""Evaluations of synthesis and registration: the paper's table, the protocol study, their statistics.

Modules:
  stats     seeds, finiteness, paired tests (Wilcoxon signed-rank, paired bootstrap CI) and effect sizes.
  images    one PCA, the TIC image, NCC, grey levels, block reduction.
  paper     the paper's evaluation at CPU size (experiments/evaluate.py).
  ridge     a closed-form ridge regression baseline (MSI features → RGB).
  rough     training from rough alignments: train → synthesise → register → rebuild pairs, k rounds.
  bladder   the real msight bladder pair: loading, spatial split, perturbed-start registration.
  study     the whole study (experiments/study.py): the benchmark and the real pair under the protocol.
"""
