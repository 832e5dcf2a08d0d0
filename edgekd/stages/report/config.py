"""The `report:` section of pipeline.yaml."""

from __future__ import annotations

from edgekd.validation import Section


class ReportConfig(Section):
    html: bool = True
    """Write report.html (self-contained, plots inlined)."""
    plots: bool = True
    """Draw plots (matplotlib)."""
