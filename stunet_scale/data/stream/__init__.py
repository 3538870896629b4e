"""Online streaming: the prepared store -> augmented patches on every rank (see ``stunet_scale/data/__init__.py``)."""
