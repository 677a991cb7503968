"""A report as a reader sees it: rendered in headless Chromium, checked, and photographed.

    result = check_report("runs/demo/report.html")      # {"images": 40, "broken": 0, "overflow": False, ...}

The page is loaded at 1400 px with a small script that records, once everything has loaded, how many images
there are and how many failed to decode, whether anything is wider than the window (outside the scrollable
tables and code blocks), every section title, and which sections open with a findings block. A screenshot of the
top of the page is written beside the report (``report.png``). Chromium comes from the system (Debian's
``chromium``); :func:`find_chromium` says whether there is one.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from branchspec.errors import BranchspecError

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const width = window.innerWidth;
  const free = e => !e.closest('.scroll, pre, details:not([open])');
  const wide = [...document.querySelectorAll('body *')].filter(e => free(e) &&
      e.getBoundingClientRect().right > width + 1).map(e => e.tagName + (e.className ? '.' + e.className : ''));
  const sections = [...document.querySelectorAll('section')].map(s => ({
      title: (s.querySelector('h2') || {textContent: ''}).textContent.trim(),
      findings: !!s.querySelector('.findings')}));
  document.body.setAttribute('data-check', JSON.stringify({images: imgs.length, broken, width,
      overflow: document.documentElement.scrollWidth > width + 1 || wide.length > 0, wide: wide.slice(0, 8),
      titles: [...document.querySelectorAll('h1, h2')].map(h => h.textContent.trim()), sections}));
});
</script>"""


def find_chromium() -> str | None:
    """The Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check_report(report: str | Path, width: int = 1400, screenshot: str | Path | None = None,
                 timeout: float = 120) -> dict:
    """Render ``report`` in headless Chromium at ``width`` px: the checks above, and a screenshot (default:
    ``report.png`` beside it; its path is in the result)."""
    chromium = find_chromium()
    if chromium is None:
        raise BranchspecError("no Chromium found; install Debian's chromium package (apt-get install chromium).")
    report = Path(report).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(report.read_text().replace("</body>", _CHECK + "</body>", 1))
        dom = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},1000",
                              "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=timeout)
        match = re.search(r'data-check="([^"]*)"', dom.stdout)
        if not match:
            raise BranchspecError(f"Chromium did not render {report} ({dom.stderr.strip().splitlines()[-1:]}).")
        result = json.loads(html.unescape(match.group(1)))
        shot = Path(screenshot) if screenshot else report.with_name("report.png")
        subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp}/profile2", f"--window-size={width},1800",
                        f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=timeout)
    result["screenshot"] = str(shot) if shot.is_file() else None
    return result
