"""``ProgramPrior``: a prior p(a|s) written as a plain Pyro program, chosen by its import
path, so any engine and value estimate train with it through the CLI::

    mbvi fit --config configs/pendulum/sac.yaml --model.prior mbvi.pyro.ProgramPrior \\
        --model.prior.init_args.program examples.mixture_prior.two_gait_prior

It is not a tanh-Gaussian, so the objective takes the sample-based KL of Eq. 16 with
the posterior's own actions: J̃ = E_π[Q̂] − α (E log π − E log p_program).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from mbvi.errors import ConfigError
from mbvi.pyro.sites import ACTION, PriorProgram, StepSites, run_prior_program
from mbvi.variational.priors import Prior

_PROBE_STATES, _PROBE_PARTICLES = 2, 3  # distinct sizes, so a swapped plate is caught
_ACTION_0 = f"{ACTION}_0"  # the action site as StepSites(0) records it


class ProgramPrior(Prior):
    """p(a|s) is the distribution of the site ``"a"`` of a user's Pyro program.

    Calling convention (the same as ``OptimalityModel``'s for a prior program):
    ``program(s)`` gets states ``s`` of shape [B, 1, S] (one row per state; the
    singleton broadcasts over the N actions), or [B, N, S] when each action has its own
    state (after a model step), and runs inside two plates, ``states``
    (size B, dim -2) and ``particles`` (size N, dim -1).  It samples the action with
    ``pyro.sample("a", d)`` where ``d`` has batch shape broadcastable to [B, N], event
    shape [A] (``.to_event(1)``) and support inside [-1, 1]^A (``TanhTransform``,
    ``Uniform(-1, 1)``); it makes its tensors on ``s``'s device and dtype
    (``.to(s)``).  ``log_prob`` reads log p(a|s) from that one site, so the program
    samples no other random variable: marginalise a latent choice inside the site, as
    ``MixtureSameFamily`` does in ``examples/mixture_prior.py``.  ``build`` runs these
    checks once, so a bad program fails at configuration time.  The program is fixed:
    it has no parameters fitted in the M-step.

    The module must be importable: from ``sys.path`` (``PYTHONPATH``, an installed
    package) or else from the working directory, so run ``mbvi`` from the folder that
    holds ``examples/`` (the repository root) or install your module.

    Args:
        program: import path ``package.module.function`` of the Pyro program, e.g.
            ``examples.mixture_prior.two_gait_prior``.
        factory: when true, ``program`` names a factory instead, called once in
            ``build`` as ``factory(act_dim=A, **factory_args)`` to make the program,
            e.g. ``examples.mixture_prior.make_two_gait_prior`` for any A.
        factory_args: further keyword arguments of the factory.
    """

    def __init__(
        self, program: str, factory: bool = False, factory_args: dict[str, Any] | None = None
    ):
        super().__init__()
        # Imported in build, not here: the CLI reports a ConfigError raised while the
        # agent is built as one line, while jsonargparse buries one raised here.
        self.program, self.factory, self.factory_args = program, factory, factory_args
        self._program: PriorProgram | None = None

    @property
    def pyro_program(self) -> PriorProgram:
        """The Pyro program itself (made by the factory in ``build``)."""
        if self._program is None:
            raise ConfigError(f"ProgramPrior({self.program!r}) is not built yet: call build")
        return self._program

    def build(self, obs_dim: int, act_dim: int) -> None:
        """Import the program (or make it with the factory) and check it on probe
        states [2, 1, S]; ``ConfigError`` if any of that fails."""
        super().build(obs_dim, act_dim)
        if self.factory_args and not self.factory:
            raise ConfigError(
                f"ProgramPrior got factory_args {self.factory_args} but factory=false; set "
                f"factory: true if {self.program!r} makes the program, or drop factory_args"
            )
        target = import_object(self.program)
        self._program = target
        if self.factory:
            args = self.factory_args or {}
            try:
                self._program = target(act_dim=act_dim, **args)
            except Exception as e:
                raise ConfigError(
                    f"prior factory {self.program!r} failed when called with act_dim={act_dim}"
                    f" and factory_args {args}: {type(e).__name__}: {e}"
                ) from e
            if not callable(self._program):
                raise ConfigError(
                    f"prior factory {self.program!r} returned a {type(self._program).__name__}"
                    ", not a Pyro program program(s)"
                )
        with torch.no_grad():
            self._check(torch.zeros(_PROBE_STATES, 1, obs_dim), act_dim)

    def _check(self, s: torch.Tensor, act_dim: int) -> None:
        """Raise ``ConfigError`` unless the program, run on states ``s`` [B,1,S], samples
        site ``a`` [B,N,A] in [-1,1]^A, no other random site, and a finite log-prob."""
        b, n, name = s.shape[0], _PROBE_PARTICLES, repr(self.program)

        failed: list[Exception] = []

        def probe(s):
            # Catch here, inside the trace: Pyro's trace appends its shape table to an
            # exception that leaves it, and the CLI prints errors as one line.
            with pyro.plate("states", b, dim=-2), pyro.plate("particles", n, dim=-1):
                with StepSites(0) as step:
                    try:
                        run_prior_program(self.pyro_program, s, step, name, (b, n, act_dim))
                    except Exception as e:
                        failed.append(e)

        trace = poutine.trace(probe).get_trace(s)
        try:
            if failed:
                raise failed[0]
            others = _latent_sites(trace)
            log_p = None if others else self.log_prob(s.squeeze(1), trace.nodes[_ACTION_0]["value"])
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(
                f"prior program {name} failed on probe states of shape {tuple(s.shape)} "
                f"= [states, 1, obs_dim]: {type(e).__name__}: {e}"
            ) from e
        if others:
            raise ConfigError(
                f"prior program {name} samples {others} besides its action site '{ACTION}', "
                f"but ProgramPrior reads log p(a|s) from site '{ACTION}' alone; marginalise "
                f"them inside the site's distribution (e.g. MixtureSameFamily, as in "
                "examples/mixture_prior.py) or record values with pyro.deterministic"
            )
        if log_p.shape != (b, n) or not bool(torch.isfinite(log_p).all()):
            raise ConfigError(
                f"prior program {name}: log-prob of site '{ACTION}' at its own samples is "
                f"{log_p.tolist()} (shape {tuple(log_p.shape)}), expected finite values of "
                f"shape {(b, n)} = [states, particles]"
            )

    def log_prob(
        self, s: torch.Tensor, a: torch.Tensor, u: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(a|s) for states ``s`` [B,S] (or [B,N,S]) and actions ``a`` [B,N,A]
        -> [B,N]: one trace of the program with site ``a`` conditioned on ``a``.

        Actions are clamped one float step inside (-1, 1), where a tanh-squashed
        density is finite (tanh rounds |u| > 9 to ±1 in float32); the gradient w.r.t.
        ``a`` flows through the site's log-prob.  ``u`` is unused.
        """
        if a.dim() != 3:
            raise ValueError(f"ProgramPrior.log_prob expects actions [B,N,A], got {tuple(a.shape)}")
        b, n, _ = a.shape
        edge = 1.0 - torch.finfo(a.dtype).eps
        a = a.clamp(-edge, edge)
        s = s.unsqueeze(1) if s.dim() == 2 else s
        conditioned = poutine.condition(self.pyro_program, data={ACTION: a})

        def model(s):
            with pyro.plate("states", b, dim=-2), pyro.plate("particles", n, dim=-1):
                conditioned(s)

        # build() checked the program's shapes and support once; re-validating every
        # distribution's arguments on each call would cost more than the density itself.
        with pyro.validation_enabled(False):
            site = poutine.trace(model).get_trace(s).nodes[ACTION]
            return site["fn"].log_prob(site["value"])

    def sample(self, s: torch.Tensor, n: int) -> torch.Tensor:
        """n actions per state from the program's site ``a``: states [B,S] -> [B,n,A]."""
        b = s.shape[0]

        def model(s):
            with pyro.plate("states", b, dim=-2), pyro.plate("particles", n, dim=-1):
                self.pyro_program(s)

        with pyro.validation_enabled(False):
            return poutine.trace(model).get_trace(s.unsqueeze(1)).nodes[ACTION]["value"]

    def default_kl_target(self) -> float:
        # SAC's per-dimension budget, as for ConstantTanhGaussianPrior: the posterior may
        # move about as far from the program's prior as SAC's policy moves from the
        # uniform one.  Override with the agent's target_kl_per_dim.
        return 1.0 + math.log(2.0)


def _latent_sites(trace) -> list[str]:
    """Names of the random sites of a probe trace other than the action (plates and
    ``pyro.deterministic`` sites are not random)."""
    return [
        site["name"].removesuffix("_0")
        for site in trace.nodes.values()
        if site["type"] == "sample"
        and site["name"] != _ACTION_0
        and not site_is_subsample(site)
        and not site["infer"].get("_deterministic", False)
    ]


def import_object(path: str) -> Any:
    """The object at ``package.module.name``; ``ConfigError`` that says what to do if
    it cannot be imported.  The working directory is searched after ``sys.path``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f"prior program {path!r} is not an import path 'package.module.function', "
            "e.g. 'examples.mixture_prior.two_gait_prior'"
        )
    try:
        module = _import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"prior program {path!r}: cannot import module {module_name!r} ({e}); searched "
            f"sys.path and the working directory {os.getcwd()}. Run mbvi from the folder "
            f"that holds {module_name.split('.')[0]!r}, add that folder to PYTHONPATH, or "
            "install your module (pip install -e .)"
        ) from e
    except Exception as e:
        raise ConfigError(
            f"prior program {path!r}: importing module {module_name!r} failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    try:
        obj = getattr(module, attr)
    except AttributeError as e:
        public = sorted(
            k
            for k, v in vars(module).items()
            if callable(v) and k[0] != "_" and getattr(v, "__module__", None) == module_name
        )
        raise ConfigError(
            f"prior program {path!r}: module {module_name!r} has no {attr!r}; it defines {public}"
        ) from e
    if not callable(obj):
        raise ConfigError(f"prior program {path!r} is a {type(obj).__name__}, not a function")
    return obj


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing_is_ours = e.name is not None and (name + ".").startswith(e.name + ".")
        cwd = os.getcwd()
        if not missing_is_ours or cwd in sys.path or "" in sys.path:
            raise
    # A console script (``mbvi``) does not put the working directory on sys.path the way
    # ``python -m`` does; look there too, without leaving it on the path.
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(cwd)
