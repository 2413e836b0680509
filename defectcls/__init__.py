"""defectcls: good/bad visual inspection of round industrial parts."""

__version__ = "0.1.0"
