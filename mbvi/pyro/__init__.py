"""The optimality graphical model (paper Fig. 1a) in Pyro, its plain-torch twin, and
planning under priors written as Pyro programs.

    model = OptimalityModel(prior, leaf_value=q, alpha=0.2, horizon=3,
                            dynamics=f, reward_fn=r, n_particles=16)
    model(states)                                  # the Pyro program: a_t, r_t, leaf
    guide = model.guide(posterior, policy)         # any engine's posterior as a guide
    j_sum = model.elbo(guide, states)              # α·ELBO = Σ_b J(s_b), Trace_ELBO
    j, metrics = native_objective(model, states, posterior, policy)   # same, [B], fast
    objective = compiled_objective()               # the same, compiled: for act-sized
    j, metrics = objective(model, state, posterior, policy)    # batches in a loop
    plan = importance_plan(model, states)          # Eq. 11 weighted particles
    prior = ProgramPrior("examples.mixture_prior.two_gait_prior")   # an agent's prior
    world = ProgramDynamics("examples.pendulum_physics.PendulumPhysics",   # a world model
                            reward="examples.pendulum_physics.pendulum_reward", factory=True)

``native_objective`` is the hot path; the Pyro model is the reference and the way to
compose user programs (a custom prior, a stochastic dynamics model); ``ProgramPrior``
makes a prior program an agent's prior, chosen in a config by its import path: its
latent sites are summed out (discrete) or importance-weighted (continuous), and its
``pyro.param``s or ``PyroModule`` parameters are fitted in the M-step
(docs/pyro_programs.md).  ``ProgramDynamics`` makes a dynamics program the world
model of ``ModelBasedValue`` and the planners, its parameters fitted by maximum
likelihood on replay transitions.
"""

from mbvi.pyro.dynamics import ProgramDynamics
from mbvi.pyro.importance import importance_plan
from mbvi.pyro.model import OptimalityModel, optimality_model
from mbvi.pyro.native import compiled_objective, native_objective
from mbvi.pyro.prior import ProgramPrior
from mbvi.pyro.sites import ACTION, ClosedUniform, tanh_normal
from mbvi.pyro.world import world_model_programs
from mbvi.variational.particles import WeightedParticles

__all__ = [
    "ACTION",
    "ClosedUniform",
    "OptimalityModel",
    "ProgramDynamics",
    "ProgramPrior",
    "WeightedParticles",
    "compiled_objective",
    "importance_plan",
    "native_objective",
    "optimality_model",
    "tanh_normal",
    "world_model_programs",
]
