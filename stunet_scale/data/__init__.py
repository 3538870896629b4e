"""The data path, in two halves that meet only at the prepared store (``store.py``: the format).

Offline ingest (``ingest/``, run once by ``stunet-scale prepare``):
    sources (raw layouts, validated reading) -> preprocess (RAS, crop, resampling, label merge,
    statistics, foreground locations) -> store_writer (Zarr v3 + WebDataset) -> prepare (the
    resumable pipeline and finalize) -> demo / demo_downstream (built-in raw datasets)

Online streaming (``stream/``, in every training rank):
    patch_geometry -> counter_noise -> plan (every sample and its augmentation parameters, a pure
    function of (seed, global index)) -> raw_batch -> shared_slabs -> readers / webdataset_reader
    (plan entry -> raw patch) -> transforms (the augmentation, a step after the reader) -> loader
    (DataLoader workers, the trainer's ``StoreDataSource``); ``source.py`` is the interface the
    trainer reads through.

Each module imports only from earlier steps; ``tests/test_import_graph.py`` checks it.
"""
