"""The code of README.md and of the docs pages (docs/*.md), run as written.

Every fenced block of README.md and docs/*.md must be claimed by a test:
`_BLOCKS` maps a marker to the test that runs the block containing it, and a
page in `_PAGES_RUN_ELSEWHERE` is run block by block by another test file. A
block added without one fails `test_every_code_block_is_run_by_a_test`. A
block may appear on several pages (the README repeats some): the one test runs
its text once. Training blocks run on tiny data.
"""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_README = os.path.join(_ROOT, "README.md")
_DOCS = sorted(glob.glob(os.path.join(_ROOT, "docs", "*.md")))
DOCUMENTS = [_README, *_DOCS]
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")

# A substring that identifies each block -> where it is run.
_BLOCKS = {
    "apt-get install -y dataset-fashion-mnist": "install commands: what .ci/run runs",
    "z = keras_adr.layers.Latent()": "test_use_it_from_python",
    'config = keras_adr.presets.get("adr_pgd")': "test_use_it_from_python",
    "class MyModel(keras_adr.ADRMixin, keras.Model)": "test_use_it_from_python",
    "docker run": "test_serving_commands",
    "curl -s -X POST": "test_serving_commands",
    "PredictionServiceStub": "test_serving_commands",
    "--dataset=cifar10 --model=resnet18": "test_cifar_mirrored_command",
    "--strategy=multi_worker": "test_distribute.py::test_adr_train_multi_worker_two_processes",
}
# Pages whose blocks another test file runs block by block.
_PAGES_RUN_ELSEWHERE = {
    os.path.join(_ROOT, "docs", "bring-your-own-model.md"): "test_bring_your_own_model.py",
}


def code_blocks(paths=None):
    """`[(heading, language, text)]` of every fenced block of `paths` (all documents)."""
    blocks = []
    for path in DOCUMENTS if paths is None else paths:
        heading, inside, lines = "", None, []
        with open(path) as f:
            for line in f:
                if inside is None and line.startswith("#"):
                    heading = line.strip("# \n")
                elif line.startswith("```"):
                    if inside is None:
                        inside, lines = line[3:].strip(), []
                    else:
                        blocks.append((heading, inside, "".join(lines)))
                        inside = None
                elif inside is not None:
                    lines.append(line)
    return blocks


def block(marker):
    """The text of the block that contains `marker` (the same text wherever it appears)."""
    found = {text for _, _, text in code_blocks() if marker in text}
    assert len(found) == 1, f"{len(found)} different blocks contain {marker!r}"
    return found.pop()


def shell_commands(text):
    """Commands of a shell block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


def test_docs_pages_exist():
    names = {os.path.basename(path) for path in _DOCS}
    assert {"index.md", "bring-your-own-model.md", "method.md", "api.md"} <= names
    assert set(_PAGES_RUN_ELSEWHERE) <= set(_DOCS)


@pytest.mark.parametrize("path", DOCUMENTS, ids=os.path.basename)
def test_every_code_block_is_run_by_a_test(path):
    if path in _PAGES_RUN_ELSEWHERE:
        return
    for heading, _, text in code_blocks([path]):
        claims = [marker for marker in _BLOCKS if marker in text]
        assert len(claims) == 1, f"{path}: block under {heading!r} is run by no test:\n{text}"


def test_readme_is_a_first_screen():
    with open(_README) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 300
    assert "<!-- frontier-verdict -->" in lines  # where the frontier study's verdict goes
    python = [text for _, language, text in code_blocks([_README]) if language == "python"]
    assert len(python) == 1 and len(python[0].splitlines()) <= 15
    for page in re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines)):
        assert os.path.exists(os.path.join(_ROOT, page)), page


def test_readme_quotes_the_frontier_studys_verdict():
    """The two sentences between the markers are the script's, from the committed JSON."""
    from benchmarks import results_io, robustness_frontier_report

    with open(_README) as f:
        text = f.read()
    block = text.split("<!-- frontier-verdict -->\n", 1)[1].split("<!-- /frontier-verdict -->")[0]
    summary = results_io.read_json(os.path.join(_ROOT, "benchmarks", "results", "frontier.json"))
    assert " ".join(block.split()) == robustness_frontier_report.headline(summary["verdict"])


@pytest.mark.parametrize("path", _DOCS, ids=os.path.basename)
def test_docs_speak_of_the_project_alone(path):
    """No issue numbers, commit hashes or development-machine paths on the site."""
    with open(path) as f:
        text = f.read()
    assert not re.search(r"\b[Ii]ssues? \d+", text)
    assert not re.search(r"\bcommit [0-9a-f]{7,40}\b", text)
    assert not re.search(r"/work/|/root/|/home/|/tmp/", text)


@pytest.fixture
def fashion_mnist():
    from keras_adr import data

    try:
        data.load("fashion_mnist", "test", batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")


@pytest.mark.slow
def test_use_it_from_python(fashion_mnist, monkeypatch, tmp_path):
    """'Use it from Python': the three blocks in order, on 64 images instead of 60,000."""
    import keras

    import keras_adr

    full_load = keras_adr.data.load
    monkeypatch.setattr(
        keras_adr.data, "load", lambda *args, **kwargs: full_load(*args, **kwargs, take=64)
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec("import keras, keras_adr\n" + block("z = keras_adr.layers.Latent()"), namespace)
    functional = keras_adr.ADRModel(namespace["backbone"])  # finds the Latent layer by type
    assert functional.latent_layer == namespace["z"]._keras_history[0].name

    exec(block('config = keras_adr.presets.get("adr_pgd")'), namespace)
    model = namespace["model"]
    reported = set(model.get_metrics_result())
    assert {"loss", "accuracy", "adv_accuracy", *model.adr_config.enabled_terms} <= reported
    restored = keras.models.load_model(tmp_path / "adr.keras")
    images = next(iter(full_load("fashion_mnist", "test", batch_size=8, take=8)))[0]
    np.testing.assert_allclose(restored(images), model(images), rtol=1e-5, atol=1e-5)

    exec(block("class MyModel(keras_adr.ADRMixin, keras.Model)"), namespace)
    subclassed = namespace["model"]
    assert subclassed.adr_config.objective == "trades"
    assert "trades_kl" in subclassed.get_metrics_result()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_serving_commands(fashion_mnist, tmp_path):
    """'Serving': the docker command's config, the curl request and the Python client.

    The server is `serving_standin` (TF Serving's Predict API over the same
    SavedModels, read through the same `models.config`), on the ports of the
    README when they are free.
    """
    pytest.importorskip("tensorflow_serving.apis.prediction_service_pb2_grpc")
    import shutil

    import serving_standin

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the README's REST request needs it")

    docker = shlex.split(shell_commands(block("docker run"))[0])
    volume = docker[docker.index("-v") + 1]
    host_dir, container_dir = volume.split(":")
    host_dir = host_dir.replace("$PWD", _ROOT)
    config_file = next(a for a in docker if a.startswith("--model_config_file="))
    config_file = config_file.split("=", 1)[1].replace(container_dir, host_dir, 1)
    ports = [int(docker[i + 1].split(":")[0]) for i, a in enumerate(docker) if a == "-p"]
    assert sorted(ports) == [8500, 8501]
    models = serving_standin.load_models(config_file, path_map=(container_dir, host_dir))

    curl_block = block("curl -s -X POST")
    client_block = block("PredictionServiceStub")
    try:
        server = serving_standin.Server(models, rest_port=8501, grpc_port=8500).__enter__()
    except OSError:  # The README's ports are taken here: use free ones.
        rest, grpc_port = _free_port(), _free_port()
        server = serving_standin.Server(models, rest_port=rest, grpc_port=grpc_port).__enter__()
        curl_block = curl_block.replace("localhost:8501", f"localhost:{rest}")
        client_block = client_block.replace(
            'model_name="fashion_mnist_adr")', f'model_name="fashion_mnist_adr", port={rest})'
        ).replace("localhost:8500", f"localhost:{grpc_port}")
    try:
        reply = subprocess.run(
            ["bash", "-c", curl_block], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert reply.returncode == 0, reply.stderr
        predictions = json.loads(reply.stdout)["predictions"]
        assert len(predictions) == 1 and 0 <= predictions[0]["classes"] < 10
        assert sum(predictions[0]["probabilities"]) == pytest.approx(1.0, abs=1e-4)

        namespace = {}
        exec(client_block, namespace)
    finally:
        server.__exit__(None, None, None)
    # The gRPC reply (the last assignment) and the REST one give the model's answer.
    (served,) = models["fashion_mnist_adr"].values()
    logits = served.signatures["serving_default"](images=tf.constant(namespace["images"]))
    expected = {key: value.numpy() for key, value in logits.items()}
    np.testing.assert_array_equal(namespace["classes"], expected["classes"])
    np.testing.assert_allclose(namespace["probabilities"], expected["probabilities"], atol=1e-6)


_CIFAR_MOCK = """
import sys
import tensorflow_datasets as tfds
from keras_adr.cli import train
sys.argv = sys.argv[1:]
with tfds.testing.mock_data(num_examples=64):
    train.run()
"""


@pytest.mark.slow
def test_cifar_mirrored_command(tmp_path):
    """'Distributed training': the CIFAR-10 ResNet-18 command on two logical CPU replicas.

    TFDS cannot download here, so `tfds.testing.mock_data` provides CIFAR-10;
    the command gets tiny sizes, a tmp output directory and `--cpu_replicas=2`.
    """
    pytest.importorskip("tensorflow_datasets")
    (command,) = shell_commands(block("--dataset=cifar10 --model=resnet18"))
    argv = [a for a in shlex.split(command) if not a.startswith("--output_dir=")]
    assert argv[0] == "adr-train"
    tiny = [
        f"--output_dir={tmp_path / 'run'}",
        f"--data_dir={tmp_path / 'tfds'}",
        "--cpu_replicas=2",
        "--epochs=1",
        "--batch_size=16",
        "--train_examples=32",
        "--validation_examples=16",
        "--test_examples=16",
        "--attack_steps=1",
        "--eval_attacks=pgd1,apgd_ce1",
        "--verbose=0",
    ]
    result = subprocess.run(
        [sys.executable, "-c", _CIFAR_MOCK, *argv, *tiny],
        cwd=_ROOT,
        env=_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_replicas"] == 2 and metrics["strategy"] == "MirroredStrategy"
    options = metrics["options"]
    assert options["dataset"] == "cifar10" and options["model"] == "resnet18"
    assert options["sync_batchnorm"] is True and metrics["epochs_run"] == 1
