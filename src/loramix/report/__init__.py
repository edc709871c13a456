"""Reports of a training run: loss curves and router load heatmaps from ``metrics.jsonl``
(``plots.py``), and ``loramix report`` (``command.py``)."""

from .plots import ReportError, plot_expert_load, plot_losses, read_metrics, write_plots

__all__ = ["ReportError", "plot_expert_load", "plot_losses", "read_metrics", "write_plots"]
