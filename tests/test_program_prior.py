"""``ProgramPrior``: a plain Pyro program as an agent's prior, chosen by import path.

Analytic (its log-prob is the hand-written mixture density, its gradient matches finite
differences), the configuration-time errors a bad path or program gets, agreement with
the Pyro optimality model, and the real CLI on the tiny preset."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
import yaml
from mlflow import MlflowClient
from pyro import poutine

from mbvi.errors import ConfigError
from mbvi.pyro import OptimalityModel, ProgramPrior, native_objective
from mbvi.pyro.prior import import_object
from mbvi.variational.distributions import TanhGaussian
from mbvi.variational.objectives import TrajectoryObjective
from tests.conftest import CONFIGS, MBVI, ROOT, cli_env

S, A, B, N = 3, 4, 5, 7
TWO_GAIT = "examples.mixture_prior.two_gait_prior"
FACTORY = "examples.mixture_prior.make_two_gait_prior"
HERE = __name__  # "tests.test_program_prior": the bad programs below are named by path


def _tanh_normal_mixture(a, locs, weights, scale):
    """log Σ_k w_k tanh(N(loc_k, scale²))(a): ``a`` [..., A], ``locs`` [K, A] or
    [..., K, A], ``weights`` [K] or [..., K], by change of variables u = atanh(a)."""
    u = torch.atanh(a).unsqueeze(-2)
    log_u = torch.distributions.Normal(locs, scale).log_prob(u).sum(-1)
    return torch.logsumexp(log_u + weights.log(), -1) - torch.log1p(-a.square()).sum(-1)


def _actions(*shape, dtype=torch.float32):
    return (torch.rand(*shape, dtype=dtype) * 1.9 - 0.95).requires_grad_()


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_log_prob_is_the_mixture_density():
    prior = ProgramPrior(FACTORY, factory=True, factory_args={"offset": 0.8, "scale": 0.5})
    prior.build(S, A)
    a = _actions(B, N, A)
    pattern = torch.tensor([1.0, -1.0, 1.0, -1.0])
    locs = torch.stack([0.8 * pattern, -0.8 * pattern])
    expected = _tanh_normal_mixture(a, locs, torch.full((2,), 0.5), 0.5)

    log_p = prior.log_prob(torch.randn(B, S), a, torch.atanh(a))
    assert log_p.shape == (B, N)
    torch.testing.assert_close(log_p, expected)
    assert prior.distribution(torch.randn(B, S)) is None  # so J̃ takes the sample KL


def test_module_level_program_and_its_default_kl_target():
    prior = ProgramPrior(TWO_GAIT)
    prior.build(S, 1)
    a = _actions(B, N, 1)
    locs = torch.tensor([[1.0], [-1.0]])
    expected = _tanh_normal_mixture(a, locs, torch.full((2,), 0.5), 0.3)
    torch.testing.assert_close(prior.log_prob(torch.randn(B, S), a), expected)
    assert prior.default_kl_target() == pytest.approx(1.0 + math.log(2.0))


def test_state_dependent_program_gets_each_states_row():
    """swing_prior weights the torques ±tanh(1) by softmax(θ̇, −θ̇) of each state."""
    prior = ProgramPrior("examples.mixture_prior.swing_prior")
    prior.build(3, 1)
    s = torch.randn(B, 3) * 2.0
    a = _actions(B, N, 1)
    theta_dot = s[:, 2:3]
    weights = torch.softmax(torch.cat([theta_dot, -theta_dot], -1), -1).unsqueeze(1)  # [B,1,2]
    expected = _tanh_normal_mixture(a, torch.tensor([[1.0], [-1.0]]), weights, 0.3)
    torch.testing.assert_close(prior.log_prob(s, a), expected)
    # per-particle states [B,N,S], as a model step gives them
    s_bn = s.unsqueeze(1).expand(-1, N, -1)
    torch.testing.assert_close(prior.log_prob(s_bn, a), expected)


def test_gradient_in_actions_matches_finite_differences():
    prior = ProgramPrior(FACTORY, factory=True)
    prior.build(S, A)
    s = torch.randn(2, S, dtype=torch.float64)
    a = _actions(2, 3, A, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: prior.log_prob(s, a), (a,), eps=1e-6, atol=1e-5)

    a32 = _actions(B, N, A)
    (grad,) = torch.autograd.grad(prior.log_prob(torch.randn(B, S), a32).sum(), a32)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_saturated_actions_have_finite_density_and_gradient():
    """tanh rounds |u| > 9 to ±1 in float32: the density there must stay finite."""
    prior = ProgramPrior(FACTORY, factory=True)
    prior.build(S, A)
    u = torch.tensor([[[12.0, -12.0, 0.1, 20.0]]], requires_grad=True)
    a = torch.tanh(u)
    assert (a.abs() == 1).sum() == 3
    log_p = prior.log_prob(torch.zeros(1, S), a, u)
    (grad,) = torch.autograd.grad(log_p.sum(), u)
    assert torch.isfinite(log_p).all() and torch.isfinite(grad).all()


def test_objective_uses_the_program_density_as_the_sample_kl():
    """J̃ = E[Q̂] − α (E log π − E log p_program) on the posterior's own samples."""
    prior = ProgramPrior(FACTORY, factory=True)
    prior.build(S, A)
    s = torch.randn(B, S)
    posterior = TanhGaussian(0.3 * torch.randn(B, A), torch.full((B, A), -0.5))

    def value(s, a):
        return -(a - 0.5).square().sum(-1)

    torch.manual_seed(1)
    j, metrics = TrajectoryObjective(s, value, prior, 0.2)(posterior, N)
    torch.manual_seed(1)
    a, u, log_pi = posterior.rsample_with_log_prob(N)
    locs = torch.stack([torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([-1.0, 1.0, -1.0, 1.0])])
    log_p = _tanh_normal_mixture(a, locs, torch.full((2,), 0.5), 0.3)
    torch.testing.assert_close(metrics["kl"], (log_pi - log_p).mean(-1).detach())
    torch.testing.assert_close(j, value(s, a).mean(-1) - 0.2 * (log_pi - log_p).mean(-1))


def test_optimality_model_runs_the_program_and_agrees_with_native():
    """α·ELBO of the Pyro model with a ProgramPrior = native_objective on its samples."""
    prior = ProgramPrior(FACTORY, factory=True)
    prior.build(S, A)
    s = torch.randn(B, S)

    def leaf(s, a):
        return -(a - 0.5).square().sum(-1)

    model = OptimalityModel(prior, leaf, 0.3, n_particles=N)
    posterior = TanhGaussian(0.3 * torch.randn(B, A), torch.full((B, A), -0.5))
    guide = model.guide(posterior)
    trace = poutine.trace(guide).get_trace(s)
    actions = trace.nodes["a_0"]["value"].unsqueeze(0)
    elbo = model.elbo(poutine.replay(guide, trace=trace), s)
    j, _ = native_objective(model, s, posterior, actions=actions)
    torch.testing.assert_close(elbo, j.sum(), rtol=1e-4, atol=1e-4)
    assert "a_0" in poutine.trace(model).get_trace(s).nodes


# ---- bad paths and bad programs: ConfigError at configuration time ---------------------


def no_action_site(s):
    return pyro.sample("action", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))


def wrong_action_dim(s):
    return pyro.sample("a", dist.Uniform(-torch.ones(3), torch.ones(3)).to_event(1))


def no_event_dim(s):
    return pyro.sample("a", dist.Uniform(-torch.ones(2), torch.ones(2)))


def unbounded_support(s):
    return pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def uncountable_latent(s):
    count = pyro.sample("count", dist.Poisson(3.0))
    base = dist.Normal(0.1 * count.unsqueeze(-1) * torch.ones(2), 0.3).to_event(1)
    return pyro.sample("a", dist.TransformedDistribution(base, [dist.transforms.TanhTransform()]))


_NET = torch.nn.Linear(3, 2)


def module_in_a_function(s):
    pyro.module("net", _NET)
    return pyro.sample("a", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))


def factor_site(s):
    pyro.factor("prefer", torch.tensor(1.0))
    return pyro.sample("a", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))


def reads_missing_state(s):
    return pyro.sample("a", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)) * s[..., 9]


def not_a_program_factory(act_dim):
    return 42


NOT_A_FUNCTION = 1.5

BAD_PROGRAMS = {
    "no_action_site": r"'tests.test_program_prior.no_action_site' has no action site: it sampled \['action'\].*\(2, 3, 2\) = \[states, particles, act_dim\]",
    "wrong_action_dim": r"'tests.test_program_prior.wrong_action_dim': action site 'a' .*has shape \(2, 3, 3\).*expected \(2, 3, 2\)",
    "no_event_dim": r"'tests.test_program_prior.no_event_dim' failed inside the plates \[states=2, particles=3\].*event shape \(2,\), e.g. via .to_event\(1\)",
    "unbounded_support": r"'tests.test_program_prior.unbounded_support': action site 'a' \(recorded as 'a_0'\) sampled -?\d\.\d+ in action dim \d .*reports support Real.*must lie in \[-1, 1\]\^2",
    "uncountable_latent": r"'tests.test_program_prior.uncountable_latent': latent site 'count' \(Poisson\) cannot be enumerated .*no continuous density",
    "module_in_a_function": r"'tests.test_program_prior.module_in_a_function' registers a torch module's parameter 'net\$\$\$weight' .*make the program itself a PyroModule",
    "factor_site": r"'tests.test_program_prior.factor_site' has an observed site 'prefer' \(a pyro.factor",
    "reads_missing_state": r"'tests.test_program_prior.reads_missing_state' failed on probe states of shape \(2, 1, 3\).*IndexError",
}


@pytest.mark.parametrize("name", list(BAD_PROGRAMS))
def test_bad_programs_fail_at_build(name):
    prior = ProgramPrior(f"{HERE}.{name}")
    with pytest.raises(ConfigError, match=BAD_PROGRAMS[name]):
        prior.build(S, 2)


BAD_PATHS = {
    "two_gait_prior": r"'two_gait_prior' is not an import path 'package.module.function'",
    "no_such_pkg.priors.mine": r"'no_such_pkg.priors.mine': cannot import module 'no_such_pkg.priors' \(No module named 'no_such_pkg'\).*Run mbvi from the folder that holds 'no_such_pkg', add that folder to PYTHONPATH",
    "examples.mixture_prior.three_gait_prior": r"module 'examples.mixture_prior' has no 'three_gait_prior'; it defines \[.*'make_two_gait_prior'.*\]",
    f"{HERE}.NOT_A_FUNCTION": r"'tests.test_program_prior.NOT_A_FUNCTION' is a float, not a function",
}


@pytest.mark.parametrize("path", list(BAD_PATHS))
def test_bad_paths_fail_at_build(path):
    with pytest.raises(ConfigError, match=BAD_PATHS[path]):
        ProgramPrior(path).build(S, 2)


def test_bad_factories_fail_at_build():
    with pytest.raises(ConfigError, match=r"factory_args \{'scale': 0.5\} but factory=false"):
        ProgramPrior(FACTORY, factory_args={"scale": 0.5}).build(S, 2)
    with pytest.raises(
        ConfigError, match=r"failed when called with act_dim=2 .*'width'.*TypeError"
    ):
        ProgramPrior(FACTORY, factory=True, factory_args={"width": 1.0}).build(S, 2)
    with pytest.raises(ConfigError, match=r"returned a int, not a Pyro program"):
        ProgramPrior(f"{HERE}.not_a_program_factory", factory=True).build(S, 2)


def test_a_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    """The ``mbvi`` console script does not put the working directory on sys.path."""
    (tmp_path / "my_cwd_prior.py").write_text(
        "import pyro, pyro.distributions as dist, torch\n"
        "def prior(s):\n"
        "    one = torch.ones(1, dtype=s.dtype)\n"
        "    return pyro.sample('a', dist.Uniform(-one, one).to_event(1))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    program = import_object("my_cwd_prior.prior")
    assert sys.path == before  # the working directory was not left on the path
    prior = ProgramPrior("my_cwd_prior.prior")
    prior.build(S, 1)
    torch.testing.assert_close(
        prior.log_prob(torch.zeros(2, S), torch.ones(2, 3, 1)), torch.full((2, 3), -math.log(2.0))
    )
    assert callable(program)


def test_program_prior_config():
    config = yaml.safe_load((CONFIGS / "pendulum" / "program_prior.yaml").read_text())
    model = config["model"]
    assert model["prior"]["class_path"] == "mbvi.pyro.ProgramPrior"
    assert model["engine"]["class_path"] == "mbvi.planners.Direct"
    assert model["value"]["class_path"] == "mbvi.TwinQ"
    assert model["total_env_steps"] == 10000
    assert config["trainer"]["logger"]["init_args"]["experiment_name"] == "pendulum"
    ProgramPrior(**model["prior"]["init_args"]).build(3, 1)  # Pendulum's sizes


def _mbvi_with_program(cwd, program, env, *args):
    return subprocess.run(
        [MBVI, "fit", "--config", str(CONFIGS / "pendulum" / "tiny.yaml")]
        + ["--model.prior", "mbvi.pyro.ProgramPrior", "--model.prior.init_args.program", program]
        + list(args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_trains_with_a_program_prior(tmp_path):
    """The real entry point on the tiny preset; ``examples`` is found via PYTHONPATH
    because the run's working directory (its mlflow.db) is not the repository root."""
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = _mbvi_with_program(tmp_path, TWO_GAIT, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["prior"] == "ProgramPrior"
    assert run.data.params["prior.program"] == TWO_GAIT
    assert math.isfinite(run.data.metrics["train/kl"])


def test_cli_fits_a_learnable_program_prior_in_the_m_step(tmp_path):
    """A PyroModule prior with a latent gait, named on the command line: its parameters
    are trained (the prior's loss is logged) and checkpointed."""
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    module = "examples.latent_prior.GaitModule"
    args = ["--model.prior.init_args.factory", "true", "--model.total_env_steps", "200"]
    proc = _mbvi_with_program(tmp_path, module, env, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["prior.program"] == module
    assert math.isfinite(run.data.metrics["prior/kl_posterior"])
    assert run.data.metrics["prior/eta"] > 0
    ckpt = tmp_path / "checkpoints" / run.info.run_id / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    online, target = state["prior.program_module.locs"], state["prior.target_module.locs"]
    initial = torch.tensor([[1.0], [-1.0]])
    assert not torch.equal(online, initial) and not torch.equal(target, initial)


def test_cli_reports_an_unimportable_program_in_one_line(tmp_path):
    proc = _mbvi_with_program(tmp_path, TWO_GAIT, cli_env())  # no PYTHONPATH, cwd elsewhere
    assert proc.returncode == 2, proc.stderr[-3000:]
    # "No module named 'examples.mixture_prior'" where another package installs a
    # top-level `examples` (seen on a GPU image).
    assert re.search(
        r"mbvi: error: prior program 'examples\.mixture_prior\.two_gait_prior': cannot import "
        r"module 'examples\.mixture_prior' \(No module named 'examples(\.mixture_prior)?'\)",
        proc.stderr,
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
