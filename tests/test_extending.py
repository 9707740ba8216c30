"""Every example in docs/extending.md runs, so that the page cannot drift from the code.

An example is the ```python block after a ``<!-- example: NAME -->`` marker.  Each runs
in this process as a script (``__name__ == "__main__"``, so its own checks run), in a
fresh working directory; the prior example also trains through the real CLI, named by
class path as the page shows.
"""

import re
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import CONFIGS, ROOT, run_cli_in_process

PAGE = ROOT / "docs" / "extending.md"
CONTRACTS = ("prior", "engine", "value", "world_model")


def examples(text: str) -> dict[str, str]:
    """NAME -> code of every ``<!-- example: NAME -->`` block of ``text``."""
    found = re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)\n```", text, re.DOTALL)
    names = [name for name, _ in found]
    assert len(set(names)) == len(names), f"an example name is used twice: {names}"
    return dict(found)


EXAMPLES = examples(PAGE.read_text())


def test_every_contract_has_an_example():
    assert sorted(EXAMPLES) == sorted(CONTRACTS)


@pytest.mark.parametrize("name", CONTRACTS)
def test_example_runs(name, workdir):
    code = compile(EXAMPLES[name], f"docs/extending.md ({name} example)", "exec")
    exec(code, {"__name__": "__main__"})
    assert (workdir / "checkpoints").is_dir()  # it trained an agent to its final checkpoint


def test_the_prior_example_trains_through_the_cli(workdir, capsys):
    (workdir / "my_parts.py").write_text(EXAMPLES["prior"])
    try:
        code, _, err = run_cli_in_process(
            capsys, "fit", "--config", str(CONFIGS / "pendulum" / "tiny.yaml"),
            "--model.prior", "my_parts.DampingPrior",
            "--model.prior.init_args.gain", "0.3",
            "--model.total_env_steps", "150", "--model.eval_every", "150",
        )  # fmt: skip
    finally:
        sys.modules.pop("my_parts", None)
    assert code == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["prior"] == "DampingPrior"
    assert float(run.data.params["prior.gain"]) == 0.3
