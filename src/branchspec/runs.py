"""One way to open what a branchspec command wrote, and a user's own model.

    run = branchspec.runs.open("runs/c16")
    run.command                      # "classify train"
    model = run.model("last")        # the trained model (a loop-execution Branched for a classifier)
    x, y, classes = run.data("test") # its data split, normalized as in training
    run.seeds                        # {seed: path} for a multi-seed parent, else None

Every study and analysis command loads runs through here; the loaders behind it stay beside the code that
wrote the runs (``studies/classify.py``, ``studies/decompose.py``), so a format has one reader. Runs written by
earlier versions open as before.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from branchspec.errors import BranchspecError
from branchspec.rundir import RunDir

KINDS = ("classify train", "decompose train", "toy sweep", "toy dynamics", "nad search", "hessian analysis")


@dataclass
class Run:
    """An opened run directory: its command, its config, and what can be loaded from it."""

    path: Path
    command: str
    config: dict

    @property
    def dir(self) -> RunDir:
        return RunDir(self.path, must_exist=True)

    @property
    def seeds(self) -> dict[int, Path] | None:
        """``{seed: run path}`` of a multi-seed parent (``--seeds``), else None."""
        from branchspec.seeds import is_seeds_parent, seed_runs

        return seed_runs(self.path) if is_seeds_parent(self.path) else None

    def expect(self, *commands: str) -> "Run":
        """This run, if a command of ``commands`` made it; else a one-line error that names the one that did."""
        if self.command not in commands:
            wanted = " or ".join(f"`branchspec {c}`" for c in commands)
            made = f"was made by `branchspec {self.command}`" if self.command else "holds no branchspec run"
            raise BranchspecError(f"{self.path} {made}, not by {wanted}; give the `out` of such a run.")
        return self

    def model(self, checkpoint: str = "last", device="cpu") -> nn.Module:
        """The run's model at ``checkpoint``: a classifier ("init", "last" or a weights file) or a generator
        ("ema" or "raw"; "last" means "ema")."""
        if self.command == "classify train":
            from branchspec.studies.classify import load_classifier

            return load_classifier(self.path, checkpoint, device)[0]
        if self.command == "decompose train":
            from branchspec.studies.decompose import load_generator

            return load_generator(self.path, "ema" if checkpoint == "last" else checkpoint, device)[0]
        raise BranchspecError(f"{self.path} (`branchspec {self.command}`) holds no model to load.")

    def data(self, split: str = "test", device="cpu", show_progress: bool = False):
        """A classifier run's split: normalized images ``[N, C, H, W]``, labels ``[N]``, class names."""
        self.expect("classify train")
        from branchspec.studies.classify import load_split

        return load_split(self.path, split, device=device, show_progress=show_progress)


def open(path: str | Path) -> Run:  # noqa: A001 - the natural name, as builtins.open is for files
    """The run at ``path`` (a one-line error for a missing folder or one that holds no run)."""
    run = RunDir(path, must_exist=True)
    raw = run.read_config()
    return Run(run.path, str(raw.get("command", "")), raw)


# ------------------------------------------------------------------------------------------ a user's model
def load_user_model(spec: str, weights: str | None = None) -> nn.Module:
    """``path/to/file.py:factory`` or ``package.module:factory`` called with no argument, ``weights`` (a state
    dict, .pt or .safetensors) loaded, in eval mode."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise BranchspecError(f"`model` {spec!r} is not FILE.py:FACTORY or package.module:FACTORY.")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise BranchspecError(f"`model`: the file {path} does not exist.")
            module_name = f"_branchspec_user_model_{abs(hash(str(path.resolve())))}"
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        model = getattr(module, name)()
    except BranchspecError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code: report whatever it raised in one line
        raise BranchspecError(f"`model` {spec!r} could not be built ({type(err).__name__}: {err}).") from None
    if not isinstance(model, nn.Module):
        raise BranchspecError(f"`model` {spec!r} returned {type(model).__name__}, not a torch.nn.Module.")
    if weights is not None:
        model.load_state_dict(_read_weights(Path(weights), model))
    return model.eval()


def _read_weights(path: Path, model: nn.Module) -> dict:
    if not path.is_file():
        raise BranchspecError(f"`weights` {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise BranchspecError(f"cannot read `weights` {path} ({type(err).__name__}); give a state dict saved with "
                              "torch.save or safetensors.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BranchspecError(f"`weights` {path} holds a {type(state).__name__}, not a state dict.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or extra or wrong:
        raise BranchspecError(f"`weights` {path} does not fit the model (missing {missing[:3]}, unexpected "
                              f"{extra[:3]}, other shapes {wrong[:3]}); give the weights of this architecture.")
    return state


_ = builtins  # `open` above shadows the builtin inside this module only
