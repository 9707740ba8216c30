"""Termination of imagined transitions: d = termination(s [M,S], a [M,A], s' [M,S]) -> [M],
a float in {0, 1} computed from the observation s' alone.

    termination, kind = termination_for_env(env)      # kind: never, rule or learned
    model.build(obs_dim, act_dim, termination)        # None: a learned head instead

Rules read every threshold from the env itself (``env.unwrapped``: ``_healthy_z_range``,
``_healthy_angle_range``, ``_healthy_state_range``, ``_terminate_when_unhealthy``) and
map its physics quantities to observation indices through ``observation_structure``,
so an env made with other ranges or ``exclude_current_positions_from_observation=False``
gets the matching rule. Two thresholds are constants in Gymnasium's own ``step`` (no
constructor argument): InvertedPendulum's 0.2 rad and InvertedDoublePendulum's 1 m.

| env | kind | terminated when (s' = the next observation) |
|---|---|---|
| Pendulum-v1 | never | never (``NeverTerminates``) |
| HalfCheetah, Swimmer, Reacher, Pusher, HumanoidStandup (v4, v5) | never | never |
| Hopper, Walker2d, Ant, Humanoid (v5) with ``terminate_when_unhealthy=False`` | never | never |
| Hopper-v5 | rule | z, torso angle or any of qpos[2:], qvel outside its open range |
| Walker2d-v5 | rule | z or torso angle outside its open range (exact) |
| Ant-v5 | rule | qpos/qvel part non-finite, or z outside its closed range (exact) |
| Humanoid-v5 | rule | z outside its open range (exact) |
| InvertedPendulum-v5 | rule | s' non-finite or pole angle outside [-0.2, 0.2] (exact) |
| InvertedDoublePendulum-v5 | rule | tip height <= 1 m (approximate, see ``TipHeight``) |
| anything else | learned | None: ``DynamicsEnsemble(learned_termination=True)`` |

Hopper's rule is exact unless a joint speed passes the observation's ±10 clip while the
healthy state range reaches beyond ±10 (the default (-100, 100) does; see ``_hopper``).
"Anything else" includes the v4 versions of the terminating envs, MountainCarContinuous
and user envs. Envs are told apart by their Gymnasium class, not their id, so an id
registered for one of these classes gets its rule; a subclass (which may change
``is_healthy``) gets a learned head.

"Exact" means the rule agrees with ``env.step``'s ``terminated`` on the env's float64
observations; in float32 a value within rounding of a threshold may fall either way.
Rules hold no parameters and no buffers (their thresholds are Python floats), so a
model's ``state_dict`` is the same with or without one and they run on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mbvi.errors import EnvError

_NEVER = {
    "gymnasium.envs.classic_control.pendulum.PendulumEnv",
    *(
        f"gymnasium.envs.mujoco.{module}_{v}.{cls}"
        for module, cls in (
            ("half_cheetah", "HalfCheetahEnv"),
            ("swimmer", "SwimmerEnv"),
            ("reacher", "ReacherEnv"),
            ("pusher", "PusherEnv"),
            ("humanoidstandup", "HumanoidStandupEnv"),
        )
        for v in ("v4", "v5")
    ),
}
_MUJOCO = "gymnasium.envs.mujoco."
_INVERTED_PENDULUM_MAX_ANGLE = 0.2  # InvertedPendulumEnv.step: |obs[1]| > 0.2 terminates
_DOUBLE_PENDULUM_MIN_TIP = 1.0  # InvertedDoublePendulumEnv.step: tip z <= 1 terminates


class NeverTerminates(nn.Module):
    """d = 0 for every row."""

    exact = True

    def forward(self, s: torch.Tensor, a: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        return s_next.new_zeros(s_next.shape[0])


@dataclass(frozen=True)
class Range:
    """Observation dims ``[start, stop)`` must lie in (low, high), or in [low, high]
    when ``closed``; ``name`` says which physical quantity they are."""

    name: str
    start: int
    stop: int
    low: float
    high: float
    closed: bool = False

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """[M] bool: every dim of ``x[:, start:stop]`` in range (False for NaN)."""
        v = x[:, self.start : self.stop]
        if self.closed:
            ok = (v >= self.low) & (v <= self.high)
        else:
            ok = (v > self.low) & (v < self.high)
        return ok.all(-1)


class HealthyRanges(nn.Module):
    """d = 1 unless every ``Range`` holds on s' (and s'[finite] is finite).

    Args:
        ranges: the healthy ranges of the env's ``is_healthy``, as observation dims.
        finite: observation dims ``(start, stop)`` that must all be finite, or None.
        exact: whether the rule reproduces the env's ``terminated`` exactly.
        note: where the rule may differ from the env, when not exact.
    """

    def __init__(
        self,
        ranges: list[Range],
        finite: tuple[int, int] | None = None,
        exact: bool = True,
        note: str = "",
    ):
        super().__init__()
        self.ranges = tuple(ranges)
        self.finite = finite
        self.exact = exact
        self.note = note

    def forward(self, s: torch.Tensor, a: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        healthy = torch.ones(s_next.shape[0], dtype=torch.bool, device=s_next.device)
        for r in self.ranges:
            healthy &= r.inside(s_next)
        if self.finite is not None:
            healthy &= torch.isfinite(s_next[:, self.finite[0] : self.finite[1]]).all(-1)
        return (~healthy).to(s_next.dtype)

    def extra_repr(self) -> str:
        parts = [
            f"{r.name}[{r.start}:{r.stop}] in {'[' if r.closed else '('}{r.low}, {r.high}"
            f"{']' if r.closed else ')'}"
            for r in self.ranges
        ]
        if self.finite is not None:
            parts.append(f"finite[{self.finite[0]}:{self.finite[1]}]")
        return ", ".join(parts) + ("" if self.exact else f"; approximate: {self.note}")


class TipHeight(nn.Module):
    """InvertedDoublePendulum: d = 1 when the tip of the second pole is at height
    <= ``min_height``.  The observation holds sin and cos of both hinge angles (dims
    1..4), and the tip's height is z0 + (planar offsets of pole2 and the tip, rotated
    by q1 and q1 + q2) with the offsets read from the MuJoCo model.

    Approximate: Gymnasium reads the tip from ``site_xpos`` after ``mj_step``, which
    holds the kinematics of the last Runge-Kutta stage of the last substep, not of the
    observed angles; the two heights differ by about 1e-4 m, so a step whose tip ends
    that close to ``min_height`` may be judged differently.
    """

    exact = False

    def __init__(self, z0: float, pole2: tuple[float, float], tip: tuple[float, float],
                 min_height: float = _DOUBLE_PENDULUM_MIN_TIP):  # fmt: skip
        super().__init__()
        self.z0, self.pole2, self.tip, self.min_height = z0, pole2, tip, min_height
        self.note = "the env measures the tip at the last Runge-Kutta stage (~1e-4 m off)"

    def forward(self, s: torch.Tensor, a: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        sin1, sin2, cos1, cos2 = s_next[:, 1], s_next[:, 2], s_next[:, 3], s_next[:, 4]
        sin12 = sin1 * cos2 + cos1 * sin2
        cos12 = cos1 * cos2 - sin1 * sin2
        # rotation about the y axis by q maps (x, z) to z' = -x sin q + z cos q
        height = (self.z0 - self.pole2[0] * sin1 + self.pole2[1] * cos1
                  - self.tip[0] * sin12 + self.tip[1] * cos12)  # fmt: skip
        return (~(height > self.min_height)).to(s_next.dtype)

    def extra_repr(self) -> str:
        return f"tip height <= {self.min_height}; approximate: {self.note}"


def termination_for_env(env) -> tuple[nn.Module | None, str]:
    """The termination of ``env``'s transitions as (module or None, kind).

    kind is ``never`` (``NeverTerminates``), ``rule`` (a rule on s' built from the env's
    own parameters) or ``learned`` (None: the dynamics ensemble learns a head); the
    table in this module's docstring says which env gets which.

    Raises:
        EnvError: the env has a rule but its observation lacks a quantity the rule
            needs (naming the env and the option that removed it), or a wrapper changed
            the observation space.
    """
    u = env.unwrapped
    cls = f"{type(u).__module__}.{type(u).__qualname__}"
    if cls in _NEVER:
        return NeverTerminates(), "never"
    build = _RULES.get(cls.removeprefix(_MUJOCO)) if cls.startswith(_MUJOCO) else None
    if build is None:
        return None, "learned"
    if not getattr(u, "_terminate_when_unhealthy", True):
        return NeverTerminates(), "never"
    name = _env_name(env)
    if env.observation_space.shape != u.observation_space.shape:
        raise EnvError(
            f"env {name!r}: a wrapper changes the observation from {u.observation_space.shape} "
            f"to {env.observation_space.shape}, so the termination rule of {type(u).__name__} "
            "cannot be read from it; drop the wrapper or use an env without a rule"
        )
    return build(u, name), "rule"


# ---- the rules, one builder per Gymnasium class --------------------------------------
def _env_name(env) -> str:
    return env.spec.id if env.spec is not None else type(env.unwrapped).__name__


def _qpos_index(u, name: str, i: int, what: str) -> int:
    """The observation index of ``qpos[i]``, from the env's ``observation_structure``."""
    skipped = u.observation_structure.get("skipped_qpos", 0)
    if i < skipped:
        raise EnvError(
            f"env {name!r}: its termination needs {what} (qpos[{i}]), which the observation "
            f"leaves out (exclude_current_positions_from_observation=True drops the first "
            f"{skipped} qpos); make the env with exclude_current_positions_from_observation="
            "False, or use a learned termination head"
        )
    return i - skipped


def _pair(rng) -> tuple[float, float]:
    low, high = rng
    return float(low), float(high)


def _hopper(u, name: str) -> HealthyRanges:
    z, angle = _qpos_index(u, name, 1, "the height z"), _qpos_index(u, name, 2, "the angle")
    n_pos, nv = u.observation_structure["qpos"], u.observation_structure["qvel"]  # as observed
    state_lo, state_hi = _pair(u._healthy_state_range)
    ranges = [
        Range("z", z, z + 1, *_pair(u._healthy_z_range)),
        Range("angle", angle, angle + 1, *_pair(u._healthy_angle_range)),
        Range("state", angle, n_pos + nv, state_lo, state_hi),  # qpos[2:], then qvel
    ]
    # is_healthy tests the raw qvel, the observation holds it clipped to [-10, 10]: a
    # clipped speed tells whether it left the range only when the range ends inside ±10.
    exact = state_lo >= -10.0 and state_hi <= 10.0
    note = (
        "a joint speed beyond the observation's ±10 clip counts as inside the healthy "
        f"state range ({state_lo}, {state_hi}); the env would judge it by the raw speed"
    )
    return HealthyRanges(ranges, exact=exact, note="" if exact else note)


def _walker(u, name: str) -> HealthyRanges:
    z, angle = _qpos_index(u, name, 1, "the height z"), _qpos_index(u, name, 2, "the angle")
    return HealthyRanges([
        Range("z", z, z + 1, *_pair(u._healthy_z_range)),
        Range("angle", angle, angle + 1, *_pair(u._healthy_angle_range)),
    ])  # fmt: skip


def _ant(u, name: str) -> HealthyRanges:
    z = _qpos_index(u, name, 2, "the height z")
    n_pos, nv = u.observation_structure["qpos"], u.observation_structure["qvel"]  # as observed
    # is_healthy also needs x and y finite; MuJoCo does not make them non-finite while
    # the rest of qpos and qvel stays finite, so the observed part decides.
    return HealthyRanges(
        [Range("z", z, z + 1, *_pair(u._healthy_z_range), closed=True)], finite=(0, n_pos + nv)
    )


def _humanoid(u, name: str) -> HealthyRanges:
    z = _qpos_index(u, name, 2, "the height z")
    return HealthyRanges([Range("z", z, z + 1, *_pair(u._healthy_z_range))])


def _inverted_pendulum(u, name: str) -> HealthyRanges:
    limit = _INVERTED_PENDULUM_MAX_ANGLE
    n = u.observation_space.shape[0]
    return HealthyRanges([Range("angle", 1, 2, -limit, limit, closed=True)], finite=(0, n))


def _inverted_double_pendulum(u, name: str) -> TipHeight:
    m = u.model
    hinges_about_y = m.njnt == 3 and all(
        list(m.jnt_axis[j]) == [0.0, 1.0, 0.0] and not m.jnt_pos[j].any() for j in (1, 2)
    )
    if not hinges_about_y:
        raise EnvError(
            f"env {name!r}: its termination rule expects a cart slider and two hinges about "
            "the y axis at their bodies' origins (Gymnasium's inverted_double_pendulum.xml); "
            "this model differs, so use a learned termination head"
        )
    z0 = float(m.body_pos[m.body("cart").id][2] + m.body_pos[m.body("pole").id][2])
    pole2, tip = m.body_pos[m.body("pole2").id], m.site_pos[m.site("tip").id]
    return TipHeight(z0, (float(pole2[0]), float(pole2[2])), (float(tip[0]), float(tip[2])))


_RULES = {
    "hopper_v5.HopperEnv": _hopper,
    "walker2d_v5.Walker2dEnv": _walker,
    "ant_v5.AntEnv": _ant,
    "humanoid_v5.HumanoidEnv": _humanoid,
    "inverted_pendulum_v5.InvertedPendulumEnv": _inverted_pendulum,
    "inverted_double_pendulum_v5.InvertedDoublePendulumEnv": _inverted_double_pendulum,
}
