"""Evaluation attacks: L-inf PGD (CE or CW margin loss, restarts) and clean/robust accuracy.

``pgd_attack`` and ``evaluate`` put the model in eval mode (restoring its modes afterwards) and take
input gradients only, so they can run between training steps without disturbing the optimiser.
"""

from apart_fast.attacks.pgd import LOSSES, ce_loss, cw_loss, eval_mode, evaluate, pgd_attack

__all__ = ["LOSSES", "ce_loss", "cw_loss", "eval_mode", "evaluate", "pgd_attack"]
