"""DeviceSchedule's table gives CyclicSchedule's lr and momentum (as float32) at every step, past the end too."""

from __future__ import annotations

import torch

from apart_fast.bench.launches import count_launches
from apart_fast.step.optim import DeviceSGD
from apart_fast.step.schedule import CyclicSchedule, DeviceSchedule


def test_device_schedule_follows_cyclic_schedule_past_the_end():
    a, b = [torch.zeros(3)], [torch.zeros(3)]
    ref = CyclicSchedule(torch.optim.SGD(a, lr=0.0, momentum=0.9), 7, 0.3, (0.95, 0.85))
    dev = DeviceSchedule(DeviceSGD(b, lr=0.0, momentum=0.9), 7, 0.3, (0.95, 0.85))
    for _ in range(10):
        group = ref.optimizer.param_groups[0]
        assert float(dev.lr) == float(torch.tensor(group["lr"], dtype=torch.float32))
        assert float(dev.momentum) == float(torch.tensor(group["momentum"], dtype=torch.float32))
        assert dev.optimizer.lr_t is dev.lr
        ref.step()
        dev.step()
    assert dev.state_dict() == ref.state_dict() == {"t": 10}
    dev.load_state_dict({"t": 3})
    ref.load_state_dict({"t": 3})
    assert float(dev.lr) == float(torch.tensor(ref.optimizer.param_groups[0]["lr"], dtype=torch.float32))
    assert count_launches(dev.step, torch.device("cpu"))["total"] == 3
