"""The package version (one place: fastenc/__init__.py and the export cache keys read it; pyproject.toml repeats it)."""

__version__ = "0.1.0"
