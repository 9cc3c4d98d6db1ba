"""Whole-slide images: the one slide-opening function (`open_slide`) and the `slides info` inspector."""

from pathssl_cli.slides.readers import READERS, SlideError, metadata_mpp, open_slide

__all__ = ["READERS", "SlideError", "metadata_mpp", "open_slide"]
