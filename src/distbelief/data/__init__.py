"""Data sets for training: the public API.

`load_dataset` is the one entry point (``loading.py``); each data set lives in its own module.
Imports nothing from the parameter-server packages. Names load on first use: the launcher checks
a data set's files (``files.py``) without loading torch.
"""

from distbelief.lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_DATA_DIR": "distbelief.data.files",
    "SPLITS": "distbelief.data.loading",
    "ArrayDataset": "distbelief.data.base",
    "CtrDataset": "distbelief.data.ctr",
    "iterate_batches": "distbelief.data.base",
    "ground_truth_logits": "distbelief.data.synthetic_ctr",
    "iterate_ctr_batches": "distbelief.data.ctr",
    "load_dataset": "distbelief.data.loading",
    "load_job_dataset": "distbelief.data.loading",
    "missing_data_files": "distbelief.data.files",
    "worker_indices": "distbelief.data.base",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
