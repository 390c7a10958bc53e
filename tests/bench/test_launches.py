"""The launch counter: one per kernel-running leaf aten call, none for views, allocations or host-only ops."""

from __future__ import annotations

import torch

from apart_fast.bench.launches import count_launches

CPU = torch.device("cpu")


def test_counts_kernels_not_views():
    x, ok = torch.randn(8, 4), torch.tensor(True)
    assert count_launches(lambda: x.view(-1).t().reshape(4, 8), CPU)["total"] == 0
    assert count_launches(lambda: torch.empty(5), CPU)["total"] == 0
    assert count_launches(lambda: x.clone(), CPU)["total"] == 1  # clone -> empty_like + copy_: the copy
    assert count_launches(lambda: torch.where(ok, x, x), CPU)["total"] == 1  # allocates its output: still a leaf
    res = count_launches(lambda: [x.add(x) for _ in range(3)], CPU)
    assert res["total"] == 3 and res["by_op"] == {"aten::add": 3}


def test_by_source_names_the_apart_fast_function():
    from apart_fast.step.guard import finite_flag

    loss, grads = torch.tensor(1.0), [torch.ones(3)]
    res = count_launches(lambda: finite_flag(loss, grads), CPU, stacks=True)
    assert res["by_source"] == {"step/guard.py:finite_flag": res["total"]} and res["total"] == 3
