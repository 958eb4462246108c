"""FinFlow: real-time transaction analytics on Faust."""

__version__ = "0.1.0"
