"""The IDX file format of MNIST and Fashion-MNIST.

An IDX file is a magic number `0x00 0x00 <type code> <ndim>`, `ndim`
big-endian `uint32` dimensions, and the values in row-major order; files
are often gzip-compressed.
"""

import gzip
import math
import os

import numpy as np

from keras_adr.data.errors import CorruptDatasetError

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path):
    """Reads an IDX file (as used by MNIST and Fashion-MNIST).

    The file may be gzip-compressed (detected from its content, not its
    name). The header is a magic number `0x00 0x00 <type code> <ndim>`
    followed by `ndim` big-endian `uint32` dimensions; the payload must hold
    exactly the number of values these dimensions call for.

    Args:
        path: Path of the file.

    Returns:
        A numpy array with the file's shape, in native byte order. `uint8`
        data is returned as a read-only view of the file's bytes.

    Raises:
        FileNotFoundError: If `path` does not exist.
        CorruptDatasetError: If the file is not valid gzip, has a bad magic
            number, or its payload size does not match its header.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise CorruptDatasetError(f"{path}: corrupt or truncated gzip data ({e}).") from e
    dtype, shape, header_size = _parse_idx_header(path, data)
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "trailing data"
        raise CorruptDatasetError(
            f"{path}: the header announces shape {shape} of {dtype.name}, "
            f"i.e. {expected} payload bytes, but the file holds {actual} "
            f"payload bytes ({problem})."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    return array


def _parse_idx_header(path, data):
    """Returns `(dtype, shape, header_size)` parsed from an IDX header."""
    if len(data) < 4:
        raise CorruptDatasetError(
            f"{path}: {len(data)} bytes, too short for an IDX magic number (4 bytes)."
        )
    zero0, zero1, type_code, ndim = data[:4]
    if zero0 or zero1 or type_code not in _IDX_DTYPES:
        raise CorruptDatasetError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()}; expected "
            "0x0000 followed by a type code in "
            f"{[hex(code) for code in _IDX_DTYPES]} and the number of "
            "dimensions."
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise CorruptDatasetError(
            f"{path}: truncated IDX header: {ndim} dimensions need "
            f"{header_size} header bytes, the file holds {len(data)}."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    return _IDX_DTYPES[type_code], shape, header_size


def read_image_label_pair(images_path, labels_path, num_classes):
    """Reads and cross-checks an images file and its labels file.

    Args:
        images_path: IDX file of `uint8` images `[N, H, W]`.
        labels_path: IDX file of labels `[N]`.
        num_classes: Labels must lie in `[0, num_classes)`.

    Returns:
        Tuple `(images, labels)` of numpy arrays.

    Raises:
        FileNotFoundError: If a file does not exist.
        CorruptDatasetError: If a file is malformed or the two disagree.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CorruptDatasetError(
            f"{images_path}: expected uint8 images of shape [N, H, W], got "
            f"{images.dtype.name} of shape {images.shape}."
        )
    if labels.ndim != 1:
        raise CorruptDatasetError(
            f"{labels_path}: expected labels of shape [N], got shape {labels.shape}."
        )
    if len(images) != len(labels):
        raise CorruptDatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} "
            f"holds {len(labels)} labels."
        )
    if len(labels) and int(labels.max()) >= num_classes:
        raise CorruptDatasetError(
            f"{labels_path}: label {int(labels.max())} out of range [0, {num_classes})."
        )
    return images, labels
