"""``compile=True``: the update's losses through torch.compile match the eager ones."""

import math

import lightning as L
import torch
from mlflow import MlflowClient

from mbvi import MLflowTracker, TwinQ, VariationalAgent
from mbvi.models.mlp import EnsembleMLP, _MaskFreeReLU, mlp
from mbvi.planners import SMC, Direct
from tests.conftest import TINY_AGENT, accelerator, fit_agent


def test_mask_free_relu_has_relus_values_and_gradients():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0], requires_grad=True)
    y = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0], requires_grad=True)
    grad = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])
    out = _MaskFreeReLU.apply(x)
    assert torch.equal(out, torch.relu(y))
    out.backward(grad)
    torch.relu(y).backward(grad)
    assert torch.equal(x.grad, y.grad)
    assert x.grad.tolist() == [0.0, 0.0, 0.0, -4.0, 5.0]


def test_compiled_mlps_match_eager_ones():
    torch.manual_seed(0)
    nets = [mlp(5, (16, 16), 3), EnsembleMLP(2, 5, (16, 16), 1)]
    x = torch.randn(64, 5)
    for net in nets:
        eager_out = net(x)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), list(net.parameters()))
        compiled_out = torch.compile(net)(x)
        compiled_grads = torch.autograd.grad(compiled_out.square().sum(), list(net.parameters()))
        torch.testing.assert_close(compiled_out, eager_out)
        for c, e in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(c, e)


def _agent(compile: bool, **overrides) -> VariationalAgent:
    return VariationalAgent(
        "Pendulum-v1",
        engine=Direct(hidden=(32, 32)),
        value=TwinQ(hidden=(32, 32)),
        compile=compile,
        **{**TINY_AGENT, **overrides},
    )


def test_compiled_losses_and_gradients_match_eager_ones():
    """Same seed, same batch, same random stream (the compiled losses draw their
    samples from torch's generator, as eager ones do): the same losses, metrics and
    gradients up to float rounding."""
    agents = [_agent(compile=False), _agent(compile=True)]
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(32, 3, generator=g),
        torch.rand(32, 1, generator=g) * 2 - 1,
        torch.randn(32, generator=g),
        torch.randn(32, 3, generator=g),
        (torch.rand(32, generator=g) < 0.1).float(),
    )
    results = []
    for agent in agents:
        torch.manual_seed(7)
        loss, metrics = agent._losses(*batch)
        loss.backward()
        results.append((loss, metrics, [p.grad for p in agent.parameters() if p.grad is not None]))
    (eager_loss, eager_metrics, eager_grads), (loss, metrics, grads) = results
    torch.testing.assert_close(loss, eager_loss)
    assert metrics.keys() == eager_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], eager_metrics[key])
    trained = [p for p in agents[0].parameters() if p.requires_grad]
    assert len(grads) == len(eager_grads) == len(trained)
    for c, e in zip(grads, eager_grads):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)


def test_a_compiled_agent_trains_records_its_setting_and_resumes(workdir):
    logger = MLflowTracker(experiment_name="t", tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    agent = _agent(compile=True, total_env_steps=200)
    fit_agent(agent, workdir, logger)
    assert agent.env_steps == 200
    run = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["compile"] == "True"
    assert math.isfinite(run.data.metrics["loss/value"])

    resumed = _agent(compile=True, total_env_steps=300)
    path = workdir / "checkpoints" / logger.run_id / "last.ckpt"
    trainer = L.Trainer(
        logger=False, max_epochs=-1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(workdir), accelerator=accelerator(),
    )  # fmt: skip
    trainer.fit(resumed, ckpt_path=path)
    assert resumed.env_steps == 300
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    changed = [k for k, v in resumed.state_dict().items() if not torch.equal(v, saved[k])]
    assert "log_alpha" in changed  # it trained on from the checkpoint


def test_compiled_smc_draws_what_eager_smc_draws():
    """``SMC(compile=True)``: the particle loop as one compiled graph (random draws
    left to eager kernels) gives the eager planner's particles and weights for the
    same seed, with a model and resampling by an ESS threshold."""
    from tests.lq_problem import _engine, model_based_objective

    objective = model_based_objective(6)
    results = []
    for compiled in (False, True):
        engine = _engine(SMC(n_particles=32, horizon=3, ess_threshold=0.9, compile=compiled))
        torch.manual_seed(11)
        results.append(engine.infer(objective.states, objective))
    eager, compiled = results
    torch.testing.assert_close(compiled.particles, eager.particles)
    torch.testing.assert_close(compiled.log_weights, eager.log_weights)
    # Resampled particles carry no proposal density, whichever way they were computed.
    assert compiled.proposal_log_prob is None and eager.proposal_log_prob is None
