"""The errors of `keras_adr.data` (user errors: a missing or broken dataset)."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither on disk nor in a prepared TFDS `data_dir`."""


class CorruptDatasetError(ValueError):
    """A dataset file is truncated, malformed or inconsistent."""
