"""The real ``mbvi`` entry point on the tiny preset, read back from the MLflow store.

Runs that train, resume or get a signal go through the installed console script in a
subprocess; checks that fail before training call the same entry point,
``mbvi.cli.main``, in this process (an interpreter start-up costs ~10 s per case).
"""

import signal
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from mbvi import VariationalAgent
from tests.conftest import CONFIGS, MBVI, cli_env, run_cli_in_process, stop_once_checkpointed

TINY = str(CONFIGS / "pendulum" / "tiny.yaml")


def run_mbvi(cwd, *args, timeout=300):
    return subprocess.run(
        [MBVI, "fit", "--config", TINY, *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_mbvi_here(capsys, *args, config=TINY) -> tuple[int, str, str]:
    """``mbvi fit --config <config> *args`` in this process -> (exit status, stdout,
    stderr)."""
    return run_cli_in_process(capsys, "fit", "--config", config, *args)


def runs(cwd, experiment="tiny"):
    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests that read a finished run or its checkpoint."""
    cwd = tmp_path_factory.mktemp("trained")
    proc = run_mbvi(cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, found = runs(cwd)
    assert len(found) == 1
    run = found[0]
    ckpt = cwd / "checkpoints" / run.info.run_id / "last.ckpt"
    return cwd, client, run, ckpt


def test_fit_records_params_metrics_artifacts_and_status(trained):
    cwd, client, run, ckpt = trained
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "Direct-Uniform-seed0"  # the design choices and the seed
    p = run.data.params
    assert (p["prior"], p["engine"], p["value"]) == ("UniformPrior", "Direct", "TwinQ")
    assert (p["env_id"], p["seed"], p["batch_size"]) == ("Pendulum-v1", "0", "32")
    assert p["engine.hidden"] == "(32, 32)"
    for key in [
        "train/episode_return",
        "eval/return",
        "perf/env_steps_per_s",
        "loss/value",
        "loss/engine",
        "train/alpha",
        "train/kl",
    ]:
        assert key in run.data.metrics, key
    eval_steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/return")]
    assert eval_steps == [200, 300]
    episode_steps = [
        m.step for m in client.get_metric_history(run.info.run_id, "train/episode_return")
    ]
    assert episode_steps == [200]  # Pendulum's 200-step time limit
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints"} <= artifacts
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(cwd))
    assert "total_env_steps: 300" in open(config).read()
    state = torch.load(ckpt, weights_only=True)
    assert state["mbvi"]["env_steps"] == 300 and len(state["mbvi"]["buffer"]["rew"]) == 300


def test_help_documents_every_hyperparameter(workdir, capsys):
    code, out, _ = run_mbvi_here(capsys, "--help")
    assert code == 0
    for option in [
        "--model.total_env_steps",
        "--model.updates_per_step",
        "--model.prior",
        "--model.engine",
        "--model.value",
        "--model.target_kl_per_dim",
        "--ckpt_path",
    ]:
        assert option in out, option
    assert "training budget in environment steps" in out
    code, printed, _ = run_mbvi_here(capsys, "--print_config")
    assert code == 0
    assert "class_path: mbvi.planners.Direct" in printed
    assert "tau: 0.005" in printed  # defaults of the chosen components show too


def test_a_users_own_classes_in_the_working_directory_are_found(workdir, capsys):
    (workdir / "my_priors.py").write_text(
        "from mbvi import ConstantTanhGaussianPrior\n\n\n"
        "class WidePrior(ConstantTanhGaussianPrior):\n"
        "    def __init__(self, scale: float = 2.0):\n"
        "        super().__init__(scale=scale)\n"
    )
    code, out, err = run_mbvi_here(capsys, "--model.prior", "my_priors.WidePrior", "--print_config")
    assert code == 0, err[-2000:]
    assert "class_path: my_priors.WidePrior" in out


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    cwd, _, first, ckpt = trained
    proc = run_mbvi(cwd, "--model.total_env_steps", "500", "--ckpt_path", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, found = runs(cwd)
    resumed = [r for r in found if r.info.run_id != first.info.run_id]
    assert len(resumed) == 1 and resumed[0].info.status == "FINISHED"
    assert resumed[0].data.tags["mbvi.resumed_from"] == first.info.run_id
    rid = resumed[0].info.run_id
    steps = [m.step for m in client.get_metric_history(rid, "perf/env_steps_per_s")]
    assert min(steps) > 300 and max(steps) == 500
    state = torch.load(cwd / "checkpoints" / rid / "last.ckpt", weights_only=True)
    assert state["mbvi"]["env_steps"] == 500
    assert len(state["mbvi"]["buffer"]["rew"]) == 500
    old = torch.load(ckpt, weights_only=True)["mbvi"]["buffer"]
    assert torch.equal(state["mbvi"]["buffer"]["obs"][:300], old["obs"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.env_id", "Pendulm-v1"],
            "env 'Pendulm-v1' is not registered with gymnasium. Did you mean 'Pendulum-v1'",
        ),
        (
            ["--model.env_id", "CartPole-v1"],
            "has a Discrete action space; mbvi needs continuous Box actions",
        ),
        (["--model.bogus", "1"], "bogus"),
        # a prefix of total_env_steps: refused, not taken for it
        (["--model.total_env_step", "100"], "unrecognized arguments: --model.total_env_step"),
        (["--model.batch_size", "abc"], "batch_size"),
        (["--model.init_alpha", "0"], "init_alpha must be > 0"),
        (["--model.target_kl_per_dim", "-1"], "the KL target per action dimension must be > 0"),
        (
            ["--trainer.logger.init_args.tracking_uri", "http://127.0.0.1:9"],
            "cannot use the MLflow tracking URI 'http://127.0.0.1:9'",
        ),
        (
            ["--trainer.logger.init_args.tracking_uri", "foo://bar"],
            "cannot use the MLflow tracking URI 'foo://bar'",
        ),
        (  # a store path under something that is not a folder
            ["--trainer.logger.init_args.tracking_uri", "sqlite:////dev/null/m.db"],
            "cannot use the MLflow tracking URI 'sqlite:////dev/null/m.db'",
        ),
        (["--ckpt_path", "nowhere/last.ckpt"], "checkpoint 'nowhere/last.ckpt' does not exist"),
        (["--ckpt_path", "."], "checkpoint '.' is a folder, not a checkpoint file"),
        (["--model.seed", "-1"], "seed must be in [0, 2**32), got -1"),
        (  # a component's own check, raised while jsonargparse builds it
            ["--model.engine", "mbvi.planners.Iterative", "--model.engine.iterations", "0"],
            "Iterative: iterations must be >= 1, got 0",
        ),
        (["--model.warmup_steps", "5000"], "no update would ever run"),
        (["--model.value_lr", "-0.01"], "value_lr must be >= 0 (0 holds that part fixed)"),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_error(workdir, capsys, args, message):
    code, _, err = run_mbvi_here(capsys, *args)
    assert code == 2, err[-2000:]
    assert message in err, err[-2000:]
    _, found = runs(workdir)
    assert all(r.data.metrics == {} for r in found)  # nothing trained


def test_the_console_script_reports_bad_input_in_one_line(workdir):
    """Through the installed script: exit status 2 and no traceback, for an error that
    jsonargparse raises wrapped in its own while it builds a component."""
    proc = run_mbvi(
        workdir, "--model.engine", "mbvi.planners.Iterative", "--model.engine.iterations", "0"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mbvi: error: Iterative: iterations must be >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_corrupt_checkpoint_is_rejected(workdir, capsys):
    bad = workdir / "corrupt.ckpt"
    bad.write_bytes(b"not a checkpoint" * 100)
    code, _, err = run_mbvi_here(capsys, "--ckpt_path", str(bad))
    assert code == 2
    assert f"checkpoint '{bad}' cannot be read" in err


def test_checkpoint_from_another_env_is_rejected(trained, workdir, capsys):
    _, _, _, ckpt = trained
    code, _, err = run_mbvi_here(
        capsys, "--model.env_id", "MountainCarContinuous-v0", "--ckpt_path", str(ckpt)
    )
    assert code == 2
    assert (
        "is from env 'Pendulum-v1' but this run is configured for 'MountainCarContinuous-v0'" in err
    )


def test_checkpoint_of_another_engine_is_rejected(trained, workdir, capsys):
    _, _, _, ckpt = trained
    code, _, err = run_mbvi_here(
        capsys, "--model.engine", "mbvi.planners.Iterative", "--model.engine.init_loc", "0",
        "--model.engine.init_log_scale", "0", "--ckpt_path", str(ckpt),
    )  # fmt: skip
    assert code == 2, err[-2000:]
    assert "was written by a Direct engine, but this run is configured with Iterative" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_writes_a_checkpoint_and_marks_the_run_killed(workdir, sig):
    """Ctrl-C, or SIGTERM from a job scheduler, with the progress bar on (the default)."""
    code, out = stop_once_checkpointed(
        ["fit", "--config", TINY, "--model.total_env_steps", "1000000",
         "--model.buffer_size", "5000", "--model.progress_refresh_s", "0.5"],
        workdir, "checkpoints/*/last.ckpt", sig,
    )  # fmt: skip
    # A stopped run is no success: 1 after Ctrl-C, 143 (128 + SIGTERM) after SIGTERM.
    assert code == (1 if sig == signal.SIGINT else 143), out[-2000:]
    _, found = runs(workdir)
    assert found[0].info.status == "KILLED", out[-2000:]
    ckpt = workdir / "checkpoints" / found[0].info.run_id / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["mbvi"]["env_steps"] >= 50
    assert f"interrupted at env step {state['mbvi']['env_steps']}" in out
    if sig == signal.SIGINT:  # the first Ctrl-C says the stop is coming
        assert "mbvi: stopping after this batch" in out


def test_a_checkpoint_loads_as_the_trained_agent(trained):
    """load_from_checkpoint rebuilds the configured components (32-wide networks here,
    not the defaults) with the trained weights, from a weights_only load."""
    _, _, _, ckpt = trained
    agent = VariationalAgent.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert agent.engine.hidden == (32, 32) and agent.value.hidden == (32, 32)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, tensor in agent.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert agent.env_steps == 300 and len(agent.buffer) == 300


def test_a_model_based_run_resumes_from_its_checkpoint(workdir, capsys):
    """A model-based value checkpoints its model's optimiser as extra state (a dict, not
    a tensor); checking the checkpoint against the agent must accept it."""
    config = str(CONFIGS / "pendulum" / "mb_tiny.yaml")
    code, _, err = run_mbvi_here(capsys, "--model.total_env_steps", "150", config=config)
    assert code == 0, err[-3000:]
    (ckpt,) = workdir.glob("checkpoints/*/last.ckpt")
    code, _, err = run_mbvi_here(
        capsys, "--model.total_env_steps", "200", "--ckpt_path", str(ckpt), config=config
    )
    assert code == 0, err[-3000:]
    (resumed,) = [p for p in workdir.glob("checkpoints/*/last.ckpt") if p != ckpt]
    assert torch.load(resumed, weights_only=True)["mbvi"]["env_steps"] == 200


def test_compare_and_sweep_start_without_torch_or_lightning():
    """The dispatcher, ``mbvi compare`` and ``mbvi sweep`` import neither torch nor
    Lightning (seconds of start-up): only ``mbvi fit`` and its kin need them."""
    code = (
        "import sys\n"
        "import mbvi.cli, mbvi.tracking, mbvi.tracking.compare, mbvi.tracking.sweep\n"
        "import mbvi.tracking.sweep_services, mbvi.tracking.sweep_table\n"
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_help_lists_every_command_and_a_typo_gets_the_closest(workdir):
    """``mbvi --help`` names every subcommand (not LightningCLI's ``fit`` alone), and an
    unknown one is refused with the nearest name, through the console script."""
    done = subprocess.run([MBVI, "--help"], cwd=workdir, capture_output=True, text=True)
    assert done.returncode == 0
    for name in ("fit", "compare", "sweep", "table", "render", "fit-model",
                 "export-transitions", "convert-checkpoint"):  # fmt: skip
        assert f"\n  {name} " in done.stdout, name
    done = subprocess.run([MBVI, "comapre"], cwd=workdir, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("mbvi: error: unknown command 'comapre'; did you mean 'compare'?")
    assert not list(workdir.iterdir())  # nothing started, nothing written
