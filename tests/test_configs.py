"""Every shipped config is accepted by the CLI's parser and builds its agent."""

import sys

import pytest

from mbvi.cli import TRAINER_DEFAULTS, MbviCLI
from mbvi.training.agent import VariationalAgent
from tests.conftest import CONFIGS

# Agent configs; configs/models/ holds `mbvi fit-model` configs (tests/test_fit_model.py).
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "models")


def test_configs_exist():
    names = {str(p.relative_to(CONFIGS)) for p in SHIPPED}
    assert {"pendulum/sac.yaml", "halfcheetah/iterative_sac.yaml",
            "halfcheetah/direct_cpu.yaml"} <= names  # fmt: skip


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
