"""Every shipped config is accepted by the CLI's parser and builds its agent."""

import copy
import sys

import pytest
import yaml

from mbvi.training.agent import VariationalAgent
from mbvi.training.fit_cli import TRAINER_DEFAULTS, MbviCLI
from tests.conftest import CONFIGS

# Agent configs; configs/models/ holds `mbvi fit-model` configs (tests/test_fit_model.py).
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "models")


def test_configs_exist():
    names = {str(p.relative_to(CONFIGS)) for p in SHIPPED}
    assert {"pendulum/sac.yaml", "halfcheetah/iterative_sac.yaml",
            "halfcheetah/direct_cpu.yaml", "halfcheetah/paper_direct.yaml",
            "halfcheetah/paper_iterative.yaml", "halfcheetah/paper_direct_cpu.yaml",
            "halfcheetah/paper_iterative_cpu.yaml"} <= names  # fmt: skip


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_builds_its_agent(path, workdir, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mbvi"])  # as if typed: `mbvi --config <path>`
    cli = MbviCLI(
        VariationalAgent,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=False,
        auto_configure_optimizers=False,
        run=False,
        args=["--config", str(path)],
    )
    agent = cli.model
    assert isinstance(agent, VariationalAgent)
    assert agent.hparams.env_id in {"Pendulum-v1", "HalfCheetah-v5"}
    # The shipped components are the ones the config names.
    engine = cli.config["model"]["engine"]
    if engine is not None:
        assert type(agent.engine).__name__ == engine["class_path"].rsplit(".", 1)[-1]


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / "halfcheetah" / name).read_text())


def _without(config: dict, *keys: tuple[str, ...]) -> dict:
    """A deep copy of ``config`` without the entries at the key paths ``keys``."""
    config = copy.deepcopy(config)
    for path in keys:
        node = config
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1])
    return config


@pytest.mark.parametrize("suffix", ["", "_cpu"])
def test_paper_pair_differs_in_the_engine_only(suffix):
    """The paper's comparison (§4.1): the same run with the direct and the iterative
    engine, at the paper's settings (batch 128, constant prior, SAC's α procedure)."""
    direct, iterative = _load(f"paper_direct{suffix}.yaml"), _load(f"paper_iterative{suffix}.yaml")
    engine = ("model", "engine")
    assert _without(direct, engine) == _without(iterative, engine)
    model = direct["model"]
    assert model["batch_size"] == 128 and model["alpha_target"] == "entropy"
    assert model["prior"]["class_path"] == "mbvi.ConstantTanhGaussianPrior"
    assert direct["model"]["engine"]["class_path"] == "mbvi.planners.Direct"
    assert iterative["model"]["engine"]["class_path"] == "mbvi.planners.Iterative"
    assert iterative["model"]["engine"]["init_args"]["iterations"] == 2


def test_paper_cpu_pair_differs_in_the_gradient_estimate_only():
    """The CPU pair is the paper pair with the cheap estimator of ∇λJ̃ (N = 4 in
    antithetic pairs instead of N = 200), logged to its own experiment."""
    samples = ("model", "engine", "init_args", "n_samples")
    antithetic = ("model", "engine", "init_args", "antithetic")
    experiment = ("trainer", "logger", "init_args", "experiment_name")
    paper, cpu = _load("paper_iterative.yaml"), _load("paper_iterative_cpu.yaml")
    assert paper["model"]["engine"]["init_args"]["n_samples"] == 200
    assert cpu["model"]["engine"]["init_args"] == {
        **paper["model"]["engine"]["init_args"], "n_samples": 4, "antithetic": True
    }  # fmt: skip
    assert _without(paper, samples, experiment) == _without(cpu, samples, antithetic, experiment)
    direct, direct_cpu = _load("paper_direct.yaml"), _load("paper_direct_cpu.yaml")
    assert _without(direct, experiment) == _without(direct_cpu, experiment)
    names = {c["trainer"]["logger"]["init_args"]["experiment_name"] for c in (paper, cpu)}
    assert names == {"halfcheetah-paper", "halfcheetah-paper-cpu"}
