"""Errors that speak to the user: each says what was wrong and what to do.

The CLI prints these as one line (no traceback) and exits with status 2.
"""


class MbviError(Exception):
    """Base class of mbvi's user-facing errors."""


class ConfigError(MbviError, ValueError):
    """A hyperparameter or component choice that cannot work."""


class EnvError(MbviError, ValueError):
    """An environment that mbvi cannot use."""


class TrackingError(MbviError, RuntimeError):
    """The MLflow tracking store cannot be used."""


class CheckpointError(MbviError, ValueError):
    """A checkpoint that cannot be resumed from."""


class ComparisonError(MbviError, ValueError):
    """An MLflow experiment or runs that ``mbvi compare`` cannot compare."""


class NonFiniteError(MbviError, FloatingPointError):
    """A NaN or Inf appeared in a loss, an observation or a reward."""
