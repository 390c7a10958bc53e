"""``evaluate_checkpoint`` (``apart-fast eval``): a seeded random test subset with standard errors."""

from __future__ import annotations

import math

from apart_fast.config import Config
from apart_fast.engine.loop import train
from apart_fast.experiments import evaluate_checkpoint


def test_eval_subset_is_seeded_random_with_standard_errors(tmp_path):
    train(Config(method="clean", dataset="digits", epochs=1, eval_n=0, final_eval_steps=0, device="cpu",
                 out=str(tmp_path)), progress=False)
    kw = dict(dataset="digits", eps=0.1, step=0.025, steps=2, loss="ce", device="auto")
    a = evaluate_checkpoint(str(tmp_path / "model.pt"), n=100, **kw)
    b = evaluate_checkpoint(str(tmp_path / "model.pt"), n=100, **kw)
    assert a["n"] == 100 and a["test_points"] == "seeded random subset (seed 0)" and a == b
    assert a["device"] == "cpu" or a["device"].startswith("cuda")
    p = a["pgd_ce_acc"]
    assert math.isclose(a["pgd_ce_se"], math.sqrt(p * (1 - p) / 100))
    assert evaluate_checkpoint(str(tmp_path / "model.pt"), **kw)["test_points"] == "all"


def test_attack_budget_follows_the_training_eps(tmp_path):
    """A run at --eps 0.1 trains PGD at step eps/4 and is scored at 0.1 (not 8/255), in training and by eval."""
    cfg = Config(eps=0.1).resolved()
    assert (cfg.pgd_step, cfg.eval_eps, cfg.eval_step) == (0.025, 0.1, 0.025)
    assert Config(eps=0.1, eval_eps=0.05).resolved().eval_step == 0.0125
    kept = Config(eps=0.1, pgd_step=0.01, eval_eps=0.05, eval_step=0.02).resolved()
    assert (kept.pgd_step, kept.eval_eps, kept.eval_step) == (0.01, 0.05, 0.02)
    res = train(Config(method="clean", dataset="synthetic", model="smallcnn", width=4, epochs=1, eps=0.1, eval_n=0,
                       final_eval_steps=1, device="cpu", out=str(tmp_path)), progress=False)
    assert res["eval"].endswith("eps 0.1")
    ev = evaluate_checkpoint(str(tmp_path / "model.pt"), steps=1, loss="ce", device="cpu")
    assert (ev["dataset"], ev["eps"], ev["eps_source"]) == ("synthetic", 0.1, "the training run's --eval-eps")
    assert ev["settings"]["pgd_ce"]["step"] == 0.025
    given = evaluate_checkpoint(str(tmp_path / "model.pt"), dataset="synthetic", eps=8 / 255, steps=1, loss="ce",
                                device="cpu")
    assert (given["eps_source"], given["settings"]["pgd_ce"]["step"]) == ("--eps", 2 / 255)


def test_trained_model_comes_back_without_gradients():
    """train() hands back the model with no .grad left from its last step (a user's backward starts from zero)."""
    res = train(Config(method="fgsm_rs", dataset="synthetic", model="smallcnn", width=4, epochs=1, eval_n=0,
                       final_eval_steps=0, device="cpu"), progress=False)
    assert all(p.grad is None for p in res["model"].parameters())



def test_training_cpu_time_leaves_out_what_happens_outside_the_process(monkeypatch):
    """A step stalled outside the process (a sleep: wall time passes, no CPU time) adds to train_seconds only."""
    import time

    from apart_fast.methods.clean import Clean

    perturb = Clean.perturb
    monkeypatch.setattr(Clean, "perturb", lambda self, batch: (time.sleep(0.1), perturb(self, batch))[1])
    monkeypatch.setenv("APART_FAST_PROBE", "0")
    res = train(Config(method="clean", dataset="synthetic", width=4, batch_size=64, epochs=1, eval_n=0, final_eval_steps=0,
                       device="cpu"), progress=False)
    assert res["train_seconds"] > 1.5 and res["train_cpu_seconds"] < res["train_seconds"] - 1.2, res


def test_demo_cost_column_divides_cpu_times_so_a_busy_machine_does_not_skew_it(monkeypatch):
    """The demo's runs are made one after another: a run slowed by other jobs (wall time up, CPU time not) keeps its cost."""
    import apart_fast.engine.loop as loop
    from apart_fast.experiments import demo
    from apart_fast.report.evaluation import format_table

    times = {"clean": (30.0, 1.0), "pgd": (10.0, 8.0)}  # (wall, CPU) seconds: clean ran beside another job

    def fake_train(cfg, **kw):
        wall, cpu = times[cfg.method]
        return {"test_clean_acc": 0.9, "test_robust_acc": 0.1, "train_seconds": wall, "train_cpu_seconds": cpu,
                "eval": "PGD-20x1", "device": "cpu"}

    monkeypatch.setattr(loop, "train", fake_train)
    rows = demo(["clean", "pgd"], epochs=1, device="cpu")
    assert [(r["seconds"], r["vs_pgd10"]) for r in rows] == [(30.0, 0.125), (10.0, 1.0)]
    table = format_table(rows)
    assert "| clean | 0.900 | 0.100 | 30.0 | 0.12x |" in table and "cost vs PGD-10: training's process CPU time" in table


def test_demo_trains_one_thread_on_the_cpu_and_restores_the_count(monkeypatch):
    """CPU time of a multi-threaded process counts spin-waits for a busy core: the demo's cost column needs one thread."""
    import torch

    import apart_fast.engine.loop as loop
    from apart_fast.experiments import demo

    seen = []

    def fake_train(cfg, **kw):
        seen.append(torch.get_num_threads())
        return {"test_clean_acc": 0.9, "test_robust_acc": 0.1, "train_seconds": 1.0, "train_cpu_seconds": 1.0,
                "eval": "PGD-20x1", "device": "cpu"}

    monkeypatch.setattr(loop, "train", fake_train)
    torch.set_num_threads(2)
    demo(["clean", "pgd"], epochs=1, device="cpu")
    assert seen == [1, 1] and torch.get_num_threads() == 2
