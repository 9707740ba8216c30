"""The maths and the engines import without the training stack, and old module paths
still resolve (checkpoints name components by module path)."""

import subprocess
import sys

HEAVY = ("lightning", "gymnasium", "mlflow")


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_engines_and_distributions_import_without_lightning_gymnasium_or_mlflow():
    assert _loaded_after("import mbvi.planners.direct") == []
    assert _loaded_after("import mbvi.distributions") == []
    assert _loaded_after("import mbvi.variational.model_value, mbvi.models.dynamics") == []
    # the check can fail: the agent does bring them in
    assert set(_loaded_after("from mbvi import VariationalAgent")) >= {"lightning", "gymnasium"}


def test_old_module_paths_resolve_to_the_moved_modules():
    import mbvi.priors
    import mbvi.values
    from mbvi.training.components import build_component
    from mbvi.variational.priors import UniformPrior
    from mbvi.variational.values import TwinQ

    assert mbvi.values.TwinQ is TwinQ and mbvi.priors.UniformPrior is UniformPrior
    built = build_component({"class_path": "mbvi.values.TwinQ", "init_args": {"hidden": [8]}})
    assert isinstance(built, TwinQ) and built.hidden == (8,)
