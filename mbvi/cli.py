"""``mbvi`` command line: ``mbvi fit --config configs/pendulum/sac.yaml``.

Also ``mbvi compare`` (``mbvi.tracking.compare``), ``mbvi table`` (``mbvi.tracking.table``),
``mbvi sweep`` (``mbvi.tracking.sweep``), ``mbvi render`` (``mbvi.training.video``),
``mbvi fit-model`` and ``mbvi export-transitions`` (``mbvi.training.model_cli``,
``mbvi.training.transitions``), and ``mbvi convert-checkpoint --trust OLD NEW``
(``mbvi.training.safe_load``).

``mbvi fit`` is LightningCLI (``mbvi.training.fit_cli``, imported only for it and the
other training commands), so every constructor argument of the agent, its prior, engine
and value estimate is a documented option (``mbvi fit --help``,
``mbvi fit --print_config``), and components are chosen by ``class_path``.
"""

from __future__ import annotations

import os
import sys
import warnings

from mbvi.errors import MbviError

COMMANDS = {
    "fit": "train an agent (a prior, an inference engine, a value estimate) on an env",
    "compare": "a table and learning curves of an MLflow experiment's runs",
    "sweep": "configs × grid overrides × seeds as `mbvi fit` trials on Ray",
    "table": "fill the paper's Table 1 (prior × posterior × value) with measured runs",
    "render": "record an episode of a checkpoint's agent as an MP4",
    "fit-model": "train a dynamics ensemble alone on saved transitions (.npz or a checkpoint)",
    "export-transitions": "write an agent checkpoint's replay buffer as an .npz for fit-model",
    "convert-checkpoint": "rewrite a trusted older checkpoint for weights-only loading",
}
"""Every subcommand, with the line ``mbvi --help`` shows for it."""


def usage() -> str:
    """``mbvi --help``: the subcommands, each with its own ``--help``."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(
        ["usage: mbvi COMMAND [options]   (mbvi COMMAND --help for its options)", "",
         "commands:", *lines]
    )  # fmt: skip


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``mbvi`` console script."""
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        print(f"mbvi: error: unknown command {argv[0]!r}{hint}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    if argv and argv[0] == "compare":  # table and plots from MLflow, not a LightningCLI command
        from mbvi.tracking.compare import main as compare_main

        sys.exit(compare_main(argv[1:]))
    if argv and argv[0] == "sweep":  # config × grid × seed `mbvi fit` trials as Ray tasks
        from mbvi.tracking.sweep import main as sweep_main

        sys.exit(sweep_main(argv[1:]))
    if argv and argv[0] == "table":  # trains Table 1's cells as `mbvi fit` subprocesses
        from mbvi.tracking.table import main as table_main

        sys.exit(table_main(argv[1:]))
    if os.getcwd() not in sys.path:
        # As with `python -m`: a user's own modules in the working directory can be
        # named by class_path (a prior, an engine) and as env "module:EnvId".
        sys.path.insert(0, os.getcwd())
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    try:
        if argv and argv[0] == "render":  # one episode of a checkpoint's agent as an MP4
            from mbvi.training.video import render_main

            sys.exit(render_main(argv[1:]))
        if argv and argv[0] in ("fit-model", "export-transitions", "convert-checkpoint"):
            _model_command(argv[0], argv[1:])
            return
        from mbvi.training.fit_cli import fit

        fit(args)
    except (MbviError, ValueError, TypeError) as err:
        # jsonargparse wraps a component's ConfigError (e.g. Iterative(iterations=0))
        # in a ValueError listing every subtype it tried: report the error itself.
        cause = _mbvi_error(err)
        if cause is None:
            raise
        notes = "".join(f" {note}" for note in getattr(cause, "__notes__", ()))
        print(f"mbvi: error: {cause}{notes}", file=sys.stderr)
        sys.exit(2)


def _model_command(name: str, argv: list[str]) -> None:
    """``mbvi fit-model`` (a LightningCLI of its own), ``mbvi export-transitions`` and
    ``mbvi convert-checkpoint``."""
    if name == "fit-model":
        from mbvi.training.model_cli import main as fit_model

        fit_model(argv)
    elif name == "convert-checkpoint":
        from mbvi.training.safe_load import convert_main

        convert_main(argv)
    else:
        from mbvi.training.transitions import export_main

        export_main(argv)


def _mbvi_error(err: BaseException | None) -> MbviError | None:
    """The first ``MbviError`` in ``err``'s chain of causes, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MbviError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
