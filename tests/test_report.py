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
    assert html.count("data:image/png;base64,") == 2  # the figure, and the 2×2 matrix as a heat-map
    assert "part_x" in html and "accuracy" in html
    assert "<table><tr><td>1</td>" not in html  # no matrix printed as a grid of numbers


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


def test_findings_come_first_and_a_multi_part_report_has_a_summary_and_contents(tmp_path):
    from branchspec.report.html import build_comparison

    run = RunDir(tmp_path / "demo")
    run.write_config({"command": "demo"})
    part = run.sub("classify")
    part.write_metrics({"test_accuracy": 0.97, "findings": [{"claim": "branches go silent", "source": "Fig. 5",
                                                              "measurement": "0 silent", "control": "init",
                                                              "verdict": "not reproduced"}],
                        "covariance": [[1.0, 0.1], [0.1, 1.0]], "norms": list(range(30))})
    fig, ax = plt.subplots()
    part.save_figure(fig, "fig5", "caption")
    html = build_report(run).read_text()
    assert html.index("Findings") < html.index("fig5") < html.index("Numbers")  # findings, figures, numbers
    assert "<h2 id='summary'>Summary</h2>" in html and "Contents" in html and "v-not-reproduced" in html
    assert "<h1>demo: branchspec demo</h1>" in html and "<h2>.</h2>" not in html
    assert "<details><summary>norms (a list of 30)" in html  # a long list is folded
    assert "test accuracy" in html and "raw metrics.json" in html
    other = RunDir(tmp_path / "other")
    other.write_metrics({"test_accuracy": 0.5})
    page = build_comparison([part.path, other.path], tmp_path / "cmp.html").read_text()
    assert "0.970" in page and "0.500" in page and "data:image/png;base64," in page
