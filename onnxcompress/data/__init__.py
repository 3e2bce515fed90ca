"""Data for calibration and evaluation: streaming datasets (image folders, npy/npz, CIFAR, random) and their
ORT-facing readers."""
from .datasets import PRESETS, DataError, Dataset, Preprocess, RandomDataset, open_dataset, preprocess_for_shape
from .readers import CalibrationReader, feeds_factory, inputs_for_model, model_inputs, open_for_model

__all__ = ["PRESETS", "CalibrationReader", "DataError", "Dataset", "Preprocess", "RandomDataset", "feeds_factory",
           "inputs_for_model", "model_inputs", "open_dataset", "open_for_model", "preprocess_for_shape"]
