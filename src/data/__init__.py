"""Data: the one LightningDataModule, its collators and the embedded tiny task."""

from src.data.datamodule import AlignmentDataModule, DataError, load_tokenizer, read_rows

__all__ = ["AlignmentDataModule", "DataError", "load_tokenizer", "read_rows"]
