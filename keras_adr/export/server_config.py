"""TF Serving's `models.config` file, which tells the server the name and base path of a model.

`models_config()` returns the text of TF Serving's `ModelServerConfig` proto
for one model (written with `tensorflow-serving-api`'s protos when it is
installed, by hand otherwise, to the same text), and
`write_models_config()` writes it atomically, since the server may poll the
file.
"""

import os
import re

from keras_adr import fileio

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def models_config(model_name, base_path, *, model_platform="tensorflow"):
    """Returns the text of a TF Serving `models.config` for one model.

    The text is TF Serving's own `ModelServerConfig` proto in text format,
    written with `tensorflow_serving.config.model_server_config_pb2` when
    `tensorflow-serving-api` is installed (the same text without it).

    Args:
        model_name: Name clients use in URLs and requests. Letters, digits,
            `_`, `.` and `-`, starting with a letter or digit.
        base_path: The model's base path as seen by the server (an absolute
            path inside the server's container when using Docker).
        model_platform: TF Serving platform name.

    Returns:
        The `model_config_list` text proto, ending with a newline.

    Raises:
        ValueError: If `model_name` or `base_path` is invalid.
    """
    if not isinstance(model_name, str) or not _MODEL_NAME_RE.match(model_name):
        raise ValueError(
            "`model_name` must contain only letters, digits, '_', '.' and "
            f"'-', starting with a letter or digit. Received: {model_name!r}"
        )
    base_path = os.fspath(base_path)
    if not base_path or "\n" in base_path or "\0" in base_path:
        raise ValueError(f"Invalid `base_path`: {base_path!r}")
    pb2 = _model_server_config_pb2()
    if pb2 is not None:
        from google.protobuf import text_format

        config = pb2.ModelServerConfig()
        entry = config.model_config_list.config.add()
        entry.name = model_name
        entry.base_path = base_path
        entry.model_platform = model_platform
        return text_format.MessageToString(config, as_utf8=True)
    return (
        "model_config_list {\n"
        "  config {\n"
        f"    name: {_proto_string(model_name)}\n"
        f"    base_path: {_proto_string(base_path)}\n"
        f"    model_platform: {_proto_string(model_platform)}\n"
        "  }\n"
        "}\n"
    )


def write_models_config(path, model_name, base_path, **kwargs):
    """Writes `models_config(model_name, base_path)` to `path` atomically.

    TF Serving may poll the file (`--model_config_file_poll_wait_seconds`),
    so it is replaced with a rename rather than rewritten in place.

    Args:
        path: Where to write the config file.
        model_name: See `models_config()`.
        base_path: See `models_config()`.
        **kwargs: Passed to `models_config()`.

    Returns:
        `path` as a string.
    """
    return fileio.write_text(path, models_config(model_name, base_path, **kwargs))


def _model_server_config_pb2():
    """TF Serving's config protos, or None without `tensorflow-serving-api`."""
    try:
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError:
        return None
    return model_server_config_pb2


def _proto_string(value):
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
