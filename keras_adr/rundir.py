"""The output directory of one run: exclusive, bound to one configuration, resumable by stage.

`adr-train` writes everything of a run into one directory. `RunDirectory`
keeps that directory honest:

* **One process at a time.** An exclusive `flock` on `<dir>/.lock` for the
  whole run; a second process fails at once, naming the holder's process id.
* **One configuration.** The run's configuration is stored in
  `<dir>/run_config.json` on first use; a later run with a different one is
  refused with the list of differing flags, so results of two configurations
  are never mixed (history rows, checkpoints, exported versions).
* **Stages.** `<dir>/state.json` records the finished stages (`trained`,
  `evaluation`, `export_path`, `complete`), written atomically, so that a run
  killed at any point continues from the last finished stage.
"""

import hashlib
import json
import os

from keras_adr import fileio

CONFIG_FILE = "run_config.json"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
# Files that show a directory already holds a run's outputs.
_RUN_OUTPUTS = ("history.csv", "metrics.json", "backup", "best.keras", "final.keras", "saved_model")
# Flag names of the attack fields, where they differ from `--<field>`.
_ATTACK_FLAGS = {"steps": "attack_steps", "loss": "attack_loss", "unroll": "attack_unroll"}


class RunDirectoryError(ValueError):
    """The output directory cannot be used for this run (a user error)."""


def _flag_values(config):
    """`{--flag: value}` of a stored run configuration, for messages."""
    flat = {}
    for key, value in config.get("options", {}).items():
        flat[f"--{key}"] = value
    for key, value in config.get("adr_config", {}).items():
        if key == "attack":
            for attack_key, attack_value in value.items():
                flat[f"--{_ATTACK_FLAGS.get(attack_key, attack_key)}"] = attack_value
        else:
            flat[f"--{key}"] = value
    return flat


def config_differences(stored, current):
    """`["--flag: stored -> current", ...]` of two run configurations."""
    a, b = _flag_values(stored), _flag_values(current)
    return [
        f"{flag}: {a.get(flag, '(unset)')!r} -> {b.get(flag, '(unset)')!r}"
        for flag in sorted(set(a) | set(b))
        if a.get(flag) != b.get(flag)
    ]


def stored_config(path):
    """The configuration of the run `path` holds (its `run_config.json`), or None."""
    config_path = os.path.join(os.fspath(path), CONFIG_FILE)
    return fileio.read_json(config_path) if os.path.exists(config_path) else None


class RunDirectory:
    """Context manager over a run's output directory; see the module docstring.

    Args:
        path: The directory (created if missing).
        config: JSON-serialisable dict of everything that defines the run
            (`{"options": ..., "adr_config": ...}`).

    Raises (on enter):
        RunDirectoryError: If `path` is not a usable directory, another
            process holds it, or it holds a run of another configuration.
    """

    def __init__(self, path, config):
        self.path = os.fspath(path)
        self.config = json.loads(json.dumps(config))  # plain JSON types, as stored
        self._lock_fd = None
        self.state = {}

    def __enter__(self):
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunDirectoryError(f"--output_dir {self.path!r} is a file, not a directory.")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as error:
            raise RunDirectoryError(
                f"--output_dir {self.path!r} cannot be created: {error.strerror}."
            ) from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunDirectoryError(f"--output_dir {self.path!r} is not writable.")
        self._lock()
        try:
            self._check_config()
            state_path = os.path.join(self.path, STATE_FILE)
            self.state = fileio.read_json(state_path) if os.path.exists(state_path) else {}
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc):
        self._unlock()
        return False

    @property
    def config_id(self):
        """A short hash of the configuration (recorded in exports of the run)."""
        text = json.dumps(self.config, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def update(self, **stages):
        """Records finished stages in `state.json` (atomically)."""
        self.state.update(stages)
        fileio.write_json(os.path.join(self.path, STATE_FILE), self.state)

    def file(self, name):
        return os.path.join(self.path, name)

    def _lock(self):
        lock_path = os.path.join(self.path, LOCK_FILE)
        fd = fileio.try_lock_file(lock_path)
        if fd is None:
            raise RunDirectoryError(
                f"--output_dir {self.path!r} is in use by another run (process "
                f"{fileio.lock_holder(lock_path)}); wait for it to finish or use another "
                "--output_dir."
            )
        self._lock_fd = fd

    def _unlock(self):
        fileio.unlock(self._lock_fd)
        self._lock_fd = None

    def _check_config(self):
        stored = stored_config(self.path)
        if stored is not None:
            differences = config_differences(stored, self.config)
            if differences:
                raise RunDirectoryError(
                    f"--output_dir {self.path!r} holds a run with other settings "
                    f"({'; '.join(differences)}); rerun with the same flags to resume it, or "
                    "use a new --output_dir."
                )
            return
        foreign = [name for name in _RUN_OUTPUTS if os.path.exists(os.path.join(self.path, name))]
        if foreign:
            raise RunDirectoryError(
                f"--output_dir {self.path!r} holds outputs ({', '.join(foreign)}) of a run "
                f"without a recorded configuration ({CONFIG_FILE}); use a new --output_dir."
            )
        fileio.write_json(os.path.join(self.path, CONFIG_FILE), self.config)
