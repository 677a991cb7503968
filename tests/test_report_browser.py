"""The report as a reader sees it: headless Chromium at 1400 px (installed by .ci/run where it is missing)."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from branchspec.report import build_report
from branchspec.report.browser import check_report, find_chromium
from branchspec.rundir import RunDir

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed here (apt-get install "
                                "chromium; .ci/run does it): the report was not checked in a browser")


def small_report(root):
    """A two-part report with what a study writes: findings, figures, scalars, a matrix, long lists, a wide table."""
    run = RunDir(root)
    run.write_config({"command": "demo", "parts": ["one", "two"]})
    for name in ("one", "two"):
        part = run.sub(name)
        part.write_config({"command": "classify train", "path": "/a/very/long/path/" * 12})
        part.write_metrics({"findings": [{"claim": "some branches go silent", "source": "Fig. 5", "measurement":
                                          "0 silent", "control": "at init", "verdict": "not reproduced"}],
                            "test_accuracy": 0.9, "covariance": np.eye(8).tolist(), "norms": list(range(64)),
                            "per_class": {f"class_{i}_with_a_long_name": i / 10 for i in range(30)}})
        fig, ax = plt.subplots(figsize=(14, 3))  # wider than the page: the image must scale down
        ax.plot(range(10))
        part.save_figure(fig, "curve", "a curve")
    return build_report(run)


def test_the_report_renders_in_a_browser_without_overflow_or_broken_images(tmp_path):
    report = small_report(tmp_path / "demo")
    result = check_report(report)
    assert result["images"] >= 4 and result["broken"] == 0
    assert not result["overflow"], result["wide"]
    assert all(t and t != "." for t in result["titles"])
    sections = [s for s in result["sections"] if s["title"] in ("one", "two")]
    assert len(sections) == 2 and all(s["findings"] for s in sections)
    assert result["screenshot"] and (tmp_path / "demo" / "report.png").stat().st_size > 10_000
    json.dumps(result)
