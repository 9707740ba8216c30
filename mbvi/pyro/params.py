"""The learnable parameters of a prior (or dynamics) program, owned by mbvi, with a
target copy.

A Pyro user makes a program learnable in one of two ways, and ``ProgramPrior`` takes both:

* ``pyro.param("name", init, constraint=...)`` statements in a function.  Pyro keeps
  these in a global param store; here ``OwnParams`` answers each statement from
  ``ProgramParams`` instead, so the parameters live in the prior's ``state_dict`` (and
  its checkpoints), the agent's optimizer trains them, and two agents never share them.
  A statement is answered with the constrained value ``transform_to(constraint)(θ)`` of
  an unconstrained ``nn.Parameter`` θ, as Pyro's store does.
* A ``PyroModule`` (or any ``nn.Module``) as the program.  It is run with Pyro's
  ``module_local_params`` setting, so its parameters stay its own ``nn.Parameter``s.

Either way the prior keeps a second, Polyak-averaged copy θ̄ for the E-step (the
target of ``LearnedPrior``).
"""

from __future__ import annotations

import copy
import re
import warnings

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import constraints, transform_to

from mbvi._private_torch import polyak_
from mbvi.errors import ConfigError


class ProgramParams(nn.Module):
    """θ (``online``) and θ̄ (``target``) of a program's ``pyro.param`` statements, by
    name.  New names are taken only until ``freeze``, which makes θ̄ a copy of θ.
    ``kind`` names the program in errors ("prior program", "dynamics program")."""

    def __init__(self, program: str, kind: str = "prior program"):
        super().__init__()
        self.program, self.kind = program, kind
        self.online = nn.ParameterDict()
        self.target = nn.ParameterDict()
        self._keys: dict[str, str] = {}  # Pyro's name -> ParameterDict key
        self._constraints: dict[str, constraints.Constraint] = {}
        self._frozen = False

    def names(self) -> list[str]:
        return list(self._keys)

    def value(self, name: str, init, constraint, which: str) -> torch.Tensor:
        """The constrained value of ``pyro.param(name, init, constraint)`` from θ
        (``which='online'``) or θ̄ (``'target'``); the first statement of a name
        creates θ from ``init`` (a tensor or a callable returning one)."""
        key = self._keys.get(name)
        if key is None:
            key = self._create(name, init, constraint)
        param = (self.online if which == "online" else self.target)[key]
        return transform_to(self._constraints[name])(param)

    def _create(self, name: str, init, constraint) -> str:
        if self._frozen:
            raise ConfigError(
                f"{self.kind} {self.program} ran pyro.param({name!r}) for the first time "
                "after it was built; mbvi creates a program's parameters on its probe run, "
                "so run every pyro.param statement on every call"
            )
        if init is None:
            raise ConfigError(
                f"{self.kind} {self.program}: pyro.param({name!r}) has no initial value; "
                "give one, e.g. pyro.param('scale', torch.tensor(0.3), "
                "constraint=constraints.positive)"
            )
        init = init() if callable(init) else init
        key = re.sub(r"\W", "_", name)
        if key in self.online:
            raise ConfigError(
                f"{self.kind} {self.program}: pyro.param names {name!r} and "
                f"{self._name_of(key)!r} clash once punctuation is removed; rename one"
            )
        with torch.no_grad():
            raw = transform_to(constraint).inv(torch.as_tensor(init).detach().clone())
        self.online[key] = nn.Parameter(raw)
        self._keys[name], self._constraints[name] = key, constraint
        return key

    def _name_of(self, key: str) -> str:
        return next(n for n, k in self._keys.items() if k == key)

    def freeze(self, target: bool = True) -> None:
        """Take no new names; θ̄ ← θ (unless ``target`` is false: a program fitted
        without a trust region needs no target)."""
        self._frozen = True
        if not target:
            return
        for key, param in self.online.items():
            self.target[key] = nn.Parameter(param.detach().clone(), requires_grad=False)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """θ̄ ← (1−τ) θ̄ + τ θ."""
        keys = list(self.online)
        if keys:
            polyak_([self.target[k] for k in keys], [self.online[k] for k in keys], tau)


class OwnParams(Messenger):
    """Answers the program's ``pyro.param`` statements from ``params`` (θ or θ̄, by
    ``which``) instead of Pyro's global store.

    A module's own parameters are left to it: a statement whose initial value is an
    ``nn.Parameter`` (how ``PyroModule`` and ``pyro.module`` announce one) gets that
    parameter back, and one without an initial value for a name already in the store
    (a ``PyroParam`` that its ``PyroModule`` has just put there) reads the store.
    ``run_program`` runs the program in a fresh scope of the store, so that only the
    module can have put it there.
    """

    def __init__(self, params: ProgramParams, which: str, module_program: bool):
        super().__init__()
        self.params, self.which, self.module_program = params, which, module_program

    def _pyro_param(self, msg) -> None:
        store = pyro.get_param_store()
        if getattr(msg["fn"], "__self__", None) is not store:
            return
        name, *init = msg["args"]
        if init and isinstance(init[0], nn.Parameter):
            if not self.module_program:
                raise ConfigError(
                    f"{self.params.kind} {self.params.program} registers a torch module's "
                    f"parameter {name!r} (pyro.module or an nn.Parameter passed to "
                    "pyro.param) inside a function, so mbvi cannot own, train or "
                    "checkpoint it; make the program itself a PyroModule (or nn.Module), "
                    "as examples/latent_prior.py's GaitModule, or use pyro.param with a "
                    "plain tensor"
                )
            # The module's own parameter, as is: the store would switch on its
            # requires_grad, which a frozen target copy must keep off.
            msg["value"], msg["done"] = init[0], True
            return
        if not init and name in store:
            return
        constraint = msg["kwargs"].get("constraint", constraints.real)
        msg["value"] = self.params.value(name, init[0] if init else None, constraint, self.which)
        msg["done"] = True


def run_program(program, s: torch.Tensor, params: ProgramParams, which: str, *args):
    """``program(s, *args)`` with its ``pyro.param`` statements answered from θ or θ̄; Pyro's
    global param store is left as it was (a module's parameters pass through a
    fresh scope of it)."""
    own = OwnParams(params, which, module_program=isinstance(program, nn.Module))
    with pyro.get_param_store().scope(), own, warnings.catch_warnings():
        # pyro.module skips a frozen copy's parameters (the target), and says so each call.
        warnings.filterwarnings("ignore", message=".*because requires_grad=False")
        return program(s, *args)


def module_target(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module``: the target of a PyroModule program."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def update_module_target(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Polyak-average parameters (and copy float buffers) of ``online`` into ``target``."""
    pairs = [(t, o) for t, o in zip(target.parameters(), online.parameters(), strict=True)]
    if pairs:
        polyak_([t for t, _ in pairs], [o for _, o in pairs], tau)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)
