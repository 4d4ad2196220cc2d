"""Reports: figures and files that show an evaluation to people."""

from .curves import save_pixel_curves
from .figures import five_panel, overlay, roc_figure, save_overlay
from .gallery import write_galleries
from .html import ReportError, write_report

__all__ = ["ReportError", "five_panel", "overlay", "roc_figure", "save_overlay", "save_pixel_curves",
           "write_galleries", "write_report"]
