"""pathssl: self-supervised learning on pathology images, from whole-slide images to benchmark tables."""

__version__ = "0.1.0"
