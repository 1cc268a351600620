"""The evidence of a main-job run: report.md / report.html, PNG figures, summary.json."""

from .render import markdown_to_html, render_markdown, write_report

__all__ = ["markdown_to_html", "render_markdown", "write_report"]
