"""Offline ingest: raw datasets -> the prepared store (see ``stunet_scale/data/__init__.py``)."""
