"""The run directory: where every command writes, and where every analysis reads.

    DIR/config.yaml        the resolved configuration, enough to run it again
    DIR/metrics.json       the numbers
    DIR/figures/*.png      the figures, with their captions in figures/captions.json
    DIR/checkpoints/       weights (tensors only), always written atomically
    DIR/logs/              CSV and TensorBoard logs
    DIR/report.html        built from the above by :mod:`branchspec.report`

Every write goes to a temporary file in the same folder and is then renamed over the target, so a run killed
at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Collection

import numpy as np
import yaml

from branchspec.errors import BranchspecError


# ---------------------------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    """The process's umask, read without changing it (Linux's /proc), else the common default 0o022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file and a rename."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_save_npz(path: str | os.PathLike, arrays: dict) -> Path:
    """``numpy.savez_compressed`` through a temporary file and a rename."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def to_plain(value: Any) -> Any:
    """Numbers, arrays, tensors, dataclasses and paths as JSON/YAML-safe Python values (NaN/inf -> None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_plain(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


# --------------------------------------------------------------------------------------------- the directory
class RunDir:
    """A run directory (created and checked for writing unless ``must_exist``)."""

    def __init__(self, path: str | os.PathLike, *, must_exist: bool = False):
        self.path = Path(path)
        if must_exist:
            if not self.path.is_dir():
                raise BranchspecError(f"run directory {self.path} does not exist; give the `out` of an earlier run.")
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-probe-", delete=True)
            probe.close()
        except OSError as err:
            raise BranchspecError(
                f"cannot write to output folder {self.path} ({err.strerror or err}); choose a writable `out`."
            ) from None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def of(cls, run: "str | os.PathLike | RunDir", *, must_exist: bool = False) -> "RunDir":
        """``run`` itself if it is a RunDir, else the RunDir at that path."""
        return run if isinstance(run, RunDir) else cls(run, must_exist=must_exist)

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def sub(self, name: str) -> "RunDir":
        """A run directory nested in this one (for example one part of the demo)."""
        return RunDir(self.path / name)

    # config
    def write_config(self, config: Any) -> Path:
        text = yaml.safe_dump(to_plain(config), sort_keys=False, allow_unicode=True)
        return atomic_write_text(self.config_path, text)

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise BranchspecError(f"{self.path} holds no config.yaml; is it the `out` of a branchspec run?")
        try:
            return yaml.safe_load(self.config_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise BranchspecError(f"{self.config_path} is not valid YAML ({err}).") from None

    def check_same_run(self, config: Any, free: Collection[str] = (), what: str = "run") -> None:
        """A run directory that holds a config continues only the same run: refuse ``config`` where it differs
        from the stored one in anything but the keys in ``free`` (device, precision, ...: options that do not
        change a result). Nested settings are compared key by key."""
        if not self.config_path.is_file():
            return
        old, new = _flat(self.read_config(), set(free)), _flat(to_plain(config), set(free))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            raise BranchspecError(f"{self.path} holds a different {what} (it differs in {', '.join(changed)}); give "
                                  "a new `out`, or the same options to resume it.")

    # metrics
    def write_metrics(self, metrics: dict, *, merge: bool = True) -> Path:
        """Write metrics.json; with ``merge`` the new keys update what is already there."""
        current = self.read_metrics() if merge and self.metrics_path.is_file() else {}
        current.update(to_plain(metrics))
        return atomic_write_text(self.metrics_path, json.dumps(current, indent=2, allow_nan=False) + "\n")

    def read_metrics(self) -> dict:
        if not self.metrics_path.is_file():
            return {}
        try:
            return json.loads(self.metrics_path.read_text())
        except json.JSONDecodeError as err:
            raise BranchspecError(f"{self.metrics_path} is not valid JSON ({err}).") from None

    # figures
    def save_figure(self, fig, name: str, caption: str = "") -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` with its caption, and close it."""
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        path = atomic_write_bytes(self.figures / f"{name}.png", buffer.getvalue())
        captions = self.figure_captions()
        captions[f"{name}.png"] = caption
        atomic_write_text(self.figures / "captions.json", json.dumps(captions, indent=2) + "\n")
        return path

    def figure_captions(self) -> dict[str, str]:
        path = self.figures / "captions.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def _flat(config: dict, free: set[str], prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``, leaving out the keys in ``free`` at any depth."""
    flat = {}
    for key, value in config.items():
        if key in free:
            continue
        if isinstance(value, dict):
            flat.update(_flat(value, free, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
