"""Reports: figures and files that show an evaluation to people (imported on first use: matplotlib
and jinja2 load only for the commands that draw)."""

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

if TYPE_CHECKING:
    from .curves import save_pixel_curves
    from .figures import FivePanel
    from .gallery import write_galleries
    from .html import ReportError, write_report
    from .overlay import overlay, save_overlay
    from .run_folder import write_run_folder

__all__ = ["FivePanel", "ReportError", "overlay", "save_overlay", "save_pixel_curves",
           "write_galleries", "write_report", "write_run_folder"]
__getattr__ = lazy_attributes(__name__, {
    "save_pixel_curves": ".curves", "FivePanel": ".figures",
    "write_galleries": ".gallery", "ReportError": ".html", "write_report": ".html", "overlay": ".overlay",
    "save_overlay": ".overlay", "write_run_folder": ".run_folder",
})
