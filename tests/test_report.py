"""The HTML report: self-contained, tables from metrics, every user string escaped."""

import matplotlib.pyplot as plt

from branchspec.report import build_report
from branchspec.rundir import RunDir


def test_report_embeds_figures_and_escapes_user_strings(tmp_path):
    run = RunDir(tmp_path / "run")
    evil = "<script>alert(1)</script>"
    run.write_config({"data": {"classes": [evil, "cat & dog"]}})
    run.write_metrics({"accuracy": 0.5, "per_class": {evil: 0.1, "dog": 0.9}, "matrix": [[1, 2], [3, 4]]})
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    run.save_figure(fig, "curve", caption=f"caption {evil}")
    sub = run.sub(f"part_{'x'}")
    sub.write_metrics({"note": evil})
    html = build_report(run).read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html and "cat &amp; dog" in html
    assert html.count("data:image/png;base64,") == 1
    assert "part_x" in html and "accuracy" in html


def test_metrics_merge_and_atomic_files(tmp_path):
    run = RunDir(tmp_path)
    run.write_metrics({"a": 1})
    run.write_metrics({"b": float("nan")})
    assert run.read_metrics() == {"a": 1, "b": None}
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_on_a_folder_without_a_run_is_an_error(tmp_path, capsys):
    from branchspec.cli import main

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds no run" in err
    assert not (tmp_path / "empty" / "report.html").exists()
