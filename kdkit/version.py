"""kdkit's version: one bottom module that imports nothing, so that any module can name the version
without importing the package face (pyproject.toml reads it too)."""

__version__ = "0.1.0"
