"""The agent loop: the Lightning agent (Algorithm 1), its M-step, the environment
runner, replay, checkpoints and the random streams."""
