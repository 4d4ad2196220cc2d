"""Reports: figures and files that show an evaluation to people."""

from .figures import five_panel, overlay, roc_figure, save_overlay

__all__ = ["five_panel", "overlay", "roc_figure", "save_overlay"]
