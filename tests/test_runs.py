"""Reading runs back (``mbvi.tracking.runs``): the pure parts, resumed runs joined into one sample
of their seed.  Loading from a real store is tested through ``mbvi compare``
(``test_compare.py``)."""

import pytest

from mbvi.tracking.runs import RunData, iteration_keys, join_resumed, resume_chains


def run_data(curve, duration_s, env_steps=0):
    return RunData(
        run_id="id-first",
        name="run-3",
        group=("Direct", "UniformPrior", "TwinQ", "Pendulum-v1"),
        seed="3",
        curve=curve,
        duration_s=duration_s,
        env_steps=env_steps,
    )


def test_iteration_keys_need_j_iter_0_and_skip_other_suffixes():
    assert iteration_keys(
        ["engine/j_iter_2", "engine/j_iter_0", "engine/j_iter_x", "loss/value"]
    ) == [0, 2]
    assert iteration_keys(["engine/j_iter_1"]) == []


def test_a_resumed_run_joins_the_run_it_continues():
    first = run_data(curve={100: 1.0, 200: 2.0, 300: 3.0}, duration_s=10.0)
    first.j_iter = {0: {100: 0.5, 300: 0.7}}
    second = run_data(curve={300: 30.0, 400: 40.0}, duration_s=5.0, env_steps=400)
    second.run_id, second.j_iter = "id-resumed", {0: {400: 0.9}}
    joined = join_resumed([first, second])
    assert joined.curve == {100: 1.0, 200: 2.0, 300: 30.0, 400: 40.0}
    assert joined.j_iter == {0: {100: 0.5, 300: 0.7, 400: 0.9}}
    assert joined.duration_s == 15.0 and joined.env_steps == 400
    assert joined.run_id == "id-resumed"


@pytest.mark.parametrize(
    "runs, chains, skipped",
    [
        (  # an extension still running: the finished run stands alone
            [("a", "FINISHED", None, 1), ("b", "RUNNING", "a", 2)], [["a"]], ["b"],
        ),
        (  # a finished run extended by a finished one: one sample
            [("a", "FINISHED", None, 1), ("b", "FINISHED", "a", 2)], [["a", "b"]], [],
        ),
        (  # failed, killed, finished: one sample through all three
            [("a", "FAILED", None, 1), ("b", "KILLED", "a", 2), ("c", "FINISHED", "b", 3)],
            [["a", "b", "c"]], [],
        ),
        (  # resumed twice: the first run's points go to the later resume only
            [("a", "KILLED", None, 1), ("b", "FINISHED", "a", 2), ("c", "FINISHED", "a", 3)],
            [["a", "c"], ["b"]], [],
        ),
        (  # a failed run nobody resumed is skipped
            [("a", "FAILED", None, 1), ("b", "FINISHED", None, 2)], [["b"]], ["a"],
        ),
    ],
)  # fmt: skip
def test_resume_chains(runs, chains, skipped):
    assert resume_chains(runs) == (chains, skipped)
