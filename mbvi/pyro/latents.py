"""log p(a|s) of a prior program with latent sites: discrete latents summed out exactly,
continuous ones importance-weighted.

A prior program may sample latent variables z before its action site ``a`` (a gait,
then the action given the gait), so the prior's density is the marginal

    p(a|s) = Σ_{z_d} ∫ p(z_d, z_c | s) p(a | s, z_d, z_c) dz_c.

* **Discrete latents** whose distribution can list its support (``Categorical``,
  ``Bernoulli``, ...) are summed out exactly by Pyro's parallel enumeration
  (``poutine.enum``, set to ``parallel`` on these sites whatever their own ``infer``
  says): each takes all its values at once along a
  dimension left of the plates, and a log-sum-exp over those dimensions leaves
  log p(a|s).  The cost grows as the product of the latents' support sizes.
* **Continuous latents** are drawn K times from the program itself (the prior is the
  proposal, in a plate ``_latent_samples`` of size K at dim -3), and

      log p̂_K(a|s) = log (1/K) Σ_k p(a | s, z_k),  z_k ~ p(z|s),

  the importance-weighted (IWAE) estimate with weights p(a, z_k)/p(z_k) = p(a|s, z_k).
  It is unbiased for p(a|s) but, by Jensen's inequality, biased low for log p(a|s):
  E[log p̂_K] = log p − Var_z[p(a|s,z)] / (2 K p(a|s)²) + O(1/K²), so the sample KL of
  Eq. 16 that reads it is biased high by the same O(1/K) amount, largest where a
  single latent value explains the action (actions far in the tails of p).
  ``tests/test_program_latents.py`` measures it against a closed form.

Any other latent (a discrete distribution with no finite support to enumerate, such as
``Poisson``) and any observed site besides ``a`` (a ``pyro.factor`` would make p(a|s)
unnormalised) are refused with a ``ConfigError`` naming the site.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from mbvi.errors import ConfigError
from mbvi.pyro.sites import ACTION

_LATENT_PLATE = "_latent_samples"


@dataclass(frozen=True)
class Latents:
    """The latent sites of a prior program, by how ``marginal_log_prob`` removes them."""

    enumerated: tuple[str, ...] = ()
    """Discrete sites summed out exactly."""
    sampled: tuple[str, ...] = ()
    """Continuous sites importance-weighted with K samples."""

    def __bool__(self) -> bool:
        return bool(self.enumerated or self.sampled)


def _random_sites(trace, action: str):
    for name, site in trace.nodes.items():
        if (
            site["type"] == "sample"
            and name != action
            and not site_is_subsample(site)
            and not site["infer"].get("_deterministic", False)
        ):
            yield name, site


def classify_latents(trace, program: str, action: str = ACTION, suffix: str = "") -> Latents:
    """Sort the random sites of a probe trace other than ``action`` into enumerated and
    importance-sampled ones; ``suffix`` (e.g. ``"_0"``) is stripped from the names
    (``StepSites`` renames sites per step).  ``ConfigError``, naming the site, for an
    observed site and for a discrete site that cannot be enumerated."""
    enumerated, sampled = [], []
    for name, site in _random_sites(trace, action):
        plain, fn = name.removesuffix(suffix), site["fn"]
        if site["is_observed"]:
            raise ConfigError(
                f"prior program {program} has an observed site {plain!r} (a pyro.factor or "
                f"obs=) besides its action site '{ACTION}': it reweights p(a|s) by a factor "
                "whose normaliser mbvi cannot compute; put that preference into the value "
                "estimate, or record values with pyro.deterministic"
            )
        if fn.has_enumerate_support:
            enumerated.append(plain)
        elif getattr(fn.support, "is_discrete", False):
            raise ConfigError(
                f"prior program {program}: latent site {plain!r} ({type(fn).__name__}) cannot "
                "be enumerated (its distribution has no finite support to sum over) and has "
                f"no continuous density to importance-sample, so log p(a|s) cannot be "
                f"computed; give {plain!r} a finite support (Categorical, Binomial, "
                "Bernoulli) or a continuous distribution, or marginalise it inside the "
                f"action site's distribution (MixtureSameFamily)"
            )
        else:
            sampled.append(plain)
    return Latents(tuple(enumerated), tuple(sampled))


def marginal_log_prob(
    program: Callable[[torch.Tensor], object],
    s: torch.Tensor,
    a: torch.Tensor,
    latents: Latents,
    latent_samples: int,
) -> torch.Tensor:
    """log p(a|s) [B,N] of ``program`` for states ``s`` [B, 1 or N, S] and actions
    ``a`` [B,N,A]: the action site's log-prob with ``latents`` summed out (enumerated)
    or importance-weighted with ``latent_samples`` draws (see the module doc)."""
    b, n = a.shape[:2]
    conditioned = poutine.condition(program, data={ACTION: a})
    k = latent_samples if latents.sampled else 1

    def model(s):
        with pyro.plate("states", b, dim=-2), pyro.plate("particles", n, dim=-1):
            if latents.sampled:
                with pyro.plate(_LATENT_PLATE, k, dim=-3):
                    conditioned(s)
            else:
                conditioned(s)

    if latents.enumerated:
        first_free = -4 if latents.sampled else -3
        # Parallel enumeration of exactly these sites, whatever the program's own infer
        # says: config_enumerate keeps a site's "sequential" or None, and such a site
        # would be sampled once, adding one value's log-prob instead of the sum.
        names = set(latents.enumerated)
        model = poutine.infer_config(
            model, lambda msg: {"enumerate": "parallel"} if msg["name"] in names else {}
        )
        model = poutine.enum(model, first_available_dim=first_free)
    trace = poutine.trace(model).get_trace(s)
    site = trace.nodes[ACTION]
    total = site["fn"].log_prob(site["value"])
    for name in latents.enumerated:
        node = trace.nodes[name]
        total = total + node["fn"].log_prob(node["value"])
    if latents.sampled:  # an action that ignores the samples still averages K copies
        total = total.expand(*total.shape[:-3], k, b, n) if total.dim() >= 3 else total
        total = total.expand(k, b, n) if total.dim() < 3 else total
    # Every dim left of [B, N] is an enumerated value or a latent sample: sum over them.
    lead = total.dim() - 2
    if lead > 0:
        total = total.logsumexp(dim=tuple(range(lead)))
    return total - math.log(k) if k > 1 else total


class MarginalAction(TorchDistribution):
    """The marginal p(a|s) of a prior program as one Pyro distribution, so that a Pyro
    model sees a single action site: ``log_prob`` is ``log_prob_fn(s, a)`` (latents
    summed out or importance-weighted) and ``sample`` runs the program.

    Args:
        s: states [B, 1 or N, S] the program is run on.
        log_prob_fn: (s, a [B,N,A]) -> log p(a|s) [B,N].
        sample_fn: (s, n) -> n actions per state [B,n,A], hiding the program's sites.
        act_dim: A, the event size.
        batch_shape: [B, N] once a plate has expanded it; default ``s.shape[:-1]``.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.interval(-1.0, 1.0), 1)

    def __init__(self, s, log_prob_fn, sample_fn, act_dim: int, batch_shape=None):
        self.s, self.log_prob_fn, self.sample_fn = s, log_prob_fn, sample_fn
        shape = torch.Size(s.shape[:-1] if batch_shape is None else batch_shape)
        super().__init__(shape, torch.Size([act_dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return MarginalAction(
            self.s, self.log_prob_fn, self.sample_fn, self.event_shape[0], batch_shape
        )

    def sample(self, sample_shape=()):
        if tuple(sample_shape) or len(self.batch_shape) != 2:
            raise ValueError(
                f"MarginalAction samples one action per [states, particles] entry, got "
                f"sample_shape {tuple(sample_shape)} and batch shape {tuple(self.batch_shape)}"
            )
        return self.sample_fn(self.s, self.batch_shape[1])

    def log_prob(self, value):
        return self.log_prob_fn(self.s, value)


class BatchTo(Messenger):
    """Expands every sample site's distribution to batch shape ``shape`` = (B, N), as
    the ``states`` and ``particles`` plates would.  ``MarginalAction.sample`` runs a
    program inside an enclosing model, where those plates already hold dims -2 and -1
    and cannot be opened again, and hidden from it by ``poutine.block``."""

    def __init__(self, shape: tuple[int, int]):
        super().__init__()
        self.shape = shape

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        msg["fn"] = fn.expand(torch.broadcast_shapes(fn.batch_shape, self.shape))
