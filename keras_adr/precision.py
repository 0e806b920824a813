"""Mixed precision: which Keras dtype policy a run computes in.

`adr-train --precision` (`pipeline.TrainOptions.precision`) takes one of
`PRECISIONS`:

* `"float32"` (the default of `adr-train`): everything in float32.
* `"mixed_bfloat16"`: layers compute in bfloat16 and keep float32 weights.
  bfloat16 has float32's exponent range, so nothing underflows; it is fast
  only where the hardware multiplies bfloat16 (CPUs with AVX512_BF16 or AMX,
  GPUs of compute capability 8.0 and newer).
* `"mixed_float16"`: layers compute in float16 (GPUs). Keras wraps the
  optimizer in a `LossScaleOptimizer` (the ADR step scales its loss); the
  attacks rescale their gradients themselves (`keras_adr.attacks`).
* `"auto"`: `"mixed_bfloat16"` on CPUs with AMX that oneDNN may use and on
  GPUs of compute capability 8.0 and newer; on CPUs with AVX512_BF16 but no
  AMX, whichever a start-up probe times faster in this process; else
  `"float32"` (`resolve`). Opt-in: bfloat16 training measured no robustness
  cost (`benchmarks/results/precision.md`).

Whatever a model was trained in, `adr-train` and `adr-evaluate` evaluate it
in float32 by default (`with_policy`), and the exported SavedModel computes
in float32: the served model is the one whose robustness was measured.

```python
policy = keras_adr.precision.resolve("auto")
with keras_adr.precision.policy_scope(policy):
    model = keras_adr.ADRModel(keras_adr.models.small_cnn(), config)
```
"""

import contextlib
import functools
import os

import keras
from absl import logging

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
PRECISIONS = ("auto",) + POLICIES
# /proc/cpuinfo flags of CPUs that multiply bfloat16 in hardware (oneDNN's
# avx512_core_bf16 and avx512_core_amx kernels).
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# The CPUs on which `auto` trains in bfloat16: with AMX every measured process
# ran 2.5x float32's speed or more (benchmarks/results/precision_speed_int_keys).
# Without AMX, oneDNN's avx512_core_bf16 kernels ran at 0.7x float32's speed
# (a Xeon with oneDNN capped at them, precision_speed_no_amx) or at 1x-2x
# from process to process (an AMD EPYC, issues 14 and 30): there `auto` asks
# the start-up probe.
AUTO_BFLOAT16_CPU_FLAGS = ("amx_bf16",)
# NVIDIA GPUs multiply bfloat16 from Ampere (compute capability 8.0) on.
BFLOAT16_GPU_CAPABILITY = (8, 0)
CPUINFO = "/proc/cpuinfo"
# `probe_bfloat16_speedup`: below this float32/bfloat16 time ratio the
# process is on a slow bfloat16 path (fast processes measured 2.2x and more).
PROBE_MIN_SPEEDUP = 1.5
# `auto` on a CPU with AVX512_BF16 and no AMX trains in bfloat16 when the probe
# times it this much faster than float32 (a margin over the probe's noise).
AUTO_PROBE_MIN_SPEEDUP = 1.2


@functools.cache
def process_bfloat16_speedup():
    """`probe_bfloat16_speedup()`, measured once per process.

    `auto`'s choice and the speed warnings then read the same measurement.
    """
    return probe_bfloat16_speedup()


def cpu_flags(cpuinfo=CPUINFO):
    """The CPU feature flags of the first processor in `cpuinfo` (Linux).

    Args:
        cpuinfo: Path of a file in the format of `/proc/cpuinfo`.

    Returns:
        A frozenset of flag names (empty if the file is missing or has no
        `flags` line, e.g. on macOS).
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def onednn_off(environ=None):
    """Whether `TF_ENABLE_ONEDNN_OPTS` turns oneDNN (and its bfloat16 CPU kernels) off."""
    environ = os.environ if environ is None else environ
    return environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip() in ("0", "false", "False")


def onednn_may_use_amx(environ=None):
    """False when oneDNN is off or its instruction sets are capped below AMX.

    oneDNN reads the cap from `ONEDNN_MAX_CPU_ISA` (formerly
    `DNNL_MAX_CPU_ISA`): `ALL` (the default) or an instruction set such as
    `AVX512_CORE_BF16` (no AMX) or `AVX512_CORE_AMX`.
    """
    environ = os.environ if environ is None else environ
    if onednn_off(environ):
        return False
    cap = environ.get("ONEDNN_MAX_CPU_ISA", environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return cap in ("", "ALL") or "AMX" in cap


def gpu_compute_capabilities():
    """`[(major, minor), ...]` of the visible GPUs (empty without GPUs)."""
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability", (0, 0))))
    return capabilities


def resolve(
    precision,
    *,
    cpuinfo=CPUINFO,
    gpu_capabilities=None,
    environ=None,
    probe=process_bfloat16_speedup,
):
    """The Keras dtype policy name that `precision` means on this machine.

    `"auto"` is `"mixed_bfloat16"` when every visible GPU has compute
    capability >= 8.0, or when there is no GPU and the CPU has AMX and
    oneDNN may use it (`onednn_may_use_amx`). On a CPU with AVX512_BF16 but
    no AMX, where bfloat16's speed-up did not hold in every process
    (`AUTO_BFLOAT16_CPU_FLAGS`), it is `"mixed_bfloat16"` when `probe`
    times bfloat16 at least `AUTO_PROBE_MIN_SPEEDUP` times faster than
    float32, and `"float32"` otherwise or without a probe. Otherwise
    `"float32"`. Other values are returned as they are.

    Args:
        precision: One of `PRECISIONS`.
        cpuinfo: Where to read the CPU flags (a fake file in tests).
        gpu_capabilities: The GPUs' compute capabilities; None asks
            TensorFlow (`gpu_compute_capabilities`).
        environ: The environment to read oneDNN's settings from; None
            means `os.environ`.
        probe: A callable returning bfloat16's speed-up over float32 in
            this process: by default `process_bfloat16_speedup` (measured
            once per process, about 0.3 s), or a test's fake; None: no
            probe, float32 on CPUs without AMX.

    Returns:
        One of `POLICIES`.

    Raises:
        ValueError: If `precision` is not one of `PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision != "auto":
        return precision
    return auto_choice(
        cpuinfo=cpuinfo, gpu_capabilities=gpu_capabilities, environ=environ, probe=probe
    )[0]


def auto_choice(
    *, cpuinfo=CPUINFO, gpu_capabilities=None, environ=None, probe=process_bfloat16_speedup
):
    """`(policy, reason)`: what `resolve("auto")` picks here, and why (a log line's end).

    Args: as `resolve`. The probe runs only on a CPU with AVX512_BF16 and no
    AMX (and oneDNN on).
    """
    if gpu_capabilities is None:
        gpu_capabilities = gpu_compute_capabilities()
    if gpu_capabilities:
        if all(tuple(c) >= BFLOAT16_GPU_CAPABILITY for c in gpu_capabilities):
            return "mixed_bfloat16", "every GPU has compute capability 8.0 or more"
        return "float32", "a GPU has compute capability below 8.0 (no bfloat16)"
    flags = cpu_flags(cpuinfo)
    if any(flag in flags for flag in AUTO_BFLOAT16_CPU_FLAGS):
        if onednn_may_use_amx(environ):
            return "mixed_bfloat16", "the CPU has AMX"
        return "float32", (
            "the CPU has AMX, but oneDNN is off or capped below it (TF_ENABLE_ONEDNN_OPTS, "
            "ONEDNN_MAX_CPU_ISA)"
        )
    if any(flag in flags for flag in BFLOAT16_CPU_FLAGS):
        without_amx = "the CPU has AVX512_BF16 but no AMX"
        if onednn_off(environ):
            return "float32", f"{without_amx}, and oneDNN is off (TF_ENABLE_ONEDNN_OPTS)"
        if probe is None:
            return "float32", (
                f"{without_amx}, where bfloat16 ran 0.7x-2x float32's speed from process to "
                "process (issues 14, 30), and no start-up probe ran; "
                "--precision=mixed_bfloat16 uses it anyway"
            )
        speedup = probe()
        measured = (
            f"{without_amx}; a start-up probe timed bfloat16 at {speedup:.2f}x float32's speed"
        )
        if speedup >= AUTO_PROBE_MIN_SPEEDUP:
            return "mixed_bfloat16", f"{measured} (at least {AUTO_PROBE_MIN_SPEEDUP}x)"
        return "float32", f"{measured} (below {AUTO_PROBE_MIN_SPEEDUP}x)"
    return "float32", "the CPU has no bfloat16 instructions"


@contextlib.contextmanager
def policy_scope(policy):
    """Sets Keras' global dtype policy to `policy` and restores the previous one on exit.

    Layers take the global policy when they are built, so build the model
    inside the scope; it keeps its policy afterwards (and in its saved config).
    """
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {', '.join(POLICIES)}; got {policy!r}.")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _layers(layer):
    """`layer` and every layer inside it, through Keras' public `layers` attribute."""
    yield layer
    for sublayer in getattr(layer, "layers", None) or ():
        yield from _layers(sublayer)


def compute_dtype(model):
    """The dtype in which the layers of a Keras model compute, e.g. `"bfloat16"`.

    The model's own policy, or the first layer whose policy differs from
    float32 (a model built in float32 may hold mixed-precision layers).
    """
    for layer in _layers(model):
        if layer.compute_dtype != "float32":
            return layer.compute_dtype
    return "float32"


def _replace_policies(config, policy):
    """`config` with every serialised dtype policy replaced by `policy`."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and config.get("module") == "keras":
            return {**config, "config": {**config.get("config", {}), "name": policy}}
        return {
            key: (
                # A mixed policy serialised as a bare name (an InputLayer's
                # "dtype": "float32" is a tensor dtype and stays).
                policy
                if key == "dtype" and value in POLICIES[1:]
                else _replace_policies(value, policy)
            )
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_replace_policies(value, policy) for value in config]
    return config


def with_policy(model, policy="float32"):
    """A copy of a Keras model whose layers compute in `policy`, with the same weights.

    The weights of the mixed policies are float32, so nothing is rounded: a
    model trained in bfloat16 evaluated by its float32 copy is the same
    function computed without bfloat16's rounding. The copy is not compiled.

    Args:
        model: A serialisable Keras model (functional, Sequential, or a
            registered subclass such as `ADRModel`).
        policy: One of `POLICIES`.

    Returns:
        `model` itself if it already computes in `policy`, else a new model.
    """
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {', '.join(POLICIES)}; got {policy!r}.")
    if all(layer.dtype_policy.name == policy for layer in _layers(model)):
        return model
    # The model's classes are registered: their modules defined them.
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    copy = keras.saving.deserialize_keras_object(_replace_policies(config, policy))
    copy.set_weights(model.get_weights())
    return copy


def speed_warnings(policy, *, cpuinfo=CPUINFO, gpu_capabilities=None, environ=None, probe=None):
    """Known reasons why `policy` would run slowly here, as log lines (empty if none).

    Checked: bfloat16 on a CPU without AVX512_BF16 / AMX (emulated, slower
    than float32), bfloat16 with oneDNN switched off (`TF_ENABLE_ONEDNN_OPTS=0`:
    Eigen's bfloat16 kernels), float16 without a GPU (emulated), and a CPU
    busier than its cores (the speed of bfloat16 varied between processes on
    a shared machine, issue 14; run `benchmarks/precision_speed.py`).
    With a `probe` (e.g. `probe_bfloat16_speedup`), bfloat16 on a CPU that
    has bfloat16 instructions is also timed in this process (logged), and a
    speed-up below `PROBE_MIN_SPEEDUP` is a warning.
    """
    environ = os.environ if environ is None else environ
    if gpu_capabilities is None:
        gpu_capabilities = gpu_compute_capabilities()
    warnings = []
    if policy == "mixed_float16" and not gpu_capabilities:
        warnings.append(
            "--precision=mixed_float16 without a GPU: this CPU emulates float16 "
            "(several times slower than float32); use mixed_bfloat16 or float32."
        )
    if policy == "mixed_bfloat16" and not gpu_capabilities:
        flags = cpu_flags(cpuinfo)
        if not any(flag in flags for flag in BFLOAT16_CPU_FLAGS):
            warnings.append(
                "--precision=mixed_bfloat16 on a CPU without AVX512_BF16 or AMX: bfloat16 "
                "is emulated and slower than float32; use --precision=float32."
            )
        elif probe is not None:
            speedup = probe()
            logging.info("bfloat16 probe: a convolution step runs %.2fx float32's speed.", speedup)
            if speedup < PROBE_MIN_SPEEDUP:
                warnings.append(
                    f"This process runs bfloat16 convolutions at only {speedup:.2f}x float32's "
                    "speed (training steps with oneDNN's AMX kernels: 2.5x and more; without "
                    "them 0.7x to 2x, issue 14): use --precision=float32."
                )
        if onednn_off(environ):
            warnings.append(
                "TF_ENABLE_ONEDNN_OPTS=0 turns oneDNN off, and with it TensorFlow's fast "
                "bfloat16 CPU kernels; unset it for --precision=mixed_bfloat16."
            )
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        cores = os.cpu_count() or 1
        if load > cores:
            warnings.append(
                f"Load average {load:.1f} on {cores} cores: bfloat16 step times vary between "
                "processes on a busy CPU; time runs on a quiet machine."
            )
    return warnings


def probe_bfloat16_speedup(repeats=7, timer=None):
    """Float32 time over bfloat16 time of a convolution step, measured in this process.

    Issue 14 saw some processes on a CPU with AVX512_BF16 run bfloat16 at
    float32's speed while others of the same program ran it twice as fast.
    The cause is not found, but the speed is decided per process, so the
    process times what its training step is made of (a 3x3 convolution of a
    batch, forward and both gradients) in both dtypes: about 0.3 s in all.

    Args:
        repeats: Timed calls per dtype after a warm-up call; the median counts.
        timer: A `time.perf_counter`-like callable (a test's fake clock).

    Returns:
        float32's median time divided by bfloat16's.
    """
    import statistics
    import time

    import tensorflow as tf

    timer = timer or time.perf_counter
    images = tf.random.stateless_uniform([32, 28, 28, 32], seed=[0, 0])
    kernel = tf.random.stateless_normal([3, 3, 32, 64], seed=[0, 1])

    def median_seconds(dtype):
        x, w = tf.cast(images, dtype), tf.cast(kernel, dtype)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                loss = tf.reduce_sum(tf.cast(tf.nn.conv2d(x, w, 1, "SAME"), tf.float32))
            return tape.gradient(loss, [x, w])

        step()  # Traces and creates the oneDNN primitives.
        times = []
        for _ in range(repeats):
            started = timer()
            [g.numpy() for g in step()]
            times.append(timer() - started)
        return statistics.median(times)

    float32_seconds = median_seconds(tf.float32)
    return float32_seconds / max(median_seconds(tf.bfloat16), 1e-12)


def log_speed_warnings(policy, *, probe=process_bfloat16_speedup, **kwargs):
    """Logs `speed_warnings(policy, probe=probe)` as warnings; returns them."""
    warnings = speed_warnings(policy, probe=probe, **kwargs)
    for warning in warnings:
        logging.warning("%s", warning)
    return warnings
