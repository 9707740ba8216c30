"""RunningMeans (the agent's metrics between flushes) and fused_adam's grouping."""

from __future__ import annotations

import pytest
import torch

from mbvi.errors import NonFiniteError
from mbvi.training.metrics import RunningMeans
from mbvi.training.optim import fused_adam


def test_running_means_average_since_the_last_reset():
    means = RunningMeans()
    assert means.means(env_step=0) == {}
    means.add({"loss/value": torch.tensor(1.0), "train/q": torch.tensor(-2.0)})
    means.add({"loss/value": torch.tensor(3.0), "train/q": torch.tensor(4.0)})
    assert means.means(env_step=2) == {"loss/value": 2.0, "train/q": 1.0}
    means.reset()
    means.add({"loss/value": torch.tensor(5.0)})
    assert means.means(env_step=3) == {"loss/value": 5.0}


def test_running_means_name_the_non_finite_quantity_and_step():
    means = RunningMeans()
    means.add({"loss/value": torch.tensor(1.0), "loss/engine": torch.tensor(float("nan"))})
    with pytest.raises(NonFiniteError, match=r"loss/engine became NaN or Inf by env step 7"):
        means.means(env_step=7)


def test_fused_adam_groups_parts_by_learning_rate():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = fused_adam([([a], 3e-4), ([b], 1e-3), ([c], 3e-4), ([], 1e-2)])
    groups = {g["lr"]: g["params"] for g in opt.param_groups}
    assert set(groups) == {3e-4, 1e-3}
    assert groups[3e-4] == [a, c] and groups[1e-3] == [b]
