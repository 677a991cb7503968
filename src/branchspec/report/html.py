"""One self-contained HTML page from a run directory, for a reader: findings first, then figures, then numbers.

The page has a section for the run itself and one for every run directory nested in it (the demo's parts, an
analysis written into its run, the seeds of a multi-seed run). Each section opens with its findings (the
paper's claim with its source, our measurement with its interval and control, the verdict; metrics.json's
``findings``), then its figures with their captions, then its numbers: scalars in a table with readable labels,
matrices as heat-maps, long lists folded, the raw metrics.json and the configuration one click away. A
multi-part report starts with a summary table and a table of contents. Images are embedded; every string that
comes from a file (class names, paths, configuration values) is HTML-escaped.

:func:`build_comparison` puts the same numbers of several runs side by side (``branchspec report DIR1 DIR2``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import re
from html import escape
from numbers import Number
from pathlib import Path

from branchspec.errors import BranchspecError
from branchspec.rundir import RunDir, atomic_write_text

_MAX_INLINE_LIST = 12  # longer lists are folded into <details>
_MAX_RAW_JSON = 200_000  # characters of metrics.json shown raw
_SKIP = ("findings",)  # keys shown elsewhere in the section

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1180px;color:#222;
padding:0 1.2em;line-height:1.45}
h1{border-bottom:2px solid #444;font-size:1.7em}h2{border-bottom:1px solid #bbb;margin-top:2.2em}
.meta{color:#555;font-size:.9em}.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ccc;padding:.25em .5em;
vertical-align:top}th{background:#f2f2f2;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.findings{width:100%;table-layout:fixed}table.findings td{word-wrap:break-word}
.claim{font-style:italic}.src{color:#666;font-size:.9em;font-style:normal}
.verdict{font-weight:600;padding:.1em .45em;border-radius:.3em;white-space:nowrap}
.v-reproduced{background:#d7f0d7}.v-partly{background:#fcefc7}.v-not-reproduced{background:#f6d0d0}
.v-not-tested{background:#e6e6e6}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}figcaption{font-size:.9em;color:#333}
details{margin:.5em 0}summary{cursor:pointer;color:#245}pre{overflow-x:auto;max-width:100%;background:#f7f7f7;
padding:.5em;font-size:.8em}code{font-family:ui-monospace,monospace}nav ul{columns:2}
"""

# readable labels of the most common keys (others: their words, snake_case spelled out)
_LABELS = {
    "test_accuracy": "test accuracy", "num_active": "active branches (raw responses, 10% rule)",
    "num_silent": "silent branches (raw responses)", "num_active_centred": "active branches (mean-centred)",
    "num_silent_centred": "silent branches (mean-centred)", "num_constant": "constant branches",
    "norm_ratio_min": "smallest / largest response norm", "centred_norm_ratio_min":
    "smallest / largest response norm (mean-centred)", "mean_abs_offdiagonal_correlation":
    "mean |correlation| between active branches", "mean_abs_offdiagonal_correlation_at_init":
    "the same at initialization", "mean_top_branch_share": "top branch's share of a class's contribution",
    "mean_top_branch_share_at_init": "the same at initialization", "total_weight_decay": "total weight decay Σ lr·wd",
    "fit_seconds": "training time (s)", "component_recovery": "component recovery (matched |corr|)",
    "si_sdr": "SI-SDR (dB)", "si_sir": "SI-SIR (dB)", "si_sar": "SI-SAR (dB)",
    "block_mass_ratio": "block-mass ratio", "block_mass_ratio_permuted": "the same, parameters dealt at random",
    "mean_block_coupling": "mean normalized cross-block coupling", "hessian_seconds": "Hessian time (s)",
}


def label(key: str) -> str:
    """A readable label for a metrics key."""
    if key in _LABELS:
        return _LABELS[key]
    text = key.replace("_", " ")
    text = re.sub(r"^num ", "number of ", text)
    return re.sub(r" seconds$", " (s)", text)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


# --------------------------------------------------------------------------------------------- the page
def build_report(run: str | Path | RunDir, title: str | None = None, must_hold_a_run: bool = False) -> Path:
    """Write ``report.html`` into the run directory and return its path. ``must_hold_a_run``: a folder with no
    run in it (no config.yaml or metrics.json, here or nested) is an error instead of an empty page."""
    run = RunDir.of(run, must_exist=True)
    dirs = _run_dirs(run.path)
    if must_hold_a_run and not any((d / "metrics.json").is_file() or (d / "config.yaml").is_file() for d in dirs):
        raise BranchspecError(f"{run.path} holds no run (no config.yaml or metrics.json in it or its folders); give "
                              "the `out` of a branchspec command.")
    command = run.read_config().get("command", "") if run.config_path.is_file() else ""
    title = title or f"{run.path.name}" + (f": branchspec {command}" if command else "")
    rendered = []  # (name, anchor, html, folder) of every section with something to show
    for d in dirs:
        name = _section_name(d, run.path, title)
        html = _section(d, name)
        if html:
            rendered.append((name, _slug(name), html, d))
    head = [f"<h1>{escape(title)}</h1>", _meta(run)]
    if len(rendered) > 1:
        head.append(_summary(rendered))
        head.append("<nav><b>Contents</b><ul>" + "".join(f"<li><a href='#{s}'>{escape(n)}</a></li>"
                                                          for n, s, _, _ in rendered) + "</ul></nav>")
    body = "".join(f"<section id='{s}'>{h}</section>" for _, s, h, _ in rendered)
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(head)}{body}</body></html>\n")
    return atomic_write_text(run.path / "report.html", page)


def _meta(run: RunDir) -> str:
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    links = []
    if run.config_path.is_file():
        links.append("<a href='config.yaml'>config.yaml</a>")
    if run.metrics_path.is_file():
        links.append("<a href='metrics.json'>metrics.json</a>")
    results = Path(__file__).resolve().parents[3] / "docs" / "results.md"
    if results.is_file():
        links.append(f"<a href='{escape(results.as_uri())}'>docs/results.md</a> (the measured results, with "
                     "their commands)")
    logs = run.logs / "tensorboard"
    tb = (f" Training curves: <code>tensorboard --logdir {escape(str(run.logs))}</code>." if logs.is_dir() else "")
    return (f"<p class='meta'>Built {escape(stamp)} from <code>{escape(str(run.path))}</code>. "
            + " · ".join(links) + f".{tb}</p>")


def _summary(rendered) -> str:
    """One row per section with findings: its headline (the first finding's measurement) and verdict."""
    rows = []
    for name, slug, _, d in rendered:
        found = _findings_of(d)
        if not found:
            continue
        first = found[0]
        text = first.get("measurement", "") if isinstance(first, dict) else str(first)
        verdict = first.get("verdict", "") if isinstance(first, dict) else ""
        rows.append(f"<tr><td><a href='#{slug}'>{escape(name)}</a></td><td>{escape(text)}</td>"
                    f"<td>{_verdict(verdict)}</td></tr>")
    if not rows:
        return ""
    return ("<h2 id='summary'>Summary</h2><div class='scroll'><table class='findings'><colgroup><col style='width:18%'>"
            "<col><col style='width:14%'></colgroup><tr><th>part</th><th>headline</th><th>verdict</th></tr>"
            + "".join(rows) + "</table></div>")


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


def _section_name(path: Path, root: Path, title: str) -> str:
    return title if path == root else " / ".join(path.relative_to(root).parts)


def _findings_of(path: Path) -> list:
    metrics = RunDir(path, must_exist=True).read_metrics()
    return metrics.get("findings") or []


def _section(path: Path, name: str) -> str:
    run = RunDir(path, must_exist=True)
    metrics = run.read_metrics()
    has_figures = run.figures.is_dir() and any(run.figures.glob("*.png"))
    if not metrics and not has_figures and not run.config_path.is_file():
        return ""
    parts = [f"<h2>{escape(name)}</h2>"]
    found = metrics.get("findings") or []
    if found:
        parts.append(_findings_html(found))
    parts += _figures_html(run)
    numbers = {k: v for k, v in metrics.items() if k not in _SKIP}
    if numbers:
        parts.append("<h3>Numbers</h3>" + _metrics_html(numbers))
        raw = json.dumps(metrics, indent=1)
        shown = raw if len(raw) <= _MAX_RAW_JSON else raw[:_MAX_RAW_JSON] + "\n… (truncated; see metrics.json)"
        parts.append(f"<details><summary>raw metrics.json</summary><pre>{escape(shown)}</pre></details>")
    if run.config_path.is_file():
        parts.append("<details><summary>configuration</summary><div class='scroll'>"
                     + _kv_table(_flatten(run.read_config())) + "</div></details>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------- findings
def _verdict(verdict: str) -> str:
    if not verdict:
        return ""
    cls = "v-" + _slug(verdict.split(" (")[0])
    return f"<span class='verdict {cls}'>{escape(verdict)}</span>"


def _findings_html(found: list) -> str:
    rows = []
    for f in found:
        if isinstance(f, dict):
            rows.append(f"<tr><td><span class='claim'>“{escape(f.get('claim', ''))}”</span> "
                        f"<span class='src'>({escape(f.get('source', ''))})</span></td>"
                        f"<td>{escape(f.get('measurement', ''))}</td><td>{escape(f.get('control', ''))}</td>"
                        f"<td>{_verdict(f.get('verdict', ''))}</td></tr>")
        else:
            rows.append(f"<tr><td colspan='4'>{escape(str(f))}</td></tr>")
    return ("<div class='findings'><h3>Findings</h3><div class='scroll'><table class='findings'><colgroup>"
            "<col style='width:31%'><col style='width:30%'><col style='width:25%'><col style='width:14%'></colgroup>"
            "<tr><th>the paper's claim</th><th>our measurement</th><th>control or baseline</th><th>verdict</th></tr>"
            + "".join(rows) + "</table></div></div>")


# ------------------------------------------------------------------------------------------------- numbers
def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (Number, str, bool))


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


def _is_matrix(value) -> bool:
    return (isinstance(value, list) and len(value) > 1 and all(isinstance(r, list) and r and
                                                                all(isinstance(x, Number) for x in r) for r in value)
            and len({len(r) for r in value}) == 1)


def _metrics_html(metrics: dict) -> str:
    """Scalars in one table; dicts of scalars that share their keys side by side; matrices as heat-maps; long
    lists and everything else folded."""
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
        html.append("<div class='scroll'>" + _kv_table(scalars) + "</div>")
    for keys, columns in series.items():
        head = "<tr><th></th>" + "".join(f"<th>{escape(label(c))}</th>" for c in columns) + "</tr>"
        rows = "".join(f"<tr><th>{escape(str(k))}</th>" + "".join(f"<td class='n'>{_fmt(col[k])}</td>"
                                                                   for col in columns.values()) + "</tr>" for k in keys)
        table = f"<div class='scroll'><table>{head}{rows}</table></div>"
        if len(keys) > _MAX_INLINE_LIST:  # a long per-class or per-layer table: folded
            table = (f"<details><summary>{escape(', '.join(label(c) for c in columns))} ({len(keys)} rows)"
                     f"</summary>{table}</details>")
        html.append(table)
    for key, value in rest.items():
        html.append(_value_html(key, value))
    return "".join(html)


def _value_html(key: str, value) -> str:
    if _is_matrix(value):
        return f"<figure><img alt='{escape(key)}' src='{_matrix_png(value, label(key))}'><figcaption>{escape(label(key))} " \
               f"({len(value)} × {len(value[0])})</figcaption></figure>"
    if isinstance(value, list) and len(value) <= _MAX_INLINE_LIST and all(_is_scalar(v) for v in value):
        return f"<p><b>{escape(label(key))}</b>: " + ", ".join(_fmt(v) for v in value) + "</p>"
    if isinstance(value, dict):
        return (f"<details><summary>{escape(label(key))}</summary><div class='scroll'>"
                + _kv_table(_flatten(value)) + "</div></details>")
    return (f"<details><summary>{escape(label(key))} (a list of {len(value) if isinstance(value, list) else 1})"
            f"</summary><pre>{escape(json.dumps(value)[:20_000])}</pre></details>")


def _matrix_png(matrix, title: str) -> str:
    """A heat-map of a matrix as an embedded PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import numpy as np

    from branchspec.report.plots import heatmap, subplots

    m = np.asarray(matrix, dtype=float)
    fig, axes = subplots(1, 1, panel=(min(6.0, 1.6 + 0.25 * m.shape[1]), min(5.0, 1.3 + 0.22 * m.shape[0])))
    heatmap(axes[0, 0], m, title=title, symmetric=bool(np.nanmin(m) < 0 < np.nanmax(m)))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
    def show(v):
        if _is_scalar(v):
            return _fmt(v)
        if isinstance(v, list) and len(v) <= _MAX_INLINE_LIST and all(_is_scalar(x) for x in v):
            return ", ".join(_fmt(x) for x in v)
        return f"<details><summary>{len(v) if isinstance(v, list) else ''} values</summary>" \
               f"<code>{escape(json.dumps(v)[:5000])}</code></details>"

    rows = "".join(f"<tr><th>{escape(label(str(k)))}</th><td class='n'>{show(v)}</td></tr>" for k, v in items.items())
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
        html.append(f"<figure><img alt='{escape(png.stem)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption><b>{escape(png.stem.replace('_', ' '))}</b>. {escape(caption)}</figcaption></figure>")
    return html


# --------------------------------------------------------------------------------------------- comparison
def build_comparison(runs: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """The same numbers of several runs side by side (a multi-seed parent contributes its intervals), and a
    figure of the key numbers with their intervals; written to ``out`` (an .html file)."""
    from branchspec.findings import numbers_of
    from branchspec.seeds import format_interval

    paths = [RunDir(p, must_exist=True).path for p in runs]
    numbers = {p: numbers_of(p) for p in paths}
    common = sorted(set.intersection(*[set(n) for n in numbers.values()])) if numbers else []
    if not common:
        raise BranchspecError("the runs share no number to compare; give runs of the same command.")
    head = "<tr><th>number</th>" + "".join(f"<th>{escape(p.name)}</th>" for p in paths) + "</tr>"
    rows = "".join(f"<tr><th>{escape(label(k.split('/')[-1]) if '/' not in k else k)}</th>"
                   + "".join(f"<td class='n'>{escape(format_interval(numbers[p][k]))}</td>" for p in paths) + "</tr>"
                   for k in common)
    figure = _comparison_png(paths, numbers, common)
    title = title or "branchspec: " + ", ".join(p.name for p in paths)
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f"<p class='meta'>Each cell: the mean, its 95% interval over seeds where the run has several, and n.</p>"
            + (f"<figure><img alt='key numbers' src='{figure}'><figcaption>The key numbers of each run, with their "
               "95% intervals over seeds.</figcaption></figure>" if figure else "")
            + f"<div class='scroll'><table>{head}{rows}</table></div></body></html>\n")
    out = Path(out)
    return atomic_write_text(out, page)


KEY_NUMBERS = ("test_accuracy", "analysis/num_silent", "analysis/num_silent_centred",
               "analysis/mean_abs_offdiagonal_correlation", "apply/component_recovery", "apply/si_sdr",
               "block_mass_ratio/last", "hit_rate/last3_mean")


def _comparison_png(paths, numbers, common) -> str | None:
    import numpy as np

    keys = [k for k in KEY_NUMBERS if k in common][:6] or common[:4]
    if not keys:
        return None
    from branchspec.report.plots import subplots

    fig, axes = subplots(1, len(keys), panel=(max(2.2, 0.5 * len(paths) + 1.2), 2.8))
    for ax, key in zip(axes[0], keys):
        means = [numbers[p][key]["mean"] or 0 for p in paths]
        err = np.array([[m - (numbers[p][key]["ci95"] or [m, m])[0], (numbers[p][key]["ci95"] or [m, m])[1] - m]
                        for p, m in zip(paths, means)]).T
        ax.bar(range(len(paths)), means, yerr=err, capsize=3, color="C0")
        ax.set_xticks(range(len(paths)), [p.name for p in paths], rotation=45, ha="right", fontsize=7)
        ax.set_title(label(key.split("/")[-1]), fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
