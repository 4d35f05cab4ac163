"""Data, model, model store and the Ray Train job."""

from train.data import DataFileError, DataSpec, Example, Splits, load_dataset, read_user_file
from train.job import TrainConfig, TrainOutcome, run_training
from train.model import SIZES, LoadedModel, build_model, load_model_dir, new_model, save_model_dir
from train.store import ModelStore

__all__ = [
    "DataFileError", "DataSpec", "Example", "Splits", "load_dataset", "read_user_file",
    "TrainConfig", "TrainOutcome", "run_training",
    "SIZES", "LoadedModel", "build_model", "load_model_dir", "new_model", "save_model_dir",
    "ModelStore",
]
