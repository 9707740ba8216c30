"""How far a world model drifts from real trajectories: open-loop rollouts from replay
states under the actions actually taken, compared with what the env did."""

from __future__ import annotations

import torch

from mbvi.variational.world_model import WorldModel


def chained_starts(obs: torch.Tensor, next_obs: torch.Tensor, term: torch.Tensor, h: int):
    """Indices i (oldest-first rows) where transitions i..i+h-1 follow each other in
    one episode: next_obs[k] == obs[k+1] and no termination before the last."""
    n = obs.shape[0]
    if n < h:
        return torch.zeros(0, dtype=torch.long, device=obs.device)
    link = torch.zeros(n, dtype=torch.long, device=obs.device)
    if n > 1:
        link[:-1] = ((next_obs[:-1] == obs[1:]).all(-1) & (term[:-1] == 0)).long()
    # broken[k] counts the broken links among the first k; a start i needs
    # links i..i+h-2 intact.
    broken = torch.cat([link.new_zeros(1), torch.cumsum(1 - link, 0)])
    i = torch.arange(n - h + 1, device=obs.device)
    return i[broken[i + h - 1] - broken[i] == 0]


@torch.no_grad()
def open_loop_errors(
    model: WorldModel, replay, horizons=(1, 5, 10), n_starts: int = 256
) -> dict[str, float]:
    """``model/rollout_mse_h{h}``: the mean over state dims of the squared error of the
    model's mean prediction (``expectation`` propagation) h steps ahead under the
    replayed actions, divided by each dim's variance in the buffer (1.0 is as bad as
    predicting the mean state).  Starts are spread evenly over the chained windows of
    the longest horizon (no random draws: training's streams stay untouched);
    horizons that no window covers are left out."""
    obs, act, _, next_obs, term = replay.transitions()
    out: dict[str, float] = {}
    longest = max(horizons)
    starts = chained_starts(obs, next_obs, term, longest)
    if starts.numel() == 0:
        return out
    starts = starts[torch.linspace(0, starts.numel() - 1, min(n_starts, starts.numel())).long()]
    var = next_obs.var(0).clamp_min(1e-8)
    s = obs[starts]
    for t in range(longest):
        s = model.step(s, act[starts + t], "expectation").next_state
        if t + 1 in horizons:
            err = (s - next_obs[starts + t]).pow(2) / var
            out[f"model/rollout_mse_h{t + 1}"] = float(err.mean())
    return out
