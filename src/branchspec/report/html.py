"""One self-contained HTML page from a run directory: figures embedded, numbers in tables, the configuration.

The page has a section for the run itself and one for every run directory nested in it (the demo's parts,
an analysis written into its run), so a report can always be rebuilt from the folder alone. Every string that
comes from a file (class names from folder names, paths, configuration values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
from html import escape
from numbers import Number
from pathlib import Path

from branchspec.errors import BranchspecError
from branchspec.rundir import RunDir, atomic_write_text

_MAX_INLINE_LIST = 24  # longer lists are summarized by their shape
_MAX_MATRIX = 16  # matrices up to this size are shown as tables

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#f2f2f2}td.k,th.k{text-align:left;font-family:ui-monospace,monospace}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.9em;color:#444}
details{margin:.5em 0}code{font-family:ui-monospace,monospace}
"""


def build_report(run: str | Path | RunDir, title: str | None = None, must_hold_a_run: bool = False) -> Path:
    """Write ``report.html`` into the run directory and return its path. ``must_hold_a_run``: a folder with no
    run in it (no config.yaml or metrics.json, here or nested) is an error instead of an empty page."""
    run = RunDir.of(run, must_exist=True)
    dirs = _run_dirs(run.path)
    if must_hold_a_run and not any((d / "metrics.json").is_file() or (d / "config.yaml").is_file() for d in dirs):
        raise BranchspecError(f"{run.path} holds no run (no config.yaml or metrics.json in it or its folders); give "
                              "the `out` of a branchspec command.")
    sections = [_section(d, run.path) for d in dirs]
    title = title or f"branchspec report: {run.path.name}"
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>"
        f"<p>Built {escape(stamp)} from <code>{escape(str(run.path))}</code>.</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
    return atomic_write_text(run.path / "report.html", page)


def _run_dirs(root: Path, depth: int = 3) -> list[Path]:
    """The root and every nested folder holding metrics.json or config.yaml, in sorted order."""
    found = [root]
    if depth > 0:
        for child in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("figures", "checkpoints", "logs")):
            if (child / "metrics.json").is_file() or (child / "config.yaml").is_file():
                found += _run_dirs(child, depth - 1)
            else:
                found += _run_dirs(child, depth - 1)[1:]
    return found


def _section(path: Path, root: Path) -> str:
    run = RunDir(path, must_exist=True)
    name = "." if path == root else str(path.relative_to(root))
    parts = [f"<h2>{escape(name)}</h2>"]
    metrics = run.read_metrics()
    if metrics:
        parts.append(_metrics_html(metrics))
    parts += _figures_html(run)
    if run.config_path.is_file():
        parts.append("<details><summary>configuration</summary>" + _kv_table(_flatten(run.read_config())) + "</details>")
    return "".join(parts) if len(parts) > 1 else ""


# ------------------------------------------------------------------------------------------------- metrics
def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (Number, str, bool))


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


def _metrics_html(metrics: dict) -> str:
    """Scalars in one table; dicts of scalars that share their keys side by side; matrices as grids."""
    scalars, series, rest = {}, {}, {}
    for key, value in metrics.items():
        if _is_scalar(value):
            scalars[key] = value
        elif isinstance(value, dict) and value and all(_is_scalar(v) for v in value.values()):
            series.setdefault(tuple(value), {})[key] = value
        else:
            rest[key] = value
    html = []
    if scalars:
        html.append(_kv_table(scalars))
    for keys, columns in series.items():
        head = "<tr><th class='k'></th>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr>"
        rows = "".join(
            f"<tr><td class='k'>{escape(str(k))}</td>" + "".join(f"<td>{_fmt(col[k])}</td>" for col in columns.values()) + "</tr>"
            for k in keys
        )
        html.append(f"<table>{head}{rows}</table>")
    for key, value in rest.items():
        html.append(f"<p><b>{escape(key)}</b></p>" + _value_html(value))
    return "".join(html)


def _value_html(value) -> str:
    if isinstance(value, dict):
        return _kv_table(_flatten(value))
    if isinstance(value, list) and value and all(isinstance(r, list) and all(_is_scalar(x) for x in r) for r in value):
        if len(value) <= _MAX_MATRIX and max(len(r) for r in value) <= _MAX_MATRIX:
            return "<table>" + "".join("<tr>" + "".join(f"<td>{_fmt(x)}</td>" for x in r) + "</tr>" for r in value) + "</table>"
    return f"<p>{_fmt_list(value)}</p>"


def _fmt_list(value) -> str:
    if isinstance(value, list) and len(value) <= _MAX_INLINE_LIST and all(_is_scalar(v) for v in value):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return escape(f"array of shape {_shape(value)} (see metrics.json)")


def _shape(value) -> tuple:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return tuple(shape)


def _flatten(tree, prefix: str = "") -> dict:
    """Nested dicts as one level with dotted keys."""
    if not isinstance(tree, dict):
        return {prefix or "value": tree}
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def _kv_table(items: dict) -> str:
    rows = "".join(
        f"<tr><td class='k'>{escape(str(k))}</td><td>{_fmt(v) if _is_scalar(v) else _fmt_list(v)}</td></tr>"
        for k, v in items.items()
    )
    return f"<table>{rows}</table>"


# ------------------------------------------------------------------------------------------------- figures
def _figures_html(run: RunDir) -> list[str]:
    if not run.figures.is_dir():
        return []
    captions = run.figure_captions()
    html = []
    for png in sorted(run.figures.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        caption = captions.get(png.name, "")
        html.append(
            f"<figure><img alt='{escape(png.stem)}' src='data:image/png;base64,{data}'>"
            f"<figcaption><b>{escape(png.stem)}</b>. {escape(caption)}</figcaption></figure>"
        )
    return html
