"""Dynamics written as a user's Pyro program, as a world model (DESIGN §3):
``ProgramDynamics`` runs in ``ModelBasedValue``, the planners and the Pyro optimality
model, and is fitted by maximum likelihood on replay transitions by the same loop as
the ensemble (``mbvi.models.DynamicsModule``, the agent's refit).

    model = ProgramDynamics("examples.pendulum_physics.PendulumPhysics",
                            reward="examples.pendulum_physics.pendulum_reward",
                            factory=True)
    model.build(obs_dim, act_dim, termination)
    step = model.step(s, a, "ts1")              # s' sampled at the program's site
    loss, metrics = model.loss(s, a, r, s2, term)   # −log p(s2 | s, a) (+ −log p(r))
    dynamics, reward = model.programs()         # for OptimalityModel

The program ``dynamics(s [..., S], a [..., A])`` samples the next state at the site
``"s_next"`` (``next_state_site``) with batch shape ``s.shape[:-1]`` and event shape
[S]; actions arrive in [-1, 1]^A, as every world model sees them.  ``step`` calls it
on rows [M,·]; the optimality model calls it on [B,N,·] inside its plates.  Its
``pyro.param`` statements or ``PyroModule`` parameters are the model's own
(``mbvi.pyro.params``), so they are trained, checkpointed and moved with it.

The reward ``reward(s, a) -> [...]`` is a plain function, or a program that samples a
site ``"r"`` (``reward_site``): then its distribution's mean is the predicted reward
and its log-likelihood joins the fit.  Rollouts use the expected reward, which leaves
the expectation of the objective (and of α·ELBO, whose reward enters linearly)
unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import Independent, Normal

from mbvi.errors import ConfigError
from mbvi.pyro.imports import import_object
from mbvi.pyro.params import ProgramParams, run_program
from mbvi.variational.world_model import (
    Prediction,
    Propagation,
    Step,
    WorldModel,
    check_propagation,
)

NEXT_STATE = "s_next"
"""Default name of the next-state site of a dynamics program."""
REWARD = "r"
"""Default name of the reward site of a reward program that has one."""

_PROBE_ROWS = 3  # rows of the probe call in build; not S or A, so a swapped dim shows
_EVAL_ROWS = 8192  # rows per chunk when scoring a hold-out set
_KIND = "dynamics program"


class _Site(Messenger):
    """Watches one sample site: keeps its distribution and value, sets its value with
    ``choose(fn)`` first (None: Pyro samples it), and notes every other sample site."""

    def __init__(self, name: str, choose: Callable | None = None):
        super().__init__()
        self.name, self.choose = name, choose
        self.fn = self.value = self.out = None
        self.others: list[str] = []

    def _pyro_sample(self, msg) -> None:
        if msg["infer"].get("_deterministic", False):
            return  # pyro.deterministic records a value: not random, nothing to fit
        if msg["name"] != self.name:
            self.others.append(msg["name"])
            return
        self.fn, self._msg = msg["fn"], msg
        if self.choose is not None:
            value = self.choose(msg["fn"])
            if value is not None:
                msg["value"] = value

    def _pyro_post_sample(self, msg) -> None:
        # By identity: an enclosing StepSites has renamed the site by now.
        if msg is getattr(self, "_msg", None):
            self.value = msg["value"]


def _mean(fn) -> torch.Tensor:
    return fn.mean


def _draw(generator: torch.Generator | None) -> Callable:
    """A Gaussian site drawn with ``generator`` (reparameterised); any other site, or
    no generator, is left to Pyro (the global generator)."""

    def choose(fn):
        base = fn.base_dist if isinstance(fn, Independent) else fn
        if generator is None or not isinstance(base, Normal):
            return None
        loc = base.loc
        noise = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        return loc + base.scale * noise

    return choose


class ProgramDynamics(WorldModel):
    """p(s' | s, a) is the site ``next_state_site`` of a user's Pyro program; one model
    (E = 1).  See the module docstring for the calling convention.

    Every propagation samples the site (``ts1``) or takes its distribution's mean
    (``mean``, ``expectation``).  Termination is the env's rule that
    ``ModelBasedValue`` passes to ``build`` (never, without one).  The fit minimises
    the negative log-likelihood of the real next states (and rewards, when the reward
    program has a site) in env units: there are no normalisers and no elites.

    Args:
        program: import path ``package.module.name`` of the dynamics program (a
            function or a ``PyroModule`` instance), or the program itself.
        reward: import path of the reward function or program, or the function itself.
        factory: when true, ``program`` names a factory (a function or a
            ``PyroModule`` class) called once in ``build`` as
            ``factory(obs_dim=S, act_dim=A, **factory_args)`` to make the program.
        factory_args: further keyword arguments of the factory.
        next_state_site: name of the program's next-state site.
        reward_site: name of the reward program's site, if it samples one.
    """

    members = 1
    elites = 1
    learned_termination = False  # set by ModelBasedValue for an env with no known rule

    def __init__(
        self,
        program: str | Callable[..., Any],
        reward: str | Callable[..., Any],
        factory: bool = False,
        factory_args: dict[str, Any] | None = None,
        next_state_site: str = NEXT_STATE,
        reward_site: str = REWARD,
    ):
        super().__init__()
        # Imported in build, as ProgramPrior does: the CLI prints a ConfigError raised
        # while the agent is built as one line.
        self.program, self.reward = program, reward
        self.factory, self.factory_args = factory, factory_args
        self.next_state_site, self.reward_site = next_state_site, reward_site
        self.program_module: nn.Module | None = None
        self.reward_module: nn.Module | None = None
        self._functions: dict[str, Callable | None] = {"dynamics": None, "reward": None}
        self.reward_fitted = False

    # ---- building and checking --------------------------------------------------------
    def build(self, obs_dim: int, act_dim: int, termination: nn.Module | None = None) -> None:
        """Import (or make) the programs, check them on probe rows [3,S], [3,A] and
        create their parameters; ``ConfigError`` if any of that fails."""
        super().build(obs_dim, act_dim)
        if self.learned_termination:
            raise ConfigError(
                f"ProgramDynamics({self._name}): mbvi knows no termination rule for this env "
                "and a dynamics program has no learned termination head; use an env whose "
                "rule mbvi knows (docs/envs.md) or mbvi.models.DynamicsEnsemble"
            )
        program = self._make_program(obs_dim, act_dim)
        reward = self._resolve(self.reward, "reward")
        for key, obj, attr in (("dynamics", program, "program_module"),
                               ("reward", reward, "reward_module")):  # fmt: skip
            if isinstance(obj, nn.Module):
                # A copy: two models built from one module-level instance share nothing.
                setattr(self, attr, copy.deepcopy(obj))
            else:
                self._functions[key] = obj
        self.termination = termination
        self.params = ProgramParams(self._name, kind=_KIND)
        with torch.no_grad():
            self._check(torch.zeros(_PROBE_ROWS, obs_dim), torch.zeros(_PROBE_ROWS, act_dim))
        self.params.freeze(target=False)

    @property
    def _name(self) -> str:
        p = self.program
        return repr(p if isinstance(p, str) else getattr(p, "__name__", type(p).__name__))

    def _resolve(self, obj, what: str):
        if not isinstance(obj, str):
            if not callable(obj):
                raise ConfigError(
                    f"ProgramDynamics: {what} must be an import path or a callable, got "
                    f"a {type(obj).__name__}"
                )
            return obj
        return import_object(obj, kind=f"{what} program")

    def _make_program(self, obs_dim: int, act_dim: int):
        if self.factory_args and not self.factory:
            raise ConfigError(
                f"ProgramDynamics got factory_args {self.factory_args} but factory=false; set "
                f"factory: true if {self._name} makes the program, or drop factory_args"
            )
        target = self._resolve(self.program, "dynamics")
        if not self.factory:
            return target
        args = self.factory_args or {}
        try:
            program = target(obs_dim=obs_dim, act_dim=act_dim, **args)
        except Exception as e:
            raise ConfigError(
                f"dynamics factory {self._name} failed when called with obs_dim={obs_dim}, "
                f"act_dim={act_dim} and factory_args {args}: {type(e).__name__}: {e}"
            ) from e
        if not callable(program):
            raise ConfigError(
                f"dynamics factory {self._name} returned a {type(program).__name__}, not a "
                "Pyro program dynamics(s, a)"
            )
        return program

    def _check(self, s: torch.Tensor, a: torch.Tensor) -> None:
        """``ConfigError`` unless the dynamics program samples only its next-state site,
        of shape [M,S] with event shape [S], a finite log-prob and a mean, and the
        reward is [M]; the first run creates the programs' ``pyro.param``s."""
        m, name, want = s.shape[0], self._name, self.next_state_site
        where = f"on probe rows s {tuple(s.shape)}, a {tuple(a.shape)} = [rows, dim]"
        site = self._run("dynamics", s, a, _Site(want), where)
        if site.fn is None:
            raise ConfigError(
                f"dynamics program {name} has no next-state site: it sampled "
                f"{site.others or 'no sites'}, but mbvi reads s' from "
                f"pyro.sample({want!r}, ...) with shape {(m, self.obs_dim)} = [rows, obs_dim]; "
                f"sample it there, e.g. pyro.sample({want!r}, dist.Normal(loc, scale)"
                ".to_event(1)), or set next_state_site"
            )
        if site.others:
            raise ConfigError(
                f"dynamics program {name} samples latent site(s) {site.others} besides "
                f"{want!r}; mbvi fits p(s'|s,a) by its likelihood, so put any noise or mixture "
                f"inside the site {want!r} (e.g. MixtureSameFamily)"
            )
        fn, value, expected = site.fn, site.value, (m, self.obs_dim)
        if tuple(value.shape) != expected or tuple(fn.event_shape) != expected[1:]:
            raise ConfigError(
                f"dynamics program {name}: site {want!r} has shape {tuple(value.shape)} "
                f"(batch {tuple(fn.batch_shape)}, event {tuple(fn.event_shape)}) {where}, "
                f"expected {expected} = [rows, obs_dim] with event shape {expected[1:]}; make "
                "the batch shape s.shape[:-1] and declare the state dimension as an event "
                "dimension with .to_event(1)"
            )
        try:
            log_p, mean = fn.log_prob(value), fn.mean
        except NotImplementedError as e:
            raise ConfigError(
                f"dynamics program {name}: the distribution of site {want!r} "
                f"({type(fn).__name__}) has no log-prob or no mean, which the fit and "
                "mean propagation need; use e.g. a Normal"
            ) from e
        if not bool(torch.isfinite(log_p).all() and torch.isfinite(mean).all()):
            raise ConfigError(
                f"dynamics program {name}: site {want!r} gives a log-prob {log_p.tolist()} "
                f"and mean {mean.tolist()} {where}; expected finite values"
            )
        self.differentiable = bool(fn.has_rsample)
        rsite = self._run("reward", s, a, _Site(self.reward_site, _mean), where)
        r = rsite.value if rsite.fn is not None else rsite.out
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != (m,) or rsite.others:
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ConfigError(
                f"reward {self._reward_name} returned {got} {where}, expected a tensor of "
                f"shape {(m,)} = [rows]"
                + (
                    f" and no sites but {self.reward_site!r}, sampled {rsite.others}"
                    if rsite.others
                    else ""
                )
            )
        self.reward_fitted = rsite.fn is not None

    @property
    def _reward_name(self) -> str:
        r = self.reward
        return repr(r if isinstance(r, str) else getattr(r, "__name__", type(r).__name__))

    # ---- running the programs -----------------------------------------------------------
    def _program(self, key: str):
        module = self.program_module if key == "dynamics" else self.reward_module
        return module if module is not None else self._functions[key]

    def _run(self, key: str, s, a, site: _Site, where: str | None = None) -> _Site:
        """Run the dynamics or reward program on ``s``, ``a`` with its own parameters,
        its sites hidden from any enclosing Pyro model; ``site`` watches one.  With
        ``where`` (the probe) a failure is a ``ConfigError``."""
        with poutine.block(), site:
            try:
                site.out = run_program(self._program(key), s, self.params, "online", a)
            except ConfigError:
                raise
            except Exception as e:
                if where is None:
                    raise
                name = self._name if key == "dynamics" else self._reward_name
                raise ConfigError(
                    f"{key} program {name} failed {where}: {type(e).__name__}: {e}; it must "
                    "accept states [..., S] and actions [..., A] in [-1, 1] on their device"
                ) from e
        return site

    def _reward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        site = self._run("reward", s, a, _Site(self.reward_site, _mean))
        return site.value if site.fn is not None else site.out

    # ---- the WorldModel contract --------------------------------------------------------
    def step(
        self,
        s: torch.Tensor,
        a: torch.Tensor,
        propagation: Propagation = "ts1",
        generator: torch.Generator | None = None,
    ) -> Step:
        """One transition per row: s' sampled at the site (``ts1``; a Gaussian site is
        drawn with ``generator`` when given) or its mean; the expected reward."""
        check_propagation(propagation)
        assert s.dim() == 2 and a.dim() == 2 and s.shape[0] == a.shape[0], (
            f"step expects s [M,{self.obs_dim}] and a [M,{self.act_dim}], "
            f"got {tuple(s.shape)} and {tuple(a.shape)}"
        )
        choose = _draw(generator) if propagation == "ts1" else _mean
        nxt = self._run("dynamics", s, a, _Site(self.next_state_site, choose)).value
        if self.termination is not None:
            done = self.termination(s, a, nxt)
        else:
            done = s.new_zeros(s.shape[0])
        return Step(nxt, self._reward(s, a), done)

    def predict(self, s: torch.Tensor, a: torch.Tensor) -> Prediction:
        """The site's mean and standard deviation, and the reward's, as one member."""
        fn = self._run("dynamics", s, a, _Site(self.next_state_site, _mean)).fn
        rsite = self._run("reward", s, a, _Site(self.reward_site, _mean))
        if rsite.fn is not None:
            r_mean, r_std = rsite.value, rsite.fn.stddev
        else:
            r_mean = rsite.out
            r_std = torch.zeros_like(r_mean)
        return Prediction(fn.mean[None], fn.stddev[None], r_mean[None], r_std[None])

    def _log_likelihood(self, s, a, r, s2) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(s2, r | s, a) per row, squared error of the mean per row and dim)."""
        site = self._run("dynamics", s, a, _Site(self.next_state_site, lambda fn: s2))
        log_p = site.fn.log_prob(s2)
        err2 = (site.fn.mean - s2).square()
        if self.reward_fitted:
            rsite = self._run("reward", s, a, _Site(self.reward_site, lambda fn: r))
            log_p = log_p + rsite.fn.log_prob(r)
            err2 = torch.cat([err2, (rsite.fn.mean - r).square().unsqueeze(-1)], -1)
        return log_p, err2

    def loss(self, s, a, r, s2, term):
        """The negative log-likelihood of the real transitions, mean over rows (rows
        [M,·] or [E,M,·]).  Metrics (detached): ``nll`` per modelled dim (s', and r when
        the reward has a site) and ``mse`` of the mean, both in env units."""
        log_p, err2 = self._log_likelihood(s, a, r, s2)
        loss = -log_p.mean()
        return loss, {"nll": loss.detach() / err2.shape[-1], "mse": err2.detach().mean()}

    @torch.no_grad()
    def holdout_scores(self, s, a, r, s2) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL per modelled dim and MSE of the mean on held-out rows, each ``[1]``."""
        nll, mse, n = s.new_zeros(1), s.new_zeros(1), max(s.shape[0], 1)
        for i in range(0, s.shape[0], _EVAL_ROWS):
            rows = slice(i, i + _EVAL_ROWS)
            log_p, err2 = self._log_likelihood(s[rows], a[rows], r[rows], s2[rows])
            nll -= log_p.sum() / err2.shape[-1]
            mse += err2.mean(-1).sum()
        return nll / n, mse / n

    # ---- the Pyro optimality model ------------------------------------------------------
    def programs(self) -> tuple[Callable, Callable]:
        """(dynamics, reward_fn) for ``OptimalityModel``: the user's dynamics program
        with this model's parameters, its site visible to the enclosing model (renamed
        per step by ``StepSites``), and the expected reward ``[B,N]``."""
        if getattr(self, "params", None) is None:
            raise ConfigError(f"ProgramDynamics({self._name}) is not built yet: call build")

        def dynamics(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            site = _Site(self.next_state_site)
            with site:
                run_program(self._program("dynamics"), s, self.params, "online", a)
            return site.value

        return dynamics, self._reward
