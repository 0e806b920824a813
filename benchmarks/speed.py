"""Training-step, attack and loss-term speed of keras-adr on this machine.

Sections 1-4 are measured in one process with alternating runs (every
variant runs once per round, in an order that rotates from round to round),
so machine noise hits every variant alike; the numbers are medians.
Section 5 (precision) runs every measurement in its own process.

1. Training step (`model.train_function`, the compiled Keras `train_step`) on
   `small_cnn`, batch 128, `--attack_steps` PGD steps, for each defense;
   images per second and the ratio of the step time to `pgd_at`'s.
2. Attack throughput: our PGD-20 (`keras_adr.attacks.pgd` inside
   `tf.function`) against the same attack (L-inf, epsilon 0.1, step
   2.5 * epsilon / 20, one uniform random start, cross-entropy) in IBM ART,
   foolbox and CleverHans (TF2 `projected_gradient_descent`, eager as
   documented, and wrapped in `tf.function`), on the same Keras model and
   batch. A peer that is not installed is skipped. These are optional
   benchmark extras, never dependencies of the library.
3. CPU speed-up experiments on the training step (the library is unchanged):
   XLA (`model.compile(jit_compile=True)`), and one fused forward pass over
   `concat([x, x_adv])` instead of two (a local subclass below; only valid
   without BatchNorm, whose batch statistics would mix clean and adversarial
   examples). Mixed precision is section 5.
4. Forward + backward time of the global compactness term, exact sorted form
   versus the naive `[B, B, k]` tensor.
5. Training step per precision (`--precisions`, by default
   `benchmarks.precision_speed.DEFAULT_POLICIES`: float32 and mixed_bfloat16)
   for `--precision_defenses` (`pgd_at`, `adr_pgd`), `--precision_processes`
   processes per (defense, precision), one new process per run, the runs
   interleaved round by round: the per-process timing of
   `benchmarks/precision_speed.py` (imported, not copied; issue 14 found
   that whether bfloat16 is fast is decided per process, so one process
   would tell nothing). Reported per (defense, precision): median, min and
   max over processes of the per-process median step time; the speed-up
   over float32 per defense; `adr_pgd` / `pgd_at` per precision; issue 14's
   targets (every mixed_bfloat16 process at least 1.7x faster than
   float32's median, for both defenses; `adr_pgd` <= 1.05 x `pgd_at` in each
   precision) marked met or not; and each process's oneDNN kernels.

Training steps run on real Fashion-MNIST batches, and every training
variant is timed over `--instances` separately built models: on this
machine two identical models can differ by ~15% in step time, which one
instance per variant would report as a difference between defenses.

Usage (from the repository root; nothing else heavy should run meanwhile;
about 10 minutes on a 2-core CPU for sections 1-4, plus up to about a
minute per process of section 5: 2 precisions x 2 defenses x 8 processes =
32 processes; `python benchmarks/speed.py` works too):
    nice -n 10 python -m benchmarks.speed --repeats=10 --attack_repeats=7 \\
        --steps_per_sample=2 --instances=4 --xla_repeats=3 \\
        --precisions=float32,mixed_bfloat16 --precision_processes=8 \\
        --output=benchmarks/results/speed_cpu.json
    python -m benchmarks.speed --render_only=benchmarks/results/speed_cpu.json
    python -m benchmarks.speed --sections=precision --output=/tmp/precision.json
"""

import dataclasses
import json
import os
import sys

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

if not __package__:  # `python benchmarks/speed.py`: import as `python -m` would.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import keras

import keras_adr
from benchmarks import precision_speed, precision_speed_report, results_io, step_timing  # noqa: E402
from keras_adr import attacks, data, losses, presets
from keras_adr import config as config_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
flags.DEFINE_integer("repeats", 10, "Timed rounds (each runs every variant once).")
flags.DEFINE_integer("steps_per_sample", 2, "Training steps per timed sample.")
flags.DEFINE_integer("instances", 4, "Separately built models per training variant.")
flags.DEFINE_integer("xla_repeats", 3, "Timed rounds of the (slow) XLA variants.")
flags.DEFINE_list(
    "defenses", ["standard", "pgd_at", "trades", "adr_pgd", "adr_trades"], "Defenses to time."
)
flags.DEFINE_list(
    "experiments",
    ["pgd_at", "adr_pgd"],
    "Defenses to time with XLA and with the fused forward pass.",
)
flags.DEFINE_integer("attack_repeats", 7, "Timed rounds of the attack comparison.")
flags.DEFINE_float("attack_epsilon", 0.1, "L-inf epsilon of the attack comparison.")
flags.DEFINE_integer("attack_iterations", 20, "PGD steps of the attack comparison.")
flags.DEFINE_string(
    "attack_model",
    os.path.join(_REPO, "runs", "benchmarks", "cpu", "pgd_at", "best.keras"),
    "A trained .keras small_cnn for the attack comparison (so that the attacks' "
    "success rates can be compared); a fresh small_cnn if it does not exist.",
)
flags.DEFINE_list(
    "precisions",
    list(precision_speed.DEFAULT_POLICIES),
    "Keras dtype policies of the precision section.",
)
flags.DEFINE_list(
    "precision_defenses",
    list(precision_speed.DEFAULT_DEFENSES),
    "Defenses of the precision section.",
)
flags.DEFINE_integer(
    "precision_processes",
    precision_speed.DEFAULT_PROCESSES,
    "Processes (one run each) per (defense, precision) in the precision section.",
)
flags.DEFINE_integer(
    "precision_steps",
    precision_speed.Settings.steps,
    "Timed training steps per process in the precision section.",
)
flags.DEFINE_integer(
    "precision_warmup",
    precision_speed.Settings.warmup,
    "Untimed steps per process first in the precision section.",
)
flags.DEFINE_string(
    "precision_rows_dir",
    None,
    "Optional: write the precision section's rows there as they finish and take "
    "finished ones from there (a rerun resumes; only for the same settings).",
)
flags.DEFINE_list(
    "sections", ["train", "attacks", "experiments", "terms", "precision"], "What to measure."
)
flags.DEFINE_string("output", None, "JSON file for the results (a .md is written beside it).")
flags.DEFINE_string(
    "render_only",
    None,
    "Measure nothing: rewrite the .md (and the derived keys) of this results JSON.",
)


# --- Helpers -------------------------------------------------------------------


def machine_info():
    _, cpu_flags = results_io.cpu_info()
    return results_io.machine_info(
        cpu_flags=[
            f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in cpu_flags
        ],
        niceness=os.nice(0),
        load_average_at_start=[round(v, 2) for v in os.getloadavg()],
    )


def _batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(batch_size, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    return x, y


# --- 1 and 3: training steps ---------------------------------------------------


class FusedADRModel(keras_adr.ADRModel):
    """ADRModel with one training-mode forward pass over `concat([x, x_adv])`.

    An experiment, not a library feature: identical to `ADRModel` for models
    without BatchNorm (or other batch-coupled layers); with BatchNorm the
    batch statistics would mix clean and adversarial examples. It overrides
    the public hook `ADRMixin.clean_and_adversarial_outputs`.
    """

    def clean_and_adversarial_outputs(self, x, x_adv, training=True):
        if x_adv is None:
            return super().clean_and_adversarial_outputs(x, x_adv, training)
        logits, z = self(tf.concat([x, x_adv], axis=0), training=training, return_latent=True)
        n = tf.shape(x)[0]
        return (logits[:n], z[:n]), (logits[n:], z[n:])


def _train_model(defense, attack_steps, *, jit_compile=False, fused=False, seed=0):
    keras.utils.set_random_seed(seed)
    cls = FusedADRModel if fused else keras_adr.ADRModel
    model = cls(keras_adr.models.small_cnn(), presets.get(defense, attack_steps=attack_steps))
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=jit_compile)
    return model


def check_fused_loss(defense, batch_size, attack_steps):
    """The fused pass gives the same loss and gradients as the library (same x_adv)."""
    x, y = _batch(batch_size, seed=3)
    plain = _train_model(defense, attack_steps)
    fused = _train_model(defense, attack_steps, fused=True)
    fused.set_weights(plain.get_weights())
    x_adv = plain.adversarial_examples(tf.constant(x), tf.constant(y))
    results = []
    for model in (plain, fused):
        with tf.GradientTape() as tape:
            loss = model.compute_adr_loss(tf.constant(x), tf.constant(y), x_adv)[0]
        results.append((float(loss), tape.gradient(loss, model.trainable_variables)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    grad_diff = max(
        float(tf.reduce_max(tf.abs(a - b)) / (tf.reduce_max(tf.abs(a)) + 1e-12))
        for a, b in zip(grads_a, grads_b)
    )
    return {
        "loss_library": loss_a,
        "loss_fused": loss_b,
        "loss_relative_difference": abs(loss_a - loss_b) / abs(loss_a),
        "max_relative_gradient_difference": grad_diff,
    }


def measure_training(batch_size, attack_steps, defenses, repeats, steps_per_sample, instances):
    variants = {d: dict(defense=d, attack_steps=attack_steps) for d in defenses}
    functions = step_timing.train_functions(variants, _train_model, batch_size, instances)
    seconds, samples = step_timing.alternate(
        functions, repeats, lambda fn: step_timing.run_steps(fn, steps_per_sample)
    )
    seconds = {k: v / steps_per_sample for k, v in seconds.items()}
    baseline = seconds.get("pgd_at")
    return {
        "instances": instances,
        "train_step_seconds": seconds,
        "images_per_second": {k: batch_size / v for k, v in seconds.items()},
        "step_time_ratio_to_pgd_at": (
            {k: v / baseline for k, v in seconds.items()} if baseline else None
        ),
        "instance_median_step_seconds": {
            k: [float(np.median(ts)) / steps_per_sample for ts in v] for k, v in samples.items()
        },
        "samples_seconds": samples,
    }


def _time_variants(variants, batch_size, repeats, steps_per_sample, instances):
    functions, errors = {}, {}
    for name, kwargs in variants.items():
        try:
            functions.update(
                step_timing.train_functions({name: kwargs}, _train_model, batch_size, instances)
            )
        except Exception as e:  # noqa: BLE001 - report what does not compile
            logging.exception("variant %s failed", name)
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    seconds, samples = step_timing.alternate(
        functions, repeats, lambda fn: step_timing.run_steps(fn, steps_per_sample)
    )
    return {k: v / steps_per_sample for k, v in seconds.items()}, samples, errors


def measure_experiments(
    batch_size, attack_steps, defenses, repeats, steps_per_sample, instances, xla_repeats
):
    """Fused forward pass (several instances, `repeats` rounds) and XLA (one instance
    per variant, `xla_repeats` rounds: on this CPU an XLA step is ~10x slower)."""
    seconds, samples, errors = {}, {}, {}
    for suffix, extra, count, rounds in (
        ("+fused", dict(fused=True), instances, repeats),
        ("+xla", dict(jit_compile=True), 1, xla_repeats),
    ):
        variants = {}
        for d in defenses:
            variants[d] = dict(defense=d, attack_steps=attack_steps)
            variants[d + suffix] = dict(defense=d, attack_steps=attack_steps, **extra)
        sec, smp, err = _time_variants(variants, batch_size, rounds, steps_per_sample, count)
        group = suffix.strip("+")
        seconds[group], samples[group] = sec, smp
        errors.update(err)
    speedups = {}
    for sec in seconds.values():
        for name, value in sec.items():
            base = name.split("+")[0]
            if name != base and base in sec:
                speedups[name] = sec[base] / value
    return {
        "instances": {"fused": instances, "xla": 1},
        "rounds": {"fused": repeats, "xla": xla_repeats},
        "train_step_seconds": seconds,
        "speedup_vs_library_step": speedups,
        "errors": errors,
        "fused_equivalence": {d: check_fused_loss(d, batch_size, attack_steps) for d in defenses},
        "samples_seconds": samples,
    }


# --- 2: attack throughput --------------------------------------------------------


def _attack_model_and_batch(batch_size):
    path = FLAGS.attack_model
    if path and os.path.exists(path):
        model = keras.models.load_model(path, compile=False)
        backbone = getattr(model, "backbone", model)
        source = os.path.relpath(path, _REPO)
    else:
        keras.utils.set_random_seed(0)
        backbone = keras_adr.models.small_cnn()
        source = "untrained small_cnn (seed 0)"
    x, y = next(iter(data.load("fashion_mnist", "test", batch_size=batch_size)))
    return backbone, x.numpy(), y.numpy().astype(np.int32), source


def _accuracy(backbone, x_adv, y):
    logits = backbone(tf.constant(np.asarray(x_adv, np.float32)), training=False)
    return float(np.mean(np.argmax(logits, -1) == y))


def _attack_functions(backbone, x, y, epsilon, steps):
    """`{library: callable() -> x_adv}` for every installed implementation."""
    step_size = config_lib.pgd_step_size(epsilon, steps)
    functions, skipped, versions = {}, {}, {}
    x_tf, y_tf = tf.constant(x), tf.constant(y)

    ours = tf.function(
        lambda images, labels: attacks.pgd(
            backbone,
            images,
            labels,
            epsilon=epsilon,
            step_size=step_size,
            steps=steps,
            random_start=True,
        )
    )
    functions["keras_adr"] = lambda: ours(x_tf, y_tf)
    versions["keras_adr"] = "this repository"

    try:
        import art
        from art.attacks.evasion import ProjectedGradientDescent
        from art.estimators.classification import TensorFlowV2Classifier

        classifier = TensorFlowV2Classifier(
            model=backbone,
            nb_classes=10,
            input_shape=x.shape[1:],
            clip_values=(0.0, 1.0),
            loss_object=keras.losses.CategoricalCrossentropy(from_logits=True),
        )
        art_attack = ProjectedGradientDescent(
            classifier,
            norm=np.inf,
            eps=epsilon,
            eps_step=step_size,
            max_iter=steps,
            num_random_init=1,
            batch_size=len(x),
            verbose=False,
        )
        one_hot = np.eye(10, dtype=np.float32)[y]
        functions["art"] = lambda: art_attack.generate(x=x, y=one_hot)
        versions["art"] = art.__version__
    except ImportError as e:
        skipped["art"] = f"not installed ({e})"

    try:
        # eagerpy (foolbox's tensor layer) calls np.find_common_type, removed
        # in NumPy 2: give it back, inside this benchmark only.
        if not hasattr(np, "find_common_type"):
            np.find_common_type = lambda array_types, scalar_types: np.result_type(
                *array_types, *scalar_types
            )
        import foolbox

        fmodel = foolbox.TensorFlowModel(backbone, bounds=(0.0, 1.0))
        fb_attack = foolbox.attacks.LinfPGD(abs_stepsize=step_size, steps=steps, random_start=True)
        functions["foolbox"] = lambda: fb_attack(fmodel, x_tf, y_tf, epsilons=epsilon)[1]
        versions["foolbox"] = foolbox.__version__
    except ImportError as e:
        skipped["foolbox"] = f"not installed ({e})"

    try:
        import cleverhans
        from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

        model_fn = lambda images: backbone(images, training=False)
        ch = lambda images, labels: projected_gradient_descent(
            model_fn,
            images,
            epsilon,
            step_size,
            steps,
            np.inf,
            clip_min=0.0,
            clip_max=1.0,
            y=labels,
            rand_init=True,
            sanity_checks=False,
        )
        functions["cleverhans"] = lambda: ch(x_tf, y_tf)
        ch_compiled = tf.function(ch)
        functions["cleverhans+tf.function"] = lambda: ch_compiled(x_tf, y_tf)
        versions["cleverhans"] = getattr(cleverhans, "__version__", "4.0.0")
    except ImportError as e:
        skipped["cleverhans"] = f"not installed ({e})"
    return functions, skipped, versions, step_size


def measure_attacks(batch_size, epsilon, steps, repeats):
    backbone, x, y, source = _attack_model_and_batch(batch_size)
    functions, skipped, versions, step_size = _attack_functions(backbone, x, y, epsilon, steps)
    accuracy, working = {}, {}
    for name, fn in functions.items():
        try:
            x_adv = np.asarray(fn())  # trace / warm up, and check the result
            delta = float(np.max(np.abs(x_adv - x)))
            if delta > epsilon + 1e-5 or x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
                raise ValueError(
                    f"result outside the epsilon-ball or [0, 1] (max |delta| {delta:.4g})"
                )
            accuracy[name] = _accuracy(backbone, x_adv, y)
            working[name] = fn
        except Exception as e:  # noqa: BLE001 - a broken peer is reported, not fatal
            logging.exception("attack %s failed", name)
            skipped[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    seconds, samples = step_timing.alternate(working, repeats, lambda fn: np.asarray(fn()))
    ours = seconds["keras_adr"]
    return {
        "model": source,
        "batch_size": batch_size,
        "epsilon": epsilon,
        "steps": steps,
        "step_size": step_size,
        "clean_accuracy": _accuracy(backbone, x, y),
        "adversarial_accuracy": accuracy,
        "seconds_per_batch": seconds,
        "images_per_second": {k: batch_size / v for k, v in seconds.items()},
        "our_speedup": {k: v / ours for k, v in seconds.items()},
        "versions": versions,
        "skipped": skipped,
        "samples_seconds": samples,
    }


# --- 4: global compactness ------------------------------------------------------


def _global_compactness_functions(batch_size, features=1024, classes=10):
    rng = np.random.default_rng(1)
    y = tf.constant(rng.integers(0, classes, batch_size).astype(np.int32))
    z = tf.constant(np.maximum(rng.normal(size=(batch_size, features)), 0).astype(np.float32))
    z_adv = tf.constant(np.maximum(rng.normal(size=(batch_size, features)), 0).astype(np.float32))
    functions = {}
    for method in ("sorted", "naive"):

        @tf.function
        def step(z_adv, method=method):
            with tf.GradientTape() as tape:
                tape.watch(z_adv)
                # The paper's raw codes, as the published timings measured.
                value = losses.global_compactness(y, z, z_adv, method=method, normalization="none")
            return value, tape.gradient(value, z_adv)

        step(z_adv)
        functions[method] = (step, z_adv)
    return functions


# --- 5: precision, one process per run ---------------------------------------------


def measure_precision(policies, defenses, processes, settings, rows_dir=None):
    """`benchmarks.precision_speed`'s per-process timing of every (defense, policy)."""
    rows = precision_speed.run_rounds(
        policies, defenses, processes, settings, rows_dir=rows_dir, log=logging.info
    )
    return {
        "policies": list(policies),
        "defenses": list(defenses),
        "processes_per_configuration": processes,
        "settings": dataclasses.asdict(settings),
        "analysis": precision_speed_report.analyse(rows),
        "rows": rows,
    }


# --- Report -----------------------------------------------------------------------

_TERMS = "global_compactness_fwd_bwd_ms"


def _derive(results):
    """Adds ratios of the fastest and slowest instance of each defense to pgd_at's.

    Instances of one model fall into a fast and a slow group here (see the
    module docstring); the median over all samples then depends on how many
    fast instances a variant drew. Comparing fastest with fastest and slowest
    with slowest instance removes that draw. Also recomputes the precision
    section's analysis from its rows.
    """
    precision = results.get("precision")
    if precision and precision.get("rows"):  # `--render_only` applies the current analysis
        precision["analysis"] = precision_speed_report.analyse(precision["rows"])
    train = results.get("train")
    if not train or "pgd_at" not in train.get("instance_median_step_seconds", {}):
        return results
    per = train["instance_median_step_seconds"]
    for key, pick in (("fastest_instance", min), ("slowest_instance", max)):
        base = pick(per["pgd_at"])
        train[f"{key}_ratio_to_pgd_at"] = {k: pick(v) / base for k, v in per.items()}
    return results


def markdown(results):
    m = results["machine"]
    lines = [
        "# Speed benchmark (CPU)",
        "",
        f"- Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cpus']} CPUs, "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, NumPy {m['numpy']}; load "
        f"average {m['load_average_at_start']} at start, "
        f"{results.get('load_average_at_end')} at end (a shared machine).",
    ]
    if any(k in results for k in ("train", "attacks", "experiments", _TERMS)):
        lines.append(
            "- Medians of alternating rounds in one process, in rotating order: "
            f"training steps: {results['instances']} separately built models per variant x "
            f"{results['repeats']} rounds x {results['steps_per_sample']} steps (instances "
            "of one model differ by up to ~15% here); attacks: "
            f"{results.get('attack_repeats')} rounds. Training batches: real Fashion-MNIST."
        )
    lines.append("")
    train = results.get("train")
    if train:
        lines += [
            f"## Training step: small_cnn, batch {results['batch_size']}, PGD-"
            f"{results['attack_steps']} (TRADES: KL attack, 10 steps)",
            "",
        ]
        fmt = lambda table, name: "-" if not table else f"{table[name]:.3f}"
        lines += results_io.markdown_table(
            [
                "defense",
                "s / step",
                "images / s",
                "step time / pgd_at",
                "fastest instance / pgd_at's",
                "slowest instance / pgd_at's",
                "per-instance medians (s)",
            ],
            [
                [
                    name,
                    f"{s:.3f}",
                    f"{train['images_per_second'][name]:.0f}",
                    fmt(train["step_time_ratio_to_pgd_at"], name),
                    fmt(train.get("fastest_instance_ratio_to_pgd_at"), name),
                    fmt(train.get("slowest_instance_ratio_to_pgd_at"), name),
                    ", ".join(f"{v:.3f}" for v in train["instance_median_step_seconds"][name]),
                ]
                for name, s in train["train_step_seconds"].items()
            ],
            align="lrrrrrl",
        )
        lines += [
            "",
            "s / step and images / s: median over all instances and rounds. Separately "
            "built instances of the same model fall into a fast and a slow group (about "
            "15% apart, see the per-instance medians), so the ratios of the fastest and of "
            "the slowest instances are shown too.",
        ]
        lines.append("")
    precision = results.get("precision")
    if precision:
        settings = precision["settings"]
        lines += [
            f"## Training step per precision: small_cnn, batch {settings['batch_size']}, PGD-"
            f"{settings['attack_steps']}, one process per run",
            "",
            "Processes per (defense, precision): "
            f"{precision['processes_per_configuration']}, one new process per run, the "
            "runs interleaved round by round; each builds the model in the policy, then "
            f"runs untimed warm-up steps ({settings['warmup']}) and timed steps "
            f"({settings['steps']}) on real Fashion-MNIST batches (the timing of "
            "`benchmarks/precision_speed.py`).",
            "",
            *precision_speed_report.markdown_lines(precision["analysis"]),
            "",
            "oneDNN implementations per process (created primitives, reorders left out):",
            "",
            *precision_speed_report.kernel_lines(precision["rows"]),
            "",
        ]
    attack = results.get("attacks")
    if attack:
        lines += [
            f"## PGD-{attack['steps']} throughput: same Keras model "
            f"({attack['model']}), batch {attack['batch_size']}, L-inf epsilon "
            f"{attack['epsilon']:g}, step {attack['step_size']:g}, one random start",
            "",
        ]
        table = [
            [
                name,
                attack["versions"].get(name.split("+")[0], ""),
                f"{s:.3f}",
                f"{attack['images_per_second'][name]:.0f}",
                f"{attack['our_speedup'][name]:.2f}x",
                f"{100 * attack['adversarial_accuracy'][name]:.1f}%",
            ]
            for name, s in attack["seconds_per_batch"].items()
        ]
        table += [
            [name, "", f"skipped: {why}", "", "", ""] for name, why in attack["skipped"].items()
        ]
        lines += results_io.markdown_table(
            [
                "implementation",
                "version",
                "s / batch",
                "images / s",
                "our speed-up",
                "accuracy after attack",
            ],
            table,
            align="llrrrr",
        )
        lines += [
            "",
            f"Clean accuracy of the batch: {100 * attack['clean_accuracy']:.1f}%. "
            "Our speed-up = their time / our time.",
            "",
        ]
    exp = results.get("experiments")
    if exp:
        lines += [
            "## CPU speed-up experiments on the training step",
            "",
            "Each group is timed separately, against the library step in the same "
            f"alternating loop (fused: {exp['instances']['fused']} instances x "
            f"{exp['rounds']['fused']} rounds; XLA: 1 instance x {exp['rounds']['xla']} "
            "rounds).",
            "",
        ]
        table = []
        for group, timings in exp["train_step_seconds"].items():
            for name, s in timings.items():
                speedup = exp["speedup_vs_library_step"].get(name)
                table.append(
                    [
                        group,
                        name,
                        f"{s:.3f}",
                        f"{results['batch_size'] / s:.0f}",
                        "(library step)" if speedup is None else f"{speedup:.2f}x",
                    ]
                )
        table += [["", name, f"failed: {why}", "", ""] for name, why in exp["errors"].items()]
        lines += results_io.markdown_table(
            ["group", "variant", "s / step", "images / s", "speed-up vs library step"],
            table,
            align="llrrr",
        )
        lines += [
            "",
            "`+xla`: `model.compile(jit_compile=True)`; `+fused`: one forward pass "
            "over `concat([x, x_adv])` (valid only without BatchNorm; a local subclass "
            "in this benchmark). Same loss and gradients as the library step: "
            + "; ".join(
                f"{d}: loss rel. diff {v['loss_relative_difference']:.1e}, max "
                f"gradient rel. diff {v['max_relative_gradient_difference']:.1e}"
                for d, v in exp["fused_equivalence"].items()
            )
            + ". XLA drops the attacks' pixel-range `tf.debugging` asserts (TF logs "
            '"Ignoring Assert operator"). Mixed precision: '
            + (
                "the training step per precision above (one process per run)."
                if precision
                else "not measured in this run (section `precision`)."
            ),
            "",
        ]
    terms = results.get(_TERMS)
    if terms:
        lines += ["## Global compactness, B = 128, k = 1024, forward + backward", ""]
        lines += results_io.markdown_table(
            ["method", "ms"], [[k, f"{v:.1f}"] for k, v in terms.items()]
        )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.render_only:
        with open(FLAGS.render_only) as f:
            results = _derive(json.load(f))
        results_io.write_results(FLAGS.render_only, results, markdown(results))
        return
    results = {
        "machine": machine_info(),
        "batch_size": FLAGS.batch_size,
        "attack_steps": FLAGS.attack_steps,
        "repeats": FLAGS.repeats,
        "steps_per_sample": FLAGS.steps_per_sample,
        "instances": FLAGS.instances,
        "attack_repeats": FLAGS.attack_repeats,
        "mixed_precision": (
            "measured: see `precision` (one process per run)"
            if "precision" in FLAGS.sections
            else "not measured (section `precision` not run)"
        ),
    }
    if "train" in FLAGS.sections:
        logging.info("timing the training steps")
        results["train"] = measure_training(
            FLAGS.batch_size,
            FLAGS.attack_steps,
            FLAGS.defenses,
            FLAGS.repeats,
            FLAGS.steps_per_sample,
            FLAGS.instances,
        )
        # Backwards-compatible keys of the first version of this benchmark.
        results["train_step_seconds"] = results["train"]["train_step_seconds"]
        results["images_per_second"] = results["train"]["images_per_second"]
        results["ratio_to_pgd_at"] = results["train"]["step_time_ratio_to_pgd_at"]
    if "attacks" in FLAGS.sections:
        logging.info("timing the attacks")
        results["attacks"] = measure_attacks(
            FLAGS.batch_size, FLAGS.attack_epsilon, FLAGS.attack_iterations, FLAGS.attack_repeats
        )
    if "experiments" in FLAGS.sections:
        logging.info("timing the speed-up experiments")
        results["experiments"] = measure_experiments(
            FLAGS.batch_size,
            FLAGS.attack_steps,
            FLAGS.experiments,
            FLAGS.repeats,
            FLAGS.steps_per_sample,
            FLAGS.instances,
            FLAGS.xla_repeats,
        )
    if "terms" in FLAGS.sections:
        terms, _ = step_timing.alternate(
            _global_compactness_functions(FLAGS.batch_size),
            FLAGS.repeats * 3,
            lambda fn: [t.numpy() for t in fn[0](fn[1])],
        )
        results[_TERMS] = {k: 1000 * v for k, v in terms.items()}
    if "precision" in FLAGS.sections:
        logging.info("timing the training step per precision, one process per run")
        results["precision"] = measure_precision(
            FLAGS.precisions,
            FLAGS.precision_defenses,
            FLAGS.precision_processes,
            precision_speed.Settings(
                steps=FLAGS.precision_steps,
                warmup=FLAGS.precision_warmup,
                batch_size=FLAGS.batch_size,
                attack_steps=FLAGS.attack_steps,
            ),
            rows_dir=FLAGS.precision_rows_dir,
        )
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    _derive(results)
    text = markdown(results)
    print(json.dumps({k: v for k, v in results.items()}, indent=2, default=str))
    print(text)
    if FLAGS.output:
        results_io.write_results(FLAGS.output, results, text)


if __name__ == "__main__":
    app.run(main)
