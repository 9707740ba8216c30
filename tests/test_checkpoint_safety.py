"""Checkpoints load without running code: what mbvi writes loads with
``weights_only=True``; a checkpoint carrying a pickle payload is refused by every
command and script that loads one, before the payload runs; an old checkpoint that
needs full pickle is refused with the command that converts it, and the converted file
resumes."""

import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mbvi import TwinQ, UniformPrior, VariationalAgent
from mbvi.errors import CheckpointError
from mbvi.planners import Direct
from mbvi.training.checkpoints import load_agent
from tests.conftest import CONFIGS, ROOT, TINY_AGENT, cli_env, fit_agent, run_cli_in_process

TINY = str(CONFIGS / "pendulum" / "tiny.yaml")
MODELS = str(CONFIGS / "models" / "pendulum.yaml")


class Payload:
    """Unpickling this runs ``exec``, which writes ``marker``: what a hostile checkpoint
    would do with a shell command instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class Unconvertible:
    """An object with no plain-data form (picklable by reference to this module)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The last.ckpt of a 200-step agent of configs/pendulum/tiny.yaml's sizes."""
    cwd = tmp_path_factory.mktemp("trained")
    agent = VariationalAgent(
        "Pendulum-v1",
        engine=Direct(hidden=(32, 32)),
        value=TwinQ(hidden=(32, 32)),
        **{**TINY_AGENT, "total_env_steps": 200},
    )
    fit_agent(agent, cwd, logger=False)
    return cwd / "checkpoints" / "offline" / "last.ckpt"


@pytest.fixture
def hostile(checkpoint, tmp_path) -> tuple[Path, Path]:
    """(a real agent checkpoint with a payload added, the file the payload writes)."""
    marker = tmp_path / "payload-ran"
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["mbvi"]["note"] = Payload(marker)
    path = tmp_path / "hostile.ckpt"
    torch.save(ckpt, path)
    torch.load(path, weights_only=False)  # the payload is live: full pickle runs it
    assert marker.read_text() == "ran"
    marker.unlink()
    return path, marker


def old_checkpoint(checkpoint: Path, path: Path) -> Path:
    """``checkpoint`` as the first mbvi versions wrote it: numpy's random state with its
    key as an array, and the prior as an object instead of a config dict."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["mbvi"]["rng"]["numpy"] = np.random.get_state()
    ckpt["hyper_parameters"]["prior"] = UniformPrior()
    torch.save(ckpt, path)
    return path


def no_runs(cwd: Path) -> bool:
    if not (cwd / "mlflow.db").exists():
        return True
    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_what_mbvi_writes_loads_without_pickle(checkpoint):
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint) == []
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["mbvi"]["env_steps"] == 200
    assert load_agent(checkpoint).env_steps == 200


def _refused(err: str, path: Path) -> None:
    line = f"checkpoint '{path}' holds Python objects (builtins.exec)"
    assert line in err, err[-2000:]
    assert f"mbvi convert-checkpoint --trust {path} NEW.ckpt" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "command",
    [
        ["fit", "--config", TINY, "--model.total_env_steps", "400", "--ckpt_path", "{ckpt}"],
        ["export-transitions", "--ckpt", "{ckpt}", "--out", "buffer.npz"],
        ["fit-model", "--config", MODELS, "--data.path", "{ckpt}"],  # a buffer as data
        ["fit-model", "--config", MODELS, "--data.path", "{good}", "--init_from", "{ckpt}"],
        ["fit-model", "--config", MODELS, "--data.path", "{good}", "--ckpt_path", "{ckpt}"],
    ],
    ids=[
        "fit-resume",
        "export-transitions",
        "fit-model-data",
        "fit-model-init",
        "fit-model-resume",
    ],
)
def test_every_command_refuses_a_payload_before_it_runs(
    command, hostile, checkpoint, workdir, capsys
):
    path, marker = hostile
    argv = [a.format(ckpt=path, good=checkpoint) for a in command]
    code, _, err = run_cli_in_process(capsys, *argv)
    assert code == 2, err[-2000:]
    _refused(err, path)
    assert not marker.exists()
    assert no_runs(workdir)  # refused before any run was started


def test_a_bare_pickle_payload_is_refused_and_garbage_is_called_corrupt(workdir, capsys):
    """Not only torch.save's zip files: a bare pickle is read opcode by opcode to name
    what it would run, and bytes that are no pickle are reported as corrupt."""
    marker = workdir / "payload-ran"
    bare = workdir / "bare.ckpt"
    bare.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    resume = ["fit", "--config", TINY, "--model.total_env_steps", "400", "--ckpt_path"]
    code, _, err = run_cli_in_process(capsys, *resume, str(bare))
    assert code == 2
    _refused(err, bare)
    assert not marker.exists()
    garbage = workdir / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 100)
    code, _, err = run_cli_in_process(capsys, *resume, str(garbage))
    assert code == 2
    assert f"checkpoint '{garbage}' cannot be read (UnpicklingError); it is corrupt" in err


def test_the_benchmark_loader_refuses_a_payload(hostile):
    path, marker = hostile
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint '{path}' holds Python")):
        load_agent(path)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gradient_estimators.py"), "--ckpt", str(path)],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"CheckpointError: checkpoint '{path}' holds Python objects" in proc.stderr
    assert not marker.exists()


def test_full_pickle_cannot_be_asked_for(checkpoint, workdir, capsys):
    code, _, err = run_cli_in_process(
        capsys, "fit", "--config", TINY, "--model.total_env_steps", "400",
        "--ckpt_path", str(checkpoint), "--weights_only", "false",
    )  # fmt: skip
    assert code == 2
    assert "--weights_only false would load the checkpoint with full pickle" in err


def test_an_old_checkpoint_is_refused_then_converted_and_resumed(checkpoint, workdir, capsys):
    old = old_checkpoint(checkpoint, workdir / "old.ckpt")
    new = workdir / "new.ckpt"
    resume = ["fit", "--config", TINY, "--model.total_env_steps", "300", "--ckpt_path"]

    code, _, err = run_cli_in_process(capsys, *resume, str(old))
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("mbvi: error:")]
    assert "holds Python objects (" in line and "numpy.ndarray" in line
    assert f"`mbvi convert-checkpoint --trust {old} NEW.ckpt`" in line

    code, _, err = run_cli_in_process(capsys, "convert-checkpoint", str(old), str(new))
    assert code == 2 and "pass --trust to confirm that you trust its source" in err
    assert not new.exists()

    code, out, err = run_cli_in_process(capsys, "convert-checkpoint", "--trust", str(old), str(new))
    assert code == 0, err[-2000:]
    assert f"converted {old} -> {new}" in out
    converted = torch.load(new, weights_only=True)
    name, keys, *rest = converted["mbvi"]["rng"]["numpy"]
    original = torch.load(old, weights_only=False)["mbvi"]["rng"]["numpy"]
    assert (name, *rest) == (original[0], *original[2:])
    assert np.array_equal(keys.numpy(), original[1])
    assert (
        converted["hyper_parameters"]["prior"]["class_path"]
        == "mbvi.variational.priors.UniformPrior"
    )

    code, _, err = run_cli_in_process(capsys, "convert-checkpoint", "--trust", str(old), str(new))
    assert code == 2 and f"'{new}' exists; pass a new path" in err

    code, _, err = run_cli_in_process(capsys, *resume, str(new))
    assert code == 0, err[-3000:]
    (resumed,) = (workdir / "checkpoints").glob("*/last.ckpt")
    assert torch.load(resumed, weights_only=True)["mbvi"]["env_steps"] == 300


def test_an_object_without_a_plain_form_is_named(checkpoint, workdir, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["mbvi"]["extra"] = Unconvertible()
    torch.save(ckpt, workdir / "odd.ckpt")
    code, _, err = run_cli_in_process(
        capsys, "convert-checkpoint", "--trust", str(workdir / "odd.ckpt"), "odd-new.ckpt"
    )
    assert code == 2
    assert (
        "checkpoint['mbvi']['extra'] is a tests.test_checkpoint_safety.Unconvertible, which has "
        "no plain-data form" in err
    )
    assert not (workdir / "odd-new.ckpt").exists()


def test_nothing_loads_a_checkpoint_past_the_safe_loader():
    """Every load of a checkpoint in mbvi and its benchmarks goes through
    ``safe_load.load_checkpoint`` (or ``load_agent``, which checks with it first)."""
    allowed = {Path("mbvi/training/safe_load.py"), Path("mbvi/training/checkpoints.py")}
    offenders = []
    for folder in ("mbvi", "models", "planners", "benchmarks"):
        for file in (ROOT / folder).rglob("*.py"):
            rel = file.relative_to(ROOT)
            text = file.read_text()
            if rel not in allowed and re.search(
                r"(?<!`)torch\.load\(|load_from_checkpoint\(", text
            ):
                offenders.append(str(rel))
    assert offenders == []


def test_a_folder_passed_as_a_checkpoint_names_the_checkpoints_inside(tmp_path):
    from mbvi.training.safe_load import missing_file

    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "last.ckpt").write_bytes(b"")
    assert missing_file(tmp_path / "nowhere.ckpt") == "does not exist"
    assert missing_file(tmp_path) == (
        "is a folder, not a checkpoint file (checkpoints in it: run1/last.ckpt)"
    )
