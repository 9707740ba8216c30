"""What an mbvi checkpoint holds beyond the agent's ``state_dict``, checking a
checkpoint before resuming from it, so that a bad path fails before training, and
loading an agent from one; every load goes through ``safe_load.load_checkpoint``."""

from __future__ import annotations

from pathlib import Path

from mbvi.errors import CheckpointError
from mbvi.training.safe_load import load_checkpoint, missing_file


def validate_checkpoint(path: str | Path, agent) -> dict:
    """Raise ``CheckpointError`` unless ``path`` is an mbvi checkpoint ``agent`` can resume;
    return its mbvi state (env steps, run id of the run that wrote it, ...).

    Checks that the file exists and loads, that it was written by an mbvi agent, that it
    is for the same env and sizes, and that its networks match the configured ones.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} {missing_file(path)}. Pass the path of a .ckpt file "
            "written by a previous run (checkpoints/<run_id>/last.ckpt, or the run's MLflow "
            "artifacts)."
        )
    # mmap: the replay buffer is read from disk only if the checks pass
    unreadable = "it is corrupt or truncated. Resume from an earlier checkpoint of the run."
    ckpt = load_checkpoint(path, unreadable=unreadable, mmap=True)
    if not isinstance(ckpt, dict) or "mbvi" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was not written by an mbvi agent (no 'mbvi' state)."
        )
    saved = ckpt["mbvi"]
    check_engine_format(saved, agent.engine, path)
    env_id = agent.hparams.env_id
    if saved["env_id"] != env_id:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is from env {saved['env_id']!r} but this run is "
            f"configured for {env_id!r}; pass --model.env_id {saved['env_id']} or another "
            "checkpoint."
        )
    total = agent.hparams.total_env_steps
    if saved["env_steps"] >= total:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is at env step {saved['env_steps']}, which already "
            f"reaches this run's budget of {total} env steps; raise --model.total_env_steps "
            "to extend the run."
        )
    expected = agent.state_dict()
    missing = sorted(set(expected) - set(ckpt["state_dict"]))
    unexpected = sorted(set(ckpt["state_dict"]) - set(expected))
    # Extra state (a model-based value's optimiser state) is a dict: it has no shape.
    mismatched = [
        f"{k} {_shape(ckpt['state_dict'][k])} vs {_shape(v)}"
        for k, v in expected.items()
        if k in ckpt["state_dict"] and _shape(ckpt["state_dict"][k]) != _shape(v)
    ]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            part
            for part in [
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {mismatched[:5]}" if mismatched else "",
            ]
            if part
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the configured agent ({detail}). "
            "Resume with the config of the run that wrote it (its config.yaml artifact)."
        )
    return saved


def _shape(x) -> tuple[int, ...] | None:
    return tuple(x.shape) if hasattr(x, "shape") else None


def load_agent(path: str | Path, map_location: str | None = "cpu"):
    """The ``VariationalAgent`` of an mbvi checkpoint, for analysis (benchmarks, videos):
    the file is checked with ``load_checkpoint`` (a missing, unreadable, unsafe or
    non-agent file raises ``CheckpointError``), then Lightning rebuilds the agent from
    it with ``weights_only=True``."""
    from mbvi.training.agent import VariationalAgent  # the agent imports this module

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} {missing_file(path)}; pass an agent checkpoint "
            "(checkpoints/<run_id>/last.ckpt)"
        )
    ckpt = load_checkpoint(path, mmap=True)
    if not isinstance(ckpt, dict) or "mbvi" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was not written by an mbvi agent (no 'mbvi' state)."
        )
    return VariationalAgent.load_from_checkpoint(path, map_location=map_location, weights_only=True)


def check_engine_format(saved: dict, engine, path: str | Path | None = None) -> None:
    """Raise ``CheckpointError`` when the checkpoint's engine parameters were saved under
    another ``state_format`` than ``engine`` reads (checkpoints from before formats were
    recorded count as format 1), or by another engine than ``engine``."""
    name = type(engine).__name__
    where = "this checkpoint" if path is None else f"checkpoint {str(path)!r}"
    saved_name = saved.get("engine", name)  # recorded since checkpoints name their engine
    if saved_name != name:
        raise CheckpointError(
            f"{where} was written by a {saved_name} engine, but this run is configured with "
            f"{name}; configure the engine of the run that wrote it (its config.yaml "
            "artifact) or pass another checkpoint."
        )
    written, reads = saved.get("engine_format", 1), engine.state_format
    if written != reads:
        raise CheckpointError(
            f"{where} holds {name} parameters of state format {written}, but "
            f"this version of mbvi's {name} reads format {reads} (same shapes, different "
            "meaning: its network would misread them). Retrain, or load it with the mbvi "
            "version that wrote it."
        )


def agent_state(agent, rng: dict) -> dict:
    """``checkpoint["mbvi"]``: what ``validate_checkpoint`` checks before a resume (env,
    sizes, engine and its format, env steps, the MLflow run that wrote it) and what the resumed
    run restores (env-step counter, replay buffer, random streams ``rng``)."""
    return {
        "run_id": getattr(agent.logger, "run_id", None),  # the MLflow run, if any
        "env_id": agent.hparams.env_id,
        "obs_dim": agent.runner.obs_dim,
        "act_dim": agent.runner.act_dim,
        "env_steps": agent.env_steps,
        "engine": type(agent.engine).__name__,
        "engine_format": agent.engine.state_format,
        "last_episode_return": agent.last_episode_return,
        "buffer": agent.buffer.state_dict(),
        "rng": rng,
    }


def load_agent_state(agent, state: dict) -> dict:
    """Restore ``agent_state``'s counters and replay buffer into ``agent``; return its
    random-stream state, which the agent restores when fitting starts."""
    check_engine_format(state, agent.engine)
    agent.env_steps = state["env_steps"]
    agent.last_episode_return = state["last_episode_return"]
    agent.setup("load")  # the buffer exists before fit only when loaded for analysis
    agent.buffer.load_state_dict(state["buffer"])
    return state["rng"]
