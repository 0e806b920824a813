"""Packaging for keras-adr."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _version():
    """`keras_adr.__version__`, read from keras_adr/_version.py without importing the package."""
    namespace = {}
    exec((_HERE / "keras_adr" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


def _requirements():
    lines = (_HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setuptools.setup(
    name="keras-adr",
    version=_version(),
    description=(
        "Adversary Divergence Reduction (ADR) adversarial training for Keras 3 "
        "on TensorFlow, with robustness evaluation and TF Serving export."
    ),
    long_description=(_HERE / "README.md").read_text() if (_HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["keras_adr", "keras_adr.*"]),
    install_requires=_requirements(),
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "tensorflow-serving-api>=2.20,<2.22",
            "ruff==0.17.6",
            "build>=1.2",
        ],
        # The documentation site: `mkdocs serve`, `mkdocs build --strict` (CI).
        "docs": [
            "mkdocs==1.6.1",
            "mkdocs-material>=9,<10",
            "mkdocstrings>=1,<2",
            "mkdocstrings-python>=2,<3",
        ],
        "serving": ["tensorflow-serving-api>=2.20,<2.22"],
        # Peer libraries compared in benchmarks/speed.py; never needed by keras_adr.
        "benchmark": [
            "adversarial-robustness-toolbox==1.20.1",
            "foolbox==3.3.4",
            "cleverhans==4.0.0",
        ],
    },
    entry_points={
        "console_scripts": [
            "adr-train=keras_adr.cli.train:run",
            "adr-evaluate=keras_adr.cli.evaluate:run",
            "adr-export=keras_adr.cli.export:run",
        ],
    },
)
