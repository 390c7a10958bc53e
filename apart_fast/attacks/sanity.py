"""Gradient-masking checks (Athalye, Carlini and Wagner 2018; Carlini et al. 2019, "On evaluating adversarial
robustness"): signs that a PGD number overstates robustness, each a pass/fail with its numbers.

1. ``large_eps``: accuracy falls to (near) zero as eps grows to a large budget (an attack that cannot
   reach a misclassification with a huge budget is not following the model's gradient);
2. ``more_steps`` and ``more_restarts``: PGD-100 and PGD-20 with restarts never score *higher* than PGD-20;
3. ``black_box``: Square (query-only, no gradients) is not stronger than white-box PGD-20;
4. ``fgsm``: single-step FGSM is not stronger than PGD-20;
5. ``autoattack_gap``: AutoAttack and PGD-20 differ by at most ``aa_margin`` (10 points).

"PGD-20" in 3 and 5 is the stronger of CE-loss and CW-loss PGD-20, the two the project reports: CE
alone saturates on confident models (on the digits FGSM-RS model it reads 0.53 where CW reads 0.45
and AutoAttack 0.40), which is a weak loss, not masking.

"Not stronger" and "never higher" allow ``tol`` (default 1 point plus 2/n) for the attacks' randomness.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from apart_fast.attacks.autoattack import SQUARE_QUERIES, evaluate_autoattack
from apart_fast.attacks.curves import eps_grid
from apart_fast.attacks.pgd import evaluate

NEAR_ZERO = 0.05  # large_eps passes when accuracy at the largest budget is at most this
LARGE_EPS = 0.5  # the largest budget of the large_eps check (half the image range)
AA_MARGIN = 0.10  # autoattack_gap passes when |AutoAttack - PGD-20| is at most this


@dataclass
class Check:
    """One sanity check: its verdict, the numbers behind it, the rule it applies and what a failure suggests."""

    name: str
    passed: bool
    numbers: dict[str, Any]
    rule: str
    hint: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One table line: PASS/FAIL, name, numbers, and the hint when it failed."""
        nums = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.numbers.items())
        text = f"{'PASS' if self.passed else 'FAIL'}  {self.name:<15} {nums}  [{self.rule}]"
        return text + (f"\n      -> {self.hint}" if not self.passed else "")


def sanity_checks(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, step: float | None = None, seed: int = 0,
                  batch_size: int = 256, tol: float | None = None, aa_margin: float = AA_MARGIN,
                  near_zero: float = NEAR_ZERO, large_eps: float = LARGE_EPS, aa_steps: int = 100,
                  square_queries: int = SQUARE_QUERIES, restarts: int = 5, backend: str = "auto",
                  progress: bool = False) -> dict[str, Any]:
    """Run the six gradient-masking checks on ``(x, y)`` at budget ``eps`` on the model's device; ``step``
    defaults to eps/4.

    Returns ``{"passed": bool, "checks": [Check as dict, ...], "settings": {...}}``.
    """
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1] (images are in [0, 1]), got {eps}")
    if not eps < large_eps <= 1.0:
        raise ValueError(f"large_eps must be in (eps={eps:.4g}, 1], got {large_eps}")
    n = int(x.shape[0])
    step = eps / 4 if step is None else step
    tol = 0.01 + 2.0 / max(n, 1) if tol is None else tol
    kw: dict[str, Any] = dict(batch_size=batch_size, seed=seed, backend=backend)

    def pgd(e: float, steps: int, restarts: int = 1, loss: str = "ce") -> float:
        """PGD accuracy at budget ``e`` (step ``step`` at eps, else e/4)."""
        return evaluate(model, x, y, eps=e, step=step if e == eps else e / 4, steps=steps, restarts=restarts,
                        loss=loss, **kw)["robust_acc"]

    clean = evaluate(model, x, y, steps=0, **kw)["clean_acc"]
    pgd20 = pgd(eps, 20)
    white = min(pgd20, pgd(eps, 20, loss="cw"))  # the stronger of CE and CW PGD-20
    checks: list[Check] = []

    grid = [e for e in eps_grid(eps, large_eps) if e > eps]
    curve = {f"{e:.4g}": pgd(e, 50) for e in grid}
    at_large = curve[f"{grid[-1]:.4g}"]
    checks.append(Check("large_eps", at_large <= near_zero, {f"PGD-50 at eps {grid[-1]:.3g}": at_large},
                        f"<= {near_zero:g}",
                        "accuracy does not fall to zero with a huge budget: the attack is not following the model's "
                        "gradient (masked or obfuscated gradients), or the model is (nearly) constant",
                        {"pgd50_acc_by_eps": curve}))

    pgd100 = pgd(eps, 100)
    checks.append(Check("more_steps", pgd100 <= pgd20 + tol, {"PGD-20": pgd20, "PGD-100": pgd100},
                        f"PGD-100 <= PGD-20 + {tol:.3f}",
                        "more iterations raised accuracy: the loss surface is not followed (masked gradients, or a "
                        "stochastic/randomised model)"))
    pgd_r = pgd(eps, 20, restarts=restarts)
    checks.append(Check("more_restarts", pgd_r <= pgd20 + tol, {"PGD-20": pgd20, f"PGD-20 x{restarts}": pgd_r},
                        f"PGD-20 x{restarts} <= PGD-20 + {tol:.3f}",
                        "restarts raised accuracy: the model's output is randomised; use EOT or a deterministic model"))

    square = evaluate_autoattack(model, x, y, eps, seed=seed, batch_size=batch_size, square_queries=square_queries,
                                 attacks=("square",), progress=progress)["robust_acc"]
    checks.append(Check("black_box", square >= white - tol,
                        {"PGD-20 (CE/CW)": white, f"Square-{square_queries}": square},
                        f"Square >= PGD-20 - {tol:.3f}",
                        "a black-box attack beats the white-box one: white-box gradients look masked; trust the "
                        "black-box / AutoAttack number, not PGD"))

    fgsm = evaluate(model, x, y, eps=eps, step=eps, steps=1, random_start=False, **kw)["robust_acc"]
    checks.append(Check("fgsm", fgsm >= pgd20 - tol, {"PGD-20": pgd20, "FGSM": fgsm}, f"FGSM >= PGD-20 - {tol:.3f}",
                        "single-step FGSM beats PGD-20: the iterative attack is stuck (gradient masking near the "
                        "data, or too small a step)"))

    aa = evaluate_autoattack(model, x, y, eps, steps=aa_steps, seed=seed, batch_size=batch_size,
                             progress=progress)
    gap = white - aa["robust_acc"]
    checks.append(Check("autoattack_gap", abs(gap) <= aa_margin,
                        {"PGD-20 (CE/CW)": white, "AutoAttack": aa["robust_acc"], "gap": gap}, f"|gap| <= {aa_margin:g}",
                        "PGD-20 overstates robustness against AutoAttack: report the AutoAttack number; a large gap "
                        "is a sign of masked gradients" if gap > 0 else
                        "AutoAttack is weaker than PGD-20: check the attack settings (eps, steps) and the input range"))
    return {"passed": all(c.passed for c in checks), "clean_acc": clean, "n": n,
            "checks": [asdict(c) for c in checks],
            "settings": {"eps": eps, "step": step, "tol": tol, "aa_margin": aa_margin, "near_zero": near_zero,
                         "large_eps": large_eps, "restarts": restarts, "seed": seed, "autoattack": aa["settings"]}}


def format_checks(report: dict[str, Any]) -> str:
    """The checks as PASS/FAIL lines with their numbers, the rule and, for failures, what they suggest."""
    lines = [f"Sanity checks on {report['n']} points (clean accuracy {report['clean_acc']:.3f}):"]
    lines += [Check(**c).line() for c in report["checks"]]
    lines.append("all checks passed" if report["passed"] else "SOME CHECKS FAILED: the robust accuracy is not to be trusted")
    return "\n".join(lines)


__all__ = ["AA_MARGIN", "Check", "LARGE_EPS", "NEAR_ZERO", "format_checks", "sanity_checks"]
