"""Evaluation attacks: L-inf PGD (CE or CW margin loss, restarts), AutoAttack, gradient-masking checks, curves.

``pgd_attack``, ``evaluate`` and ``autoattack`` put the model in eval mode (restoring its modes
afterwards) and take input gradients only, so they can run between training steps without
disturbing the optimiser. ``autoattack`` needs the ``[eval]`` extra (torchattacks); the rest does not.
"""

from apart_fast.attacks.autoattack import MissingExtraError, autoattack, evaluate_autoattack
from apart_fast.attacks.curves import plot_curves, robustness_curve
from apart_fast.attacks.pgd import LOSSES, ce_loss, cw_loss, eval_mode, evaluate, pgd_attack
from apart_fast.attacks.sanity import format_checks, sanity_checks

__all__ = ["LOSSES", "MissingExtraError", "autoattack", "ce_loss", "cw_loss", "eval_mode", "evaluate",
           "evaluate_autoattack", "format_checks", "pgd_attack", "plot_curves", "robustness_curve", "sanity_checks"]
