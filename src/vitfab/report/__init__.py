"""The evidence of a main-job run: ``Summary`` (summary.json), report.md / report.html, PNG figures."""

from .render import ablation_table, markdown_to_html, render_markdown, terminal_lines, write_report
from .summary import SUMMARY_FORMAT, Summary

__all__ = ["SUMMARY_FORMAT", "Summary", "ablation_table", "markdown_to_html", "render_markdown", "terminal_lines",
           "write_report"]
