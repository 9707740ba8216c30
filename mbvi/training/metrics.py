"""Training metrics between logger flushes: summed on the device, read once."""

from __future__ import annotations

import math

import torch

from mbvi.errors import NonFiniteError


class RunningMeans:
    """Running sums of scalar metric tensors (detached, on the training device).

    ``add`` never syncs with the host, so the hot path never waits for a ``.item()``;
    ``means`` reads every sum in one transfer and checks it is finite.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self.count += 1

    def means(self, env_step: int) -> dict[str, float]:
        """Mean of each metric since the last ``reset`` ({} if nothing was added).

        Raises ``NonFiniteError`` naming the first quantity that is NaN or Inf and
        ``env_step``, the step it was noticed at.
        """
        if not self.count:
            return {}
        names = list(self._sums)
        values = (torch.stack([self._sums[name] for name in names]) / self.count).tolist()
        for name, value in zip(names, values, strict=True):
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"{name} became NaN or Inf by env step {env_step}; training stopped. "
                    "Try a lower learning rate or check the scale of the rewards."
                )
        return dict(zip(names, values, strict=True))

    def reset(self) -> None:
        self._sums, self.count = {}, 0
