"""Figures (matplotlib) and the self-contained HTML report."""

from branchspec.report.html import build_report

__all__ = ["build_report"]
