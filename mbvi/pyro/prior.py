"""``ProgramPrior``: a prior p(a|s) written as a plain Pyro program, chosen by its import
path, so any engine and value estimate train with it through the CLI::

    mbvi fit --config configs/pendulum/sac.yaml --model.prior mbvi.pyro.ProgramPrior \\
        --model.prior.init_args.program examples.mixture_prior.two_gait_prior

It is not a tanh-Gaussian, so the objective takes the sample-based KL of Eq. 16 with
the posterior's own actions: J̃ = E_π[Q̂] − α (E log π − E log p_program).  Programs
are written as Pyro users write them: latent sites are marginalised by mbvi
(``mbvi.pyro.latents``), and ``pyro.param`` statements or a ``PyroModule`` make the
prior learnable in the M-step (``mbvi.pyro.params``).  docs/pyro_programs.md.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pyro
import torch
from pyro import poutine
from torch import nn

from mbvi.errors import ConfigError
from mbvi.pyro.imports import import_object
from mbvi.pyro.kl_floor import kl_floor_per_dim
from mbvi.pyro.latents import (
    BatchTo,
    Latents,
    MarginalAction,
    classify_latents,
    marginal_log_prob,
)
from mbvi.pyro.params import ProgramParams, module_target, run_program, update_module_target
from mbvi.pyro.sites import (
    ACTION,
    BOX_DRAWS,
    PriorProgram,
    StepSites,
    check_in_box,
    run_prior_program,
)
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.priors import LOG_ETA_BOUNDS, Prior

__all__ = ["ProgramPrior", "import_object"]

_PROBE_STATES, _PROBE_PARTICLES = 2, 3  # distinct sizes, so a swapped plate is caught
_ACTION_0 = f"{ACTION}_0"  # the action site as StepSites(0) records it


class ProgramPrior(Prior):
    """p(a|s) is the marginal distribution of the site ``"a"`` of a user's Pyro program.

    Calling convention (the same as ``OptimalityModel``'s for a prior program):
    ``program(s)`` gets states ``s`` of shape [B, 1, S] (one row per state; the
    singleton broadcasts over the N actions), or [B, N, S] when each action has its own
    state (after a model step), and runs inside two plates, ``states``
    (size B, dim -2) and ``particles`` (size N, dim -1).  It samples the action with
    ``pyro.sample("a", d)`` where ``d`` has batch shape broadcastable to [B, N], event
    shape [A] (``.to_event(1)``) and samples inside [-1, 1]^A (``TanhTransform``,
    ``Uniform(-1, 1)``, ``Beta`` mapped by ``AffineTransform(-1, 2)``); it makes its
    tensors on ``s``'s device and dtype (``.to(s)``).  ``build`` checks all this once
    on probe states, so a bad program fails at configuration time.

    Latent sites before ``"a"`` are marginalised (``mbvi.pyro.latents``): discrete
    ones exactly by enumeration, continuous ones by an importance-weighted estimate
    with ``latent_samples`` draws, biased low for log p by O(1/latent_samples).

    A program with ``pyro.param`` statements, or a ``PyroModule``, is learnable: its
    parameters θ are the prior's own (not Pyro's global param store), trained in the
    M-step by ``loss`` as ``LearnedPrior`` is (Eq. 7 inside an MPO trust region
    around a Polyak target θ̄ that the E-step reads), and saved in checkpoints.

    The module must be importable: from ``sys.path`` (``PYTHONPATH``, an installed
    package) or else from the working directory, so run ``mbvi`` from the folder that
    holds ``examples/`` (the repository root) or install your module.

    Args:
        program: import path ``package.module.name`` of the Pyro program (a function
            or a ``PyroModule`` instance), e.g. ``examples.mixture_prior.two_gait_prior``.
        factory: when true, ``program`` names a factory instead (a function, or a
            ``PyroModule`` class), called once in ``build`` as
            ``factory(act_dim=A, **factory_args)`` to make the program, e.g.
            ``examples.mixture_prior.make_two_gait_prior`` for any A.
        factory_args: further keyword arguments of the factory.
        latent_samples: K, draws of a program's continuous latents per log p(a|s)
            (the importance-weighted estimate); unused without continuous latents.
        fit_samples: actions per state drawn from the posterior (the fit) and from the
            target (the trust region) per M-step of a learnable program.
        tau: Polyak factor of a learnable program's target, θ̄ ← (1−τ) θ̄ + τ θ.
        eps: bound ε on the trust region KL(p_θ̄ ‖ p_θ) per action dimension.  A
            program has no mean/scale split, so one bound holds what ``LearnedPrior``
            splits into ``eps_mean`` and ``eps_scale``.
        init_eta: initial multiplier η of the trust region.
        dual_lr_scale: k in η = exp(k·ρ), as in ``LearnedPrior``.
    """

    def __init__(
        self,
        program: str,
        factory: bool = False,
        factory_args: dict[str, Any] | None = None,
        latent_samples: int = 32,
        fit_samples: int = 16,
        tau: float = 0.005,
        eps: float = 0.01,
        init_eta: float = 1.0,
        dual_lr_scale: float = 30.0,
    ):
        super().__init__()
        for name, value, ok, expected in [
            ("latent_samples", latent_samples, latent_samples >= 1, ">= 1"),
            ("fit_samples", fit_samples, fit_samples >= 1, ">= 1"),
            ("tau", tau, 0.0 < tau <= 1.0, "in (0, 1]"),
            ("eps", eps, eps > 0, "> 0"),
            ("init_eta", init_eta, init_eta > 0, "> 0"),
            ("dual_lr_scale", dual_lr_scale, dual_lr_scale > 0, "> 0"),
        ]:
            if not ok:
                raise ConfigError(f"ProgramPrior {name} must be {expected}, got {value}")
        # Imported in build, not here: the CLI reports a ConfigError raised while the
        # agent is built as one line, while jsonargparse buries one raised here.
        self.program, self.factory, self.factory_args = program, factory, factory_args
        self.latent_samples, self.fit_samples = latent_samples, fit_samples
        self.tau, self.eps, self.init_eta, self.dual_lr_scale = tau, eps, init_eta, dual_lr_scale
        self._function: PriorProgram | None = None  # a program that is not a module
        self.program_module: nn.Module | None = None
        self.target_module: nn.Module | None = None
        self.latents = Latents()
        self.learnable = False
        self._floor: float | None = None

    # ---- building and checking --------------------------------------------------------
    def build(self, obs_dim: int, act_dim: int) -> None:
        """Import the program (or make it with the factory), check it on probe states
        [2, 1, S] and create its parameters; ``ConfigError`` if any of that fails."""
        super().build(obs_dim, act_dim)
        program = self._make_program(act_dim)
        if isinstance(program, nn.Module):
            # A copy: two agents built from one module-level instance share nothing.
            self.program_module = copy.deepcopy(program)
        else:
            self._function = program
        self.params = ProgramParams(repr(self.program))
        with torch.no_grad():
            self._check(torch.zeros(_PROBE_STATES, 1, obs_dim), act_dim)
        self.params.freeze()
        online = list(self.params.online.values())
        if self.program_module is not None:
            self.target_module = module_target(self.program_module)
            online += list(self.program_module.parameters())
        self.learnable = any(p.requires_grad for p in online)
        if self.learnable:
            self.rho = nn.Parameter(torch.tensor(math.log(self.init_eta) / self.dual_lr_scale))

    def _make_program(self, act_dim: int):
        if self.factory_args and not self.factory:
            raise ConfigError(
                f"ProgramPrior got factory_args {self.factory_args} but factory=false; set "
                f"factory: true if {self.program!r} makes the program, or drop factory_args"
            )
        target = import_object(self.program)
        if not self.factory:
            return target
        args = self.factory_args or {}
        try:
            program = target(act_dim=act_dim, **args)
        except Exception as e:
            raise ConfigError(
                f"prior factory {self.program!r} failed when called with act_dim={act_dim}"
                f" and factory_args {args}: {type(e).__name__}: {e}"
            ) from e
        if not callable(program):
            raise ConfigError(
                f"prior factory {self.program!r} returned a {type(program).__name__}"
                ", not a Pyro program program(s)"
            )
        return program

    def _check(self, s: torch.Tensor, act_dim: int) -> None:
        """Raise ``ConfigError`` unless the program, run on states ``s`` [B,1,S], samples
        site ``a`` [B,N,A] in [-1,1]^A, only latents mbvi can marginalise, and a finite
        log-prob; its first run creates its ``pyro.param``s."""
        b, n, name = s.shape[0], _PROBE_PARTICLES, repr(self.program)
        run = self._runner("online")
        failed: list[Exception] = []

        def probe(s):
            # Catch here, inside the trace: Pyro's trace appends its shape table to an
            # exception that leaves it, and the CLI prints errors as one line.
            with pyro.plate("states", b, dim=-2), pyro.plate("particles", n, dim=-1):
                with StepSites(0) as step:
                    try:
                        run_prior_program(run, s, step, name, (b, n, act_dim))
                    except Exception as e:
                        failed.append(e)

        trace = poutine.trace(probe).get_trace(s)
        try:
            if failed:
                raise failed[0]
            self.latents = classify_latents(trace, name, action=_ACTION_0, suffix="_0")
            log_p = self.log_prob(s.squeeze(1), trace.nodes[_ACTION_0]["value"])
            if self.latents:  # the probe saw one latent draw per action: look wider
                support = trace.nodes[_ACTION_0]["fn"].support
                draws = self._sample(s, -(-BOX_DRAWS // b), "online")
                check_in_box(draws, name, f"'{ACTION}'", support)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(
                f"prior program {name} failed on probe states of shape {tuple(s.shape)} "
                f"= [states, 1, obs_dim]: {type(e).__name__}: {e}"
            ) from e
        if log_p.shape != (b, n) or not bool(torch.isfinite(log_p).all()):
            raise ConfigError(
                f"prior program {name}: log-prob of site '{ACTION}' at its own samples is "
                f"{log_p.tolist()} (shape {tuple(log_p.shape)}), expected finite values of "
                f"shape {(b, n)} = [states, particles]"
            )

    # ---- running the program ----------------------------------------------------------
    def _runner(self, which: str) -> PriorProgram:
        """The user's program with parameters θ (``'online'``) or θ̄ (``'target'``)."""
        module = self.program_module if which == "online" else self.target_module
        program = self._function if self.program_module is None else module
        params = self.params

        def run(s: torch.Tensor):
            return run_program(program, s, params, which)

        return run

    def _which(self) -> str:
        # The E-step reads the target θ̄, a constant (as LearnedPrior.distribution).
        return "target" if self.learnable else "online"

    @property
    def pyro_program(self) -> PriorProgram:
        """The program the E-step sees, to run inside a Pyro model: the user's program
        with the target parameters; with latent sites, one site ``a`` whose
        distribution is the marginal p(a|s) (so an ELBO with an engine's guide,
        which has no latent sites, is exactly J̃)."""
        if getattr(self, "params", None) is None:
            raise ConfigError(f"ProgramPrior({self.program!r}) is not built yet: call build")
        run = self._runner(self._which())
        if not self.latents:
            return run

        def marginal(s: torch.Tensor):
            d = MarginalAction(s, self.log_prob_states, self._sample_blocked, self.act_dim)
            return pyro.sample(ACTION, d)

        return marginal

    def _sample(self, s: torch.Tensor, n: int, which: str) -> torch.Tensor:
        """n actions per state from the program: states [B, 1 or N, S] -> [B,n,A]."""
        b, run = s.shape[0], self._runner(which)

        def model(s):
            with pyro.plate("states", b, dim=-2), pyro.plate("particles", n, dim=-1):
                run(s)

        with pyro.validation_enabled(False):
            return poutine.trace(model).get_trace(s).nodes[ACTION]["value"]

    def _sample_blocked(self, s: torch.Tensor, n: int) -> torch.Tensor:
        """``_sample`` from inside an enclosing model, its sites hidden from it."""
        with poutine.block(), BatchTo((s.shape[0], n)), pyro.validation_enabled(False):
            trace = poutine.trace(self._runner(self._which())).get_trace(s)
        return trace.nodes[ACTION]["value"]

    def log_prob_states(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """log p(a|s) for states ``s`` [B, 1 or N, S] and actions ``a`` [B,N,A]."""
        return self._log_prob(s, a, self._which())

    def _log_prob(self, s: torch.Tensor, a: torch.Tensor, which: str) -> torch.Tensor:
        edge = 1.0 - torch.finfo(a.dtype).eps
        with pyro.validation_enabled(False):
            return marginal_log_prob(
                self._runner(which), s, a.clamp(-edge, edge), self.latents, self.latent_samples
            )

    # ---- the Prior interface ------------------------------------------------------------
    def log_prob(
        self, s: torch.Tensor, a: torch.Tensor, u: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(a|s) for states ``s`` [B,S] (or [B,N,S]) and actions ``a`` [B,N,A]
        -> [B,N]: the site ``a`` conditioned on ``a``, latents marginalised.

        Actions are clamped one float step inside (-1, 1), where a tanh-squashed
        density is finite (tanh rounds |u| > 9 to ±1 in float32); the gradient w.r.t.
        ``a`` flows through the site's log-prob.  ``u`` is unused.  A learnable
        program is read with its target parameters θ̄, without gradients to them.
        """
        if a.dim() != 3:
            raise ValueError(f"ProgramPrior.log_prob expects actions [B,N,A], got {tuple(a.shape)}")
        return self.log_prob_states(s.unsqueeze(1) if s.dim() == 2 else s, a)

    def sample(self, s: torch.Tensor, n: int) -> torch.Tensor:
        """n actions per state from the program's site ``a``: states [B,S] -> [B,n,A]."""
        return self._sample(s.unsqueeze(1), n, self._which())

    def default_kl_target(self) -> float:
        if self.learnable:
            # As LearnedPrior: the prior follows the posterior, so the KL bounds how far
            # the posterior departs from a slowly moving prior, not an entropy floor.
            return 0.5
        # SAC's per-dimension budget, as for ConstantTanhGaussianPrior: the posterior may
        # move about as far from the program's prior as SAC's policy moves from the
        # uniform one.  Override with the agent's target_kl_per_dim.
        return 1.0 + math.log(2.0)

    def min_kl_target(self) -> float:
        """The least KL(π‖p) per action dimension a tanh-Gaussian π reaches under this
        program, estimated once by ``mbvi.pyro.kl_floor`` (about log 2 / A under two
        well-separated equal modes).  0 for a learnable program: it moves towards the
        posterior, so the floor of its initial parameters does not last."""
        if self.learnable:
            return 0.0
        if self._floor is None:
            self._floor = kl_floor_per_dim(
                lambda s, a: self.log_prob(s, a), self.sample, self.obs_dim, self.act_dim
            )
        return self._floor

    def min_kl_basis(self) -> str:
        if self.learnable:
            return super().min_kl_basis()
        return (
            "by an estimate (gradient descent over tanh-Gaussians from several starts at "
            "the state s = 0, mbvi.pyro.kl_floor), no tanh-Gaussian posterior gets closer "
            "to it"
        )

    # ---- the M-step of a learnable program ------------------------------------------------
    def eta(self) -> torch.Tensor:
        """The trust-region multiplier η, differentiable in ρ."""
        return (self.dual_lr_scale * self.rho).exp()

    def loss(
        self, s: torch.Tensor, posterior: TanhGaussian
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """M-step loss L(θ, η) at states ``s`` [B,S] given the posterior (a constant),
        as ``LearnedPrior.loss`` with one trust region, all by samples::

            L = KL(π ‖ p_θ) + sg(η) KL_tr + η (ε − sg(KL_tr)/A),  KL_tr = KL(p_θ̄ ‖ p_θ)

        KL(π‖p_θ) is the mean of log π(a) − log p_θ(a|s) over ``fit_samples`` actions
        a ~ π per state; KL_tr the same over actions from the target p_θ̄.  Metrics
        (0-dim, detached): ``kl_posterior`` (summed over action dims, like
        ``train/kl``), ``kl_trust`` (KL_tr per dim, compare with ``eps``), ``eta``."""
        if not self.learnable:
            raise NotImplementedError(f"prior program {self.program!r} has no parameters")
        s3, k = s.unsqueeze(1), self.fit_samples
        with torch.no_grad():
            a, _, log_pi = posterior.detach().rsample_with_log_prob(k)
            a_bar = self._sample(s3, k, "target")
            log_p_bar = self._log_prob(s3, a_bar, "target")
        kl_posterior = (log_pi - self._log_prob(s3, a, "online")).mean()
        kl_trust = (log_p_bar - self._log_prob(s3, a_bar, "online")).mean()
        eta, dims = self.eta(), self.act_dim
        loss = kl_posterior + eta.detach() * kl_trust + eta * (self.eps - kl_trust.detach() / dims)
        metrics = {
            "kl_posterior": kl_posterior.detach(),
            "kl_trust": kl_trust.detach() / dims,
            "eta": eta.detach(),
        }
        return loss, metrics

    @torch.no_grad()
    def update_target(self) -> None:
        """θ̄ ← (1−τ) θ̄ + τ θ, and keep log η within LearnedPrior's bounds."""
        if not self.learnable:
            return
        self.params.update_target(self.tau)
        if self.program_module is not None:
            update_module_target(self.target_module, self.program_module, self.tau)
        k = self.dual_lr_scale
        self.rho.clamp_(LOG_ETA_BOUNDS[0] / k, LOG_ETA_BOUNDS[1] / k)
