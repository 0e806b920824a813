"""Tests for keras_adr.export.

Exports are checked the way a server would see them: loaded in a fresh
Python process and through `saved_model_cli`, never by reusing the exporting
process's objects.
"""

import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_adr import export, fileio

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_INPUT_SHAPE = (28, 28, 1)
_NUM_CLASSES = 10


def _tiny_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input(_INPUT_SHAPE)
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(_NUM_CLASSES)(x)
    return keras.Model(inputs, outputs)


def _subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(args, timeout=120):
    result = subprocess.run(
        args,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _saved_model_cli():
    # Run through the interpreter so that the test uses this environment's
    # TensorFlow even where the console script is not on PATH.
    return [
        sys.executable,
        "-c",
        "from tensorflow.python.tools import saved_model_cli as c; c.main()",
    ]


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, *_INPUT_SHAPE), dtype=np.uint8)
    return pixels


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("export") / "model"
    return export.export_saved_model(
        model, base_dir, metadata={"preset": "adr_trades", "epsilon": 0.1}
    )


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported)


def _expected(model, floats):
    logits = model(floats, training=False).numpy()
    return {
        "logits": logits,
        "probabilities": keras.ops.softmax(logits).numpy(),
        "classes": logits.argmax(-1),
    }


@pytest.mark.slow
def test_fresh_process_outputs_match_keras(model, images, exported, tmp_path):
    floats = images.astype(np.float32) / 255.0
    np.save(tmp_path / "float.npy", floats)
    np.save(tmp_path / "uint8.npy", images)
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import tensorflow as tf

        model_dir, data_dir = sys.argv[1:]
        loaded = tf.saved_model.load(model_dir)
        for name, file in [("serving_default", "float"),
                           ("serve_uint8", "uint8")]:
            x = np.load(f"{data_dir}/{file}.npy")
            signature = loaded.signatures[name]
            outputs = signature(images=tf.constant(x))
            np.savez(f"{data_dir}/{name}_out.npz",
                     **{k: v.numpy() for k, v in outputs.items()})
        """
    )
    _run([sys.executable, "-c", script, exported, str(tmp_path)])

    expected = _expected(model, floats)
    for name in export.SIGNATURE_NAMES:
        outputs = np.load(tmp_path / f"{name}_out.npz")
        assert sorted(outputs.files) == sorted(export.OUTPUT_NAMES)
        assert outputs["probabilities"].dtype == np.float32
        assert outputs["logits"].dtype == np.float32
        assert outputs["classes"].dtype == np.int64
        np.testing.assert_allclose(outputs["logits"], expected["logits"], atol=1e-5)
        np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], atol=1e-5)
        np.testing.assert_array_equal(outputs["classes"], expected["classes"])


@pytest.mark.slow
def test_saved_model_cli_shows_both_signatures(exported):
    shown = _run(_saved_model_cli() + ["show", "--dir", exported, "--all"])
    for name in export.SIGNATURE_NAMES:
        assert f"signature_def['{name}']" in shown
    assert "DT_UINT8" in shown and "DT_FLOAT" in shown
    assert "(-1, 28, 28, 1)" in shown
    for output in export.OUTPUT_NAMES:
        assert f"outputs['{output}']" in shown


@pytest.mark.slow
def test_saved_model_cli_run_gives_same_classes(model, images, exported, tmp_path):
    floats = images.astype(np.float32) / 255.0
    np.save(tmp_path / "images.npy", floats)
    _run(
        _saved_model_cli()
        + [
            "run",
            "--dir",
            exported,
            "--tag_set",
            "serve",
            "--signature_def",
            export.SERVING_DEFAULT,
            "--inputs",
            f"images={tmp_path / 'images.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ]
    )
    classes = np.load(tmp_path / "out" / "classes.npy")
    np.testing.assert_array_equal(classes, _expected(model, floats)["classes"])


@pytest.mark.parametrize(
    "name, bad",
    [
        ("serving_default", np.zeros((2, 28, 28), np.float32)),  # rank 3
        ("serving_default", np.zeros((2, 28, 28, 3), np.float32)),  # channels
        ("serving_default", np.zeros((2, 14, 28, 1), np.float32)),  # height
        ("serving_default", np.full((2, 28, 28, 1), np.nan, np.float32)),
        ("serving_default", np.full((2, 28, 28, 1), np.inf, np.float32)),
        ("serving_default", np.full((2, 28, 28, 1), 255.0, np.float32)),
        ("serving_default", np.full((2, 28, 28, 1), -0.5, np.float32)),
        ("serve_uint8", np.zeros((2, 28, 28, 3), np.uint8)),
        ("serve_uint8", np.zeros((2, 28, 28, 1), np.float32)),  # dtype
    ],
)
def test_signatures_reject_bad_inputs(loaded, name, bad):
    with pytest.raises((ValueError, TypeError, tf.errors.InvalidArgumentError)):
        loaded.signatures[name](images=tf.constant(bad))


def test_in_graph_checks_catch_what_the_signature_spec_misses():
    # TF Serving feeds tensors into the graph without the Python-side
    # TensorSpec check, so the graph itself must reject bad images.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def checked(images):
        return export.signature_graphs._checked_float_images(images, _INPUT_SHAPE)

    with pytest.raises(tf.errors.InvalidArgumentError, match="compatible"):
        checked(tf.zeros((1, 28, 28, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        checked(tf.fill((1, 28, 28, 1), float("nan")))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[0, 1\].*serve_uint8.*1\.5"):
        checked(tf.fill((1, 28, 28, 1), 1.5))
    np.testing.assert_array_equal(
        checked(tf.fill((2, 28, 28, 1), 0.25)), np.full((2, 28, 28, 1), 0.25)
    )


def test_metadata_round_trips(model, exported):
    path = pathlib.Path(exported, "assets.extra")
    path /= export.EXPORT_METADATA_FILENAME
    assert path.is_file()
    metadata = export.read_metadata(exported)
    assert metadata == json.loads(path.read_text())
    assert metadata["preset"] == "adr_trades"
    assert metadata["epsilon"] == 0.1
    assert metadata["input_shape"] == [None, 28, 28, 1]
    assert metadata["num_classes"] == _NUM_CLASSES
    assert metadata["tensorflow_version"] == tf.__version__
    assert metadata["keras_version"] == keras.__version__
    assert set(metadata["signatures"]) == set(export.SIGNATURE_NAMES)
    images = metadata["signatures"][export.SERVE_UINT8]["inputs"]["images"]
    assert images == {"dtype": "uint8", "shape": [None, 28, 28, 1]}


def _warmup_logs(version_dir):
    prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    path = os.path.join(version_dir, export.METADATA_DIRNAME, export.WARMUP_FILENAME)
    return [
        prediction_log_pb2.PredictionLog.FromString(record.numpy())
        for record in tf.data.TFRecordDataset(path)
    ]


def test_warmup_requests_parse_and_run_on_every_signature(model, exported, loaded):
    logs = _warmup_logs(exported)
    assert export.read_metadata(exported)["warmup_requests"] == len(logs)
    batch_sizes = {name: [] for name in export.SIGNATURE_NAMES}
    for log in logs:
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        name = request.model_spec.signature_name
        assert set(request.inputs) == {export.INPUT_NAME}
        images = tf.make_ndarray(request.inputs[export.INPUT_NAME])
        assert images.dtype == export.SIGNATURE_INPUT_DTYPES[name]
        assert images.shape[1:] == _INPUT_SHAPE
        batch_sizes[name].append(images.shape[0])
        outputs = loaded.signatures[name](images=tf.constant(images))
        floats = images.astype(np.float32)
        if name == export.SERVE_UINT8:
            floats /= 255.0
        np.testing.assert_allclose(
            outputs["logits"].numpy(),
            _expected(model, floats)["logits"],
            rtol=1e-5,
            atol=1e-5,
        )
    for name in export.SIGNATURE_NAMES:
        assert batch_sizes[name] == list(export.WARMUP_BATCH_SIZES)


def test_metadata_matches_loaded_signatures(exported, loaded):
    described = export.read_metadata(exported)["signatures"]
    for name in export.SIGNATURE_NAMES:
        signature = loaded.signatures[name]
        args, kwargs = signature.structured_input_signature
        assert args == ()
        inputs = {
            key: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
            for key, spec in kwargs.items()
        }
        assert inputs == described[name]["inputs"]
        outputs = {
            key: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
            for key, spec in signature.structured_outputs.items()
        }
        assert outputs == described[name]["outputs"]


def test_version_numbering(model, tmp_path):
    base_dir = tmp_path / "model"
    assert export.export_saved_model(model, base_dir) == str(base_dir / "1")
    assert export.export_saved_model(model, base_dir) == str(base_dir / "2")
    path = export.export_saved_model(model, base_dir, version=7)
    assert path == str(base_dir / "7")
    assert export.export_saved_model(model, base_dir) == str(base_dir / "8")
    assert export.list_versions(base_dir) == [1, 2, 7, 8]
    # Nothing but versions is left behind.
    assert sorted(os.listdir(base_dir)) == ["1", "2", "7", "8"]


def test_existing_version_needs_overwrite(model, tmp_path):
    base_dir = tmp_path / "model"
    export.export_saved_model(model, base_dir, version=3, metadata={"n": 1})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.export_saved_model(model, base_dir, version=3, metadata={"n": 2})
    assert export.read_metadata(base_dir / "3")["n"] == 1

    path = export.export_saved_model(model, base_dir, version=3, metadata={"n": 3}, overwrite=True)
    assert path == str(base_dir / "3")
    assert export.read_metadata(path)["n"] == 3
    assert sorted(os.listdir(base_dir)) == ["3"]


@pytest.mark.parametrize("version", [0, -1, 1.5, "3", True, 2**63])
def test_bad_version_raises(model, tmp_path, version):
    with pytest.raises(ValueError, match="positive integer"):
        export.export_saved_model(model, tmp_path, version=version)
    assert os.listdir(tmp_path) == []


def test_numpy_integer_version(model, tmp_path):
    path = export.export_saved_model(model, tmp_path, version=np.int64(4))
    assert path == str(tmp_path / "4")


@pytest.mark.parametrize("shape", [(None, None, 1), (28, 28), (28, 28, 1, 1)])
def test_model_input_must_be_defined_rank_4(tmp_path, shape):
    inputs = keras.Input(shape)
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="rank-4"):
        export.export_saved_model(model, tmp_path)


def test_failed_export_leaves_nothing(model, tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        export.export_saved_model(model, tmp_path, metadata={"version": 9})
    with pytest.raises(ValueError, match="JSON"):
        export.export_saved_model(model, tmp_path, metadata={"x": object()})
    assert os.listdir(tmp_path) == []


def test_version_directory_honours_umask(model, tmp_path):
    path = export.export_saved_model(model, tmp_path)
    os.mkdir(tmp_path / "sibling")
    # Not 0o700 as tempfile.mkdtemp would give: the server may be another
    # user.
    assert os.stat(path).st_mode == os.stat(tmp_path / "sibling").st_mode


@pytest.mark.slow
def test_killed_export_leaves_no_version(model, tmp_path):
    base_dir = tmp_path / "model"
    export.export_saved_model(model, base_dir)
    # The child blocks after the SavedModel and metadata are written and
    # flushed, just before the rename that publishes them.
    script = textwrap.dedent(
        f"""
        import sys, time
        import keras
        from keras_adr import export, fileio

        inputs = keras.Input({_INPUT_SHAPE})
        x = keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(inputs))
        model = keras.Model(inputs, keras.layers.Dense(10)(x))
        write_everything = fileio.fsync_tree

        def write_then_block(path):
            write_everything(path)
            print("ready", flush=True)
            time.sleep(600)

        fileio.fsync_tree = write_then_block
        export.export_saved_model(model, sys.argv[1])
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(base_dir)],
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        assert ready and child.stdout.readline().strip() == "ready"
        temporaries = [
            name for name in os.listdir(base_dir) if name.startswith(export.TEMP_EXPORT_PREFIX)
        ]
        assert len(temporaries) == 1
        temp_dir = base_dir / temporaries[0]
        assert (temp_dir / "saved_model.pb").is_file()
        # A live export's temporary must survive a concurrent cleanup.
        assert export.cleanup_stale_temporaries(base_dir) == []
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)

    assert export.list_versions(base_dir) == [1]
    assert temp_dir.exists()
    path = export.export_saved_model(model, base_dir)
    assert path == str(base_dir / "2")
    assert sorted(os.listdir(base_dir)) == ["1", "2"]
    tf.saved_model.load(path)


def test_cleanup_restores_version_whose_replacement_died(model, tmp_path):
    base_dir = tmp_path / "model"
    export.export_saved_model(model, base_dir, version=3, metadata={"n": 1})
    # As left by an `overwrite=True` export killed between its two renames.
    aside = base_dir / f"{export.TEMP_REPLACED_PREFIX}3-999999-abc"
    os.rename(base_dir / "3", aside)

    assert export.cleanup_stale_temporaries(base_dir) == [str(aside)]
    assert sorted(os.listdir(base_dir)) == ["3"]
    assert export.read_metadata(base_dir / "3")["n"] == 1


def test_cleanup_deletes_replaced_version_once_replaced(model, tmp_path):
    base_dir = tmp_path / "model"
    export.export_saved_model(model, base_dir, version=3, metadata={"n": 1})
    export.export_saved_model(model, base_dir, version=4, metadata={"n": 2})
    # As left by an `overwrite=True` export killed after both renames but
    # before deleting the old version.
    aside = base_dir / f"{export.TEMP_REPLACED_PREFIX}3-999999-abc"
    os.rename(base_dir / "3", aside)
    os.rename(base_dir / "4", base_dir / "3")

    assert export.cleanup_stale_temporaries(base_dir) == [str(aside)]
    assert sorted(os.listdir(base_dir)) == ["3"]
    assert export.read_metadata(base_dir / "3")["n"] == 2


def test_cleanup_skips_locked_temporaries(tmp_path):
    temp_dir, lock_fd = fileio.make_locked_temp_dir(str(tmp_path), f"{export.TEMP_EXPORT_PREFIX}1-")
    try:
        assert export.cleanup_stale_temporaries(tmp_path) == []
        assert os.path.isdir(temp_dir)
    finally:
        fileio.unlock(lock_fd)
    assert export.cleanup_stale_temporaries(tmp_path) == [temp_dir]
    assert os.listdir(tmp_path) == []


def test_models_config(tmp_path):
    text = export.models_config("fashion_mnist", "/models/fashion_mnist")
    assert text == (
        "model_config_list {\n"
        "  config {\n"
        '    name: "fashion_mnist"\n'
        '    base_path: "/models/fashion_mnist"\n'
        '    model_platform: "tensorflow"\n'
        "  }\n"
        "}\n"
    )
    path = tmp_path / "cfg" / "models.config"
    assert export.write_models_config(path, "m", "/a/b") == str(path)
    assert path.read_text() == export.models_config("m", "/a/b")
    assert os.listdir(path.parent) == ["models.config"]
    assert '"C:\\\\x\\"y"' in export.models_config("m", 'C:\\x"y')


def test_models_config_is_tf_servings_proto(monkeypatch):
    pb2 = pytest.importorskip("tensorflow_serving.config.model_server_config_pb2")
    from google.protobuf import text_format

    text = export.models_config("m", 'C:\\x"y/é', model_platform="tf")
    parsed = text_format.Parse(text, pb2.ModelServerConfig())
    (entry,) = parsed.model_config_list.config
    assert (entry.name, entry.base_path, entry.model_platform) == ("m", 'C:\\x"y/é', "tf")
    # Without tensorflow-serving-api the same text is written by hand.
    monkeypatch.setattr(export.server_config, "_model_server_config_pb2", lambda: None)
    assert export.models_config("m", 'C:\\x"y/é', model_platform="tf") == text


@pytest.mark.parametrize("name", ["", "a b", 'a"b', "a/b", "-a"])
def test_models_config_rejects_bad_names(name):
    with pytest.raises(ValueError, match="model_name"):
        export.models_config(name, "/models/x")


def test_large_requests_run_in_chunks_and_empty_ones_work(model, loaded):
    serve = loaded.signatures[export.SERVING_DEFAULT]
    # Across chunk boundaries: the same logits as one model call.
    n = 2 * export.SERVING_CHUNK + 7
    floats = np.random.default_rng(1).random((n, *_INPUT_SHAPE), dtype=np.float32)
    np.testing.assert_allclose(
        serve(images=floats)["logits"].numpy(),
        _expected(model, floats)["logits"],
        rtol=1e-5,
        atol=1e-5,
    )
    for name, dtype in ((export.SERVING_DEFAULT, tf.float32), ("serve_uint8", tf.uint8)):
        outputs = loaded.signatures[name](images=tf.zeros([0, *_INPUT_SHAPE], dtype))
        assert outputs["logits"].shape == (0, _NUM_CLASSES)
        assert outputs["classes"].shape == (0,)


@pytest.mark.parametrize("metadata", [{"model_name": "mine"}, {"loss": float("nan")}])
def test_bad_metadata_is_refused_before_the_saved_model_is_written(
    model, tmp_path, monkeypatch, metadata
):
    def no_writing(*args, **kwargs):
        raise AssertionError("the SavedModel was written before the metadata was checked")

    monkeypatch.setattr(export.saved_model, "write_saved_model", no_writing)
    with pytest.raises(ValueError, match="reserved|JSON"):
        export.export_saved_model(model, tmp_path / "serving", metadata=metadata)
