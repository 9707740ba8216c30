"""Loading checkpoints without running code, and converting a trusted old one.

A checkpoint is a pickle, and a pickle may name any Python callable to run while it is
loaded.  mbvi therefore loads every checkpoint with ``torch.load(weights_only=True)``,
whose unpickler builds only tensors, numbers, strings, ``None`` and plain containers:
all that mbvi writes (networks, optimiser state, replay buffer, the random streams as
tensors and tuples, components as config dicts).  A file that needs anything else is
refused before anything in it runs.

A checkpoint written before mbvi kept to plain types (numpy arrays in the random
state, components as objects) is refused the same way; if its source is trusted,
``mbvi convert-checkpoint --trust OLD NEW`` loads it once with full pickle and writes
the same data as plain types.  See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from mbvi.errors import CheckpointError, ConfigError, MbviError

CONVERT_COMMAND = "mbvi convert-checkpoint --trust"


def missing_file(path: Path) -> str:
    """Why ``path`` is no checkpoint file, for an error message: "does not exist", or
    for a folder "is a folder, not a checkpoint file", with the checkpoints inside it."""
    if not path.is_dir():
        return "does not exist"
    found = sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))
    inside = f" (checkpoints in it: {', '.join(found[:3])}{', …' if len(found) > 3 else ''})"
    return "is a folder, not a checkpoint file" + (inside if found else "")


def load_checkpoint(
    path: str | Path,
    where: str | None = None,
    error: type[MbviError] = CheckpointError,
    unreadable: str = "it is corrupt or truncated",
    mmap: bool = False,
):
    """``torch.load(path, weights_only=True)`` on the CPU.

    Args:
        path: an existing file (callers say what to pass when it is missing).
        where: how errors name the file; None: ``checkpoint '<path>'``.
        error: the ``MbviError`` subclass raised.
        unreadable: what an error says after "cannot be read (<exception>); ".
        mmap: map the tensors instead of reading them (only for files written by
            ``torch.save``; others are read).

    Raises:
        error: the file holds Python objects that weights-only loading refuses (one
            line naming them and the conversion command), or cannot be read at all.
    """
    where = where or f"checkpoint {str(path)!r}"
    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as err:
        names = _unsafe_names(path) if "weights only" in str(err).lower() else None
        if names is not None:
            raise error(_refusal(path, where, names)) from None
        raise error(f"{where} cannot be read (UnpicklingError); {unreadable}") from None
    except Exception as err:
        raise error(f"{where} cannot be read ({type(err).__name__}); {unreadable}") from None


def _unsafe_names(path: str | Path) -> list[str] | None:
    """The Python objects a refused file would import, read without loading it; None
    when it is not a pickle at all (then it is corrupt, not unsafe)."""
    if zipfile.is_zipfile(path):
        try:
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            return []
    names, strings = [], []
    try:  # a bare pickle: its opcodes, parsed and never executed
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:
        return None
    return names


def _refusal(path: str | Path, where: str, names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    what = f"Python objects ({shown})" if names else "Python objects"
    return (
        f"{where} holds {what} besides tensors, numbers and strings; loading those can run "
        "arbitrary code, so mbvi refuses it. If you trust its source, convert it once with "
        f"`{CONVERT_COMMAND} {path} NEW.ckpt` (docs/checkpoints.md)."
    )


def require_weights_only(config) -> None:
    """Make a Lightning ``fit`` resume load with ``weights_only=True``: refuse
    ``--weights_only false`` and set the option (its default, None, lets an
    environment variable of torch's turn full pickle back on)."""
    if config.get("weights_only") is False:
        raise ConfigError(
            "--weights_only false would load the checkpoint with full pickle, which runs any "
            "code it holds; mbvi resumes only from plain-data checkpoints. Drop the option, "
            f"and convert a checkpoint you trust with `{CONVERT_COMMAND} OLD NEW`."
        )
    config["weights_only"] = True


# ---- conversion of a trusted checkpoint --------------------------------------------------
def convert_checkpoint(old: str | Path, new: str | Path) -> None:
    """Load ``old`` with full pickle (it runs whatever code ``old`` holds: only for a
    trusted file) and write its data to ``new`` as types that load with
    ``weights_only=True``: numpy arrays as tensors, numpy scalars as numbers, a
    component object (prior, engine, value) as its ``{class_path, init_args}`` dict.

    Raises ``CheckpointError`` when ``old`` is missing or unreadable, ``new`` exists,
    or ``old`` holds an object with no plain form (named by its key)."""
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise CheckpointError(f"checkpoint {str(old)!r} {missing_file(old)}")
    if new.exists():
        raise CheckpointError(
            f"{str(new)!r} exists; pass a new path for the converted checkpoint (the original "
            "is left as it is)"
        )
    try:
        ckpt = torch.load(old, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {str(old)!r} cannot be read ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    buffer = io.BytesIO()
    torch.save(_plain(ckpt, "checkpoint"), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # what _plain returns must load without pickle
    tmp = new.with_name(new.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, new)


_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _plain(value, key: str):
    """``value`` with every object that weights-only loading refuses replaced by plain
    data; ``key`` names the entry in errors."""
    from mbvi.training.components import component_spec

    if isinstance(value, (torch.Tensor, torch.Size, *_SCALARS)):
        return value
    if isinstance(value, np.ndarray):
        # unsigned words (numpy's Mersenne Twister key) widen to int64, which every torch
        # op handles; restore_rng_state narrows them back.
        wide = value.astype(np.int64) if value.dtype.kind == "u" else value
        return torch.from_numpy(np.ascontiguousarray(wide))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.nn.Module):  # components, before they were kept as dicts
        return component_spec(value)
    if isinstance(value, dict):
        plain = {k: _plain(v, f"{key}[{k!r}]") for k, v in value.items()}
        return OrderedDict(plain) if isinstance(value, OrderedDict) else plain
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise CheckpointError(
        f"{key} is a {type(value).__module__}.{type(value).__qualname__}, which has no "
        "plain-data form; this checkpoint cannot be converted (load it with the mbvi "
        "version that wrote it)"
    )


def convert_main(argv: list[str]) -> None:
    """``mbvi convert-checkpoint --trust OLD NEW``."""
    parser = argparse.ArgumentParser(
        prog="mbvi convert-checkpoint",
        description="Rewrite a checkpoint that needs full pickle (written before mbvi kept "
        "checkpoints to plain data) as one that loads with weights_only=True. Loading OLD "
        "runs any code it holds: convert only files whose source you trust.",
    )
    parser.add_argument("old", help="the checkpoint to convert (left unchanged)")
    parser.add_argument("new", help="where to write the converted checkpoint (a new path)")
    parser.add_argument(
        "--trust",
        action="store_true",
        help="confirm that OLD comes from a source you trust (required)",
    )
    args = parser.parse_args(argv)
    if not args.trust:
        parser.error(
            f"loading {args.old!r} with full pickle runs any code it holds; pass --trust to "
            "confirm that you trust its source"
        )
    convert_checkpoint(args.old, args.new)
    print(f"converted {args.old} -> {args.new} (loads with weights_only=True)")
