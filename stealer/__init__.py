"""stealer: distributed CNN inference for clusters of small edge devices."""

__version__ = "0.1.0"
