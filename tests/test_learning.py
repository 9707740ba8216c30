"""SAC learns Pendulum-v1 through the real CLI and config file (a broken agent stays near
−1200).  The learned prior's learning test is in test_learned_prior.py: the two run on
separate xdist workers."""

import pytest

from tests.conftest import PENDULUM_THRESHOLD, pendulum_eval_return


@pytest.mark.slow
def test_sac_learns_pendulum(workdir):
    final = pendulum_eval_return(workdir, "sac.yaml")
    assert final >= PENDULUM_THRESHOLD, f"eval/return {final:.1f} after 5000 env steps"
