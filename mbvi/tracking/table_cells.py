"""The cells of ``mbvi table`` (the paper's Table 1): which (posterior, value, prior)
combinations exist, the overrides that make each one from its value's base config, the
preset sizes, and how a run's parameters name its cell."""

from __future__ import annotations

from dataclasses import dataclass

POSTERIORS = ("direct", "iterative", "importance", "smc")
COLUMNS = (("model-free", "uniform"), ("model-free", "learned"),
           ("model-based", "uniform"), ("model-based", "learned"))  # fmt: skip
TITLES = {"direct": "direct (amortised)", "iterative": "iterative (amortised)",
          "importance": "importance sampling", "smc": "SMC planning"}  # fmt: skip


@dataclass(frozen=True)
class Skip:
    """A cell left empty, and why (the table's footnote)."""

    reason: str


# Overrides on the base config of the cell's value.  Fields in braces are the preset's
# sizes (PRESETS).  The base configs hold a uniform prior and the direct engine.
_LEARNED = ("--model.prior=mbvi.LearnedPrior", "--model.prior.hidden={hidden}")
_ITERATIVE = ("--model.engine=mbvi.planners.Iterative", "--model.engine.iterations=2",
              "--model.engine.n_samples={samples}", "--model.engine.antithetic=true")  # fmt: skip
# Under the uniform prior (no tanh-Gaussian to start from) inference starts from tanh(N(0,1)).
_FROM_N01 = ("--model.engine.init_loc=0.0", "--model.engine.init_log_scale=0.0")
_IMPORTANCE = ("--model.engine=mbvi.planners.ImportanceSampling",
               "--model.engine.n_particles={particles}")  # fmt: skip
# Through a model, a plan per replay state in every TD target (no amortised proposal) costs
# K x H model steps per state; SAC's policy as the proposal keeps the backup amortised,
# as for SMC.  The model-free rows keep the prior as proposal: SQL's and MPO's E-steps.
_IMPORTANCE_MB = _IMPORTANCE + ("--model.engine.proposal=mbvi.planners.Direct",)
_SMC = ("--model.engine=mbvi.planners.SMC", "--model.engine.n_particles={particles}",
        "--model.engine.horizon={smc_horizon}", "--model.engine.ess_threshold=0.5",
        "--model.engine.mode=best", "--model.engine.compile={compile}",
        "--model.engine.proposal=mbvi.planners.Direct")  # fmt: skip
_NO_MODEL = Skip(
    "SMC plans H steps through a world model and a model-free value has none; its "
    "one-step (H = 0) limit, weights exp(Q/α) on proposed actions, is the importance "
    "sampling row."
)

TABLE_1: dict[tuple[str, str, str], tuple[str, ...] | Skip] = {
    # (posterior,  value,         prior):       overrides, or why the cell is empty
    ("direct",     "model-free",  "uniform"):   (),  # SAC
    ("direct",     "model-free",  "learned"):   _LEARNED,
    ("direct",     "model-based", "uniform"):   (),
    ("direct",     "model-based", "learned"):   _LEARNED,
    ("iterative",  "model-free",  "uniform"):   _ITERATIVE + _FROM_N01,
    ("iterative",  "model-free",  "learned"):   _LEARNED + _ITERATIVE,
    ("iterative",  "model-based", "uniform"):   _ITERATIVE + _FROM_N01,
    ("iterative",  "model-based", "learned"):   _LEARNED + _ITERATIVE,
    ("importance", "model-free",  "uniform"):   _IMPORTANCE,  # Eq. 11 from the uniform prior
    ("importance", "model-free",  "learned"):   _LEARNED + _IMPORTANCE,  # MPO
    ("importance", "model-based", "uniform"):   _IMPORTANCE_MB,  # weights: H-step return
    ("importance", "model-based", "learned"):   _LEARNED + _IMPORTANCE_MB,
    ("smc",        "model-free",  "uniform"):   _NO_MODEL,
    ("smc",        "model-free",  "learned"):   _NO_MODEL,
    ("smc",        "model-based", "uniform"):   _SMC,  # SMCP
    ("smc",        "model-based", "learned"):   _LEARNED + _SMC,
}  # fmt: skip

PRESETS = {
    # base config per value (in configs/<env>/), default env steps, sizes for TABLE_1
    # updates: M-step updates per env step in every cell, so that cells compare at equal
    # updates (mb_direct.yaml's three would triple the model-based cells' cost alone).
    "tiny": dict(configs={"model-free": "tiny.yaml", "model-based": "mb_tiny.yaml"},
                 steps=150, updates=1, hidden="[32,32]", samples=2, particles=16, smc_horizon=2,
                 compile="false"),
    "full": dict(configs={"model-free": "sac.yaml", "model-based": "mb_direct.yaml"},
                 steps=3000, updates=1, hidden="[256,256]", samples=4, particles=64, smc_horizon=10,
                 compile="true"),
}  # fmt: skip

# Class names of the logged parameters -> the table's names.
_ENGINES = {"Direct": "direct", "Iterative": "iterative", "ImportanceSampling": "importance",
            "SVGD": "importance", "SMC": "smc"}  # fmt: skip
_PRIORS = {"UniformPrior": "uniform", "LearnedPrior": "learned"}
_VALUES = {"TwinQ": "model-free", "ModelBasedValue": "model-based"}


def cell_of(params: dict[str, str]) -> tuple[str, str, str] | None:
    """The (posterior, value, prior) of a run's parameters; None outside Table 1."""
    try:
        return (_ENGINES[params["engine"]], _VALUES[params["value"]], _PRIORS[params["prior"]])
    except KeyError:
        return None
