"""The self-contained HTML report of one or more runs (``orchestrator report``)."""

from orchestrator.report.build import build_report, find_runs, write_report

__all__ = ["build_report", "find_runs", "write_report"]
