"""Robustness of classifiers: accuracy under FGSM, PGD (Linf, L2) and AutoAttack on a seeded subset of a split.

``evaluate_robustness(loaded, data, attacks=("pgd", "autoattack"), eps=("8/255",))`` is what ``convforge
robust`` runs; the attacks themselves are in :mod:`convforge.measure.attacks` and
:mod:`convforge.measure.autoattack`.
"""

from convforge.robust.evaluation import ATTACKS, NORMS
from convforge.robust.runner import evaluate_robustness

__all__ = ["ATTACKS", "NORMS", "evaluate_robustness"]
