"""Outputs from the result CSVs: figures, REPORT.md, paper-recipe comparisons, token-group drawings.

Nothing here imports torch or the engine (an import-linter contract): these read CSVs with pandas
and draw with matplotlib, so `ipbench plot` starts fast and works where no model can load.
"""

from ipbench.plots.folder import plot_folder
from ipbench.plots.frames import PlotOutput, ResultTable, read_folder
from ipbench.plots.report import write_report

__all__ = ["PlotOutput", "ResultTable", "plot_folder", "read_folder", "write_report"]
