"""Data, model, model store and the Ray Train job.

Names load on first use: `from train.store import ModelStore` (the Serve settings, the cluster
check) should not pay for importing TensorFlow.
"""

import importlib

_EXPORTS = {
    "train.data": ["DataFileError", "DataSpec", "Example", "Splits", "load_dataset", "read_user_file"],
    "train.job": ["TrainConfig", "TrainOutcome", "run_training"],
    "train.model": ["SIZES", "LoadedModel", "build_model", "load_model_dir", "new_model", "save_model_dir"],
    "train.store": ["ModelStore"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
