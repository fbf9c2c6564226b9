"""The report layer: run records → report.json / report.md / report.html, baselines and diffs.

Knows results, not models: nothing here imports torch.
"""

from .baseline import (
    BaselineError,
    ClaimDiff,
    Comparison,
    baseline_path,
    cli_compare,
    compare,
    format_comparison,
    load_report,
    save_baseline,
)
from .errors import ReportError, ReportWriteError
from .html import render_html, write_html
from .record import (
    SCHEMA_VERSION,
    ClaimResult,
    ControlResult,
    ModelInfo,
    PreflightResult,
    ProbeRecord,
    RunRecord,
)
from .writers import (
    SUMMARY_HEADERS,
    render_markdown,
    summary_rows,
    verdict_counts,
    write_all,
    write_json,
    write_markdown,
)

__all__ = [
    "SCHEMA_VERSION",
    "SUMMARY_HEADERS",
    "BaselineError",
    "ClaimDiff",
    "ClaimResult",
    "Comparison",
    "ControlResult",
    "ModelInfo",
    "PreflightResult",
    "ProbeRecord",
    "ReportError",
    "ReportWriteError",
    "RunRecord",
    "baseline_path",
    "cli_compare",
    "compare",
    "format_comparison",
    "load_report",
    "render_html",
    "render_markdown",
    "save_baseline",
    "summary_rows",
    "verdict_counts",
    "write_all",
    "write_html",
    "write_json",
    "write_markdown",
]
