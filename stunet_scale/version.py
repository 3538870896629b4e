"""The package version (pyproject.toml says the same; a test checks it). Its own module so that code
anywhere can read it without importing the package facade in ``stunet_scale/__init__.py``."""

__version__ = "0.1.0"
