"""chromoseg: segmentation of overlapping chromosome pairs, tracked with DVC and MLflow."""

__version__ = "0.1.0"
