"""Targeted FAB (Croce & Hein, ICML 2020): the Fast Adaptive Boundary attack, FAB-T.

FAB looks for the smallest perturbation that changes the decision. At each
step it linearises the difference of logits `f = z_t - z_y` between a target
class `t` and the label `y` at the current iterate `x_k`, projects both
`x_k` and the clean image `x` onto the hyperplane `f = 0` of that
linearisation (the smallest step in the attack's norm, L-inf or L2, that
reaches it inside the pixel box), and moves to a convex combination of the
two projections, extrapolated by `eta`:

    x_{k+1} = clip((1 - a) (x_k + eta d_k) + a (x + eta d_0)),
    a = min(|d_k| / (|d_k| + |d_0|), alpha_max)   (|.| the attack's norm).

Whenever `x_{k+1}` is misclassified it is recorded (if closer to `x` than the
best so far) and pulled back towards `x`: `x_{k+1} <- x + beta (x_{k+1} - x)`.
The targeted version runs this once per target class: the classes of the
2nd, 3rd, ... largest clean logits (AutoAttack's FAB-T: 9 targets, 100
steps, one run each, alpha_max 0.1, eta 1.05, beta 0.9).

L-inf and L2 are implemented (`project_to_hyperplane_linf`,
`project_to_hyperplane_l2`); AutoAttack's L1 FAB is not.
"""

import numpy as np
import tensorflow as tf

from keras_adr.attacks._common import (
    _base_seed,
    _check_count,
    _check_seed,
    _compile_if_eager,
    _per_example,
    _project,
    _validate,
    inference_fn,
)
from keras_adr.attacks._hyperplane import project_to_hyperplane_l2, project_to_hyperplane_linf

# AutoAttack's standard FAB-T parameters.
FAB_DEFAULT_TARGETS = 9
FAB_DEFAULT_STEPS = 100
FAB_ALPHA_MAX = 0.1
FAB_ETA = 1.05
FAB_BETA = 0.9
# Smallest projection norm in the step weights (avoids 0 / 0).
_FAB_TINY = 1e-8
# A random start (restarts after the first) lies at half the epsilon.
_FAB_START_FRACTION = 0.5


def _linf(t):
    return tf.reduce_max(tf.abs(tf.reshape(t, [tf.shape(t)[0], -1])), axis=1)


def _l2(t):
    return tf.norm(tf.reshape(t, [tf.shape(t)[0], -1]), axis=1)


# Per norm: the projection onto the linearised boundary and the size of a [B, ...] step.
_PROJECTIONS = {"linf": project_to_hyperplane_linf, "l2": project_to_hyperplane_l2}
_SIZES = {"linf": _linf, "l2": _l2}


def _fab_run(
    model_fn, x, y, target, *, norm, steps, alpha_max, eta, beta, clip_min, clip_max, start
):
    """One FAB-T run on a batch towards `target`; returns `(x_best, best_distance)`."""
    project, size = _PROJECTIONS[norm], _SIZES[norm]
    batch = tf.shape(x)[0]
    flat = lambda t: tf.reshape(t, [batch, -1])
    x0 = flat(x)

    def body(i, x_k, x_best, best):
        with tf.GradientTape() as tape:
            tape.watch(x_k)
            logits = tf.cast(model_fn(x_k), tf.float32)
            diff = tf.gather(logits, target, batch_dims=1) - tf.gather(logits, y, batch_dims=1)
            total = tf.reduce_sum(diff)
        grad = flat(tape.gradient(total, x_k, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        xk = flat(x_k)
        # The linearised boundary {v : diff + grad . (v - x_k) = 0}.
        d_k = project(xk, grad, -diff, clip_min, clip_max)
        d_0 = project(x0, grad, -diff - tf.reduce_sum(grad * (x0 - xk), axis=1), clip_min, clip_max)
        a_k = tf.maximum(size(d_k), _FAB_TINY)
        a_0 = tf.maximum(size(d_0), _FAB_TINY)
        alpha = tf.clip_by_value(a_k / (a_k + a_0), 0.0, alpha_max)[:, None]
        x_new = tf.clip_by_value(
            (xk + eta * d_k) * (1.0 - alpha) + (x0 + eta * d_0) * alpha, clip_min, clip_max
        )
        x_new = tf.reshape(x_new, tf.shape(x))
        wrong = tf.not_equal(tf.argmax(model_fn(x_new), axis=-1, output_type=tf.int32), y)
        distance = size(x_new - x)
        closer = tf.logical_and(wrong, distance < best)
        x_best = tf.where(_per_example(closer, x), x_new, x_best)
        best = tf.where(closer, distance, best)
        x_new = tf.where(_per_example(wrong, x), x + beta * (x_new - x), x_new)
        return i + 1, x_new, x_best, best

    best = tf.fill([batch], np.float32(np.inf))
    _, _, x_best, best = tf.while_loop(
        lambda i, *_: i < steps, body, (tf.constant(0), start, x, best), parallel_iterations=1
    )
    return x_best, best


def _check_targets(num_classes, num_targets):
    if num_classes is not None and num_targets > num_classes - 1:
        raise ValueError(
            f"`num_targets` ({num_targets}) must be at most the number of wrong "
            f"classes ({num_classes - 1})."
        )


def _validate_fab(
    x,
    y,
    *,
    epsilon,
    norm,
    steps,
    num_targets,
    restarts,
    alpha_max,
    eta,
    beta,
    clip_min,
    clip_max,
    seed,
):
    if norm not in _PROJECTIONS:
        raise ValueError(f"`norm` must be one of {tuple(_PROJECTIONS)} for FAB; got {norm!r}.")
    _check_count("steps", steps)
    _check_count("num_targets", num_targets)
    _check_count("restarts", restarts)
    for name, value, low, high in (
        ("alpha_max", alpha_max, 0.0, 1.0),
        ("eta", eta, 1.0, 10.0),
        ("beta", beta, 0.0, 1.0),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.number))
            or not (low <= value <= high)
        ):
            raise ValueError(f"`{name}` must be a number in [{low}, {high}]; got {value!r}.")
    _check_seed(seed)
    if y is None:
        raise ValueError("`y` (integer labels) is required by FAB.")
    if epsilon is None:
        epsilon = 0.1 * (clip_max - clip_min)  # Checks the rest; min-norm has no radius.
    return _validate(
        x,
        epsilon=epsilon,
        step_size=epsilon,
        steps=steps,
        norm=norm,
        loss="ce",
        clip_min=clip_min,
        clip_max=clip_max,
    )


def fab_min_norm(
    model_fn,
    x,
    y,
    *,
    epsilon=None,
    num_targets=FAB_DEFAULT_TARGETS,
    steps=FAB_DEFAULT_STEPS,
    restarts=1,
    alpha_max=FAB_ALPHA_MAX,
    eta=FAB_ETA,
    beta=FAB_BETA,
    norm="linf",
    clip_min=0.0,
    clip_max=1.0,
    seed=None,
):
    """Targeted FAB's minimal adversarial perturbations (see the module docstring).

    Args:
        model_fn: Callable images -> logits; Keras models run with
            `training=False`.
        x: Float images `[B, ...]` inside `[clip_min, clip_max]`.
        y: Integer labels `[B]`.
        epsilon: None: every target class runs on every example, and the
            smallest perturbation over all of them is kept. A number > 0: as
            AutoAttack, an example whose perturbation is already within
            `epsilon` is not attacked by the later target classes; also the
            radius of the random starts (restarts after the first).
        num_targets: Target classes, at most the number of classes - 1
            (AutoAttack: 9).
        steps: Iterations per target class and restart (AutoAttack: 100).
        restarts: Runs per target class, >= 1; the first starts at `x`, the
            others at a random point at distance `epsilon / 2` in `norm`
            (AutoAttack's FAB-T: 1).
        alpha_max: Largest weight of the step from `x`, in [0, 1].
        eta: Overshoot of the projections, in [1, 10].
        beta: Backward step towards `x` after a success, in [0, 1].
        norm: `"linf"` or `"l2"`: the norm that FAB minimises.
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
        seed: None or an integer; seeds the random starts.

    Returns:
        A dict: `x_adv` `[B, ...]`, per example the closest misclassified
        point found (`x` itself if `x` is misclassified, or if none was
        found), and `distance` `[B]`, its distance to `x` in `norm` (0 where `x`
        is misclassified, inf where nothing was found).

    Raises:
        ValueError: For an invalid argument, more targets than wrong
            classes, or (eagerly) `x` outside `[clip_min, clip_max]`.
    """
    x = _validate_fab(
        x,
        y,
        epsilon=epsilon,
        norm=norm,
        steps=steps,
        num_targets=num_targets,
        restarts=restarts,
        alpha_max=alpha_max,
        eta=eta,
        beta=beta,
        clip_min=clip_min,
        clip_max=clip_max,
        seed=seed,
    )
    model_fn = inference_fn(model_fn)
    if x.shape[0] == 0:
        return dict(x_adv=tf.stop_gradient(x), distance=tf.zeros([0], tf.float32))
    skip_within = -np.inf if epsilon is None else float(epsilon)
    start_radius = _FAB_START_FRACTION * (1.0 if epsilon is None else float(epsilon))
    params = dict(
        norm=norm,
        steps=steps,
        alpha_max=float(alpha_max),
        eta=float(eta),
        beta=float(beta),
        clip_min=clip_min,
        clip_max=clip_max,
    )

    def run(x, y, seed):
        x = tf.stop_gradient(tf.cast(x, tf.float32))
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        logits = tf.cast(model_fn(x), tf.float32)
        _check_targets(logits.shape[-1], num_targets)
        ranked = tf.math.top_k(logits, k=tf.shape(logits)[-1]).indices
        wrong = tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
        distance = tf.where(wrong, 0.0, np.float32(np.inf))
        x_adv = x
        for rank in range(1, num_targets + 1):
            for restart in range(restarts):
                todo = tf.where(distance > skip_within)[:, 0]
                todo = tf.gather(todo, tf.where(tf.gather(tf.logical_not(wrong), todo))[:, 0])

                def attack(todo=todo, rank=rank, restart=restart):
                    x_run = tf.gather(x, todo)
                    start = x_run
                    if restart > 0:
                        key = tf.stack([seed, tf.cast(rank * 1000 + restart, tf.int64)])
                        if norm == "linf":
                            noise = tf.random.stateless_uniform(tf.shape(x_run), key, -1.0, 1.0)
                        else:  # A uniform direction (AutoAttack's L2 start).
                            noise = tf.random.stateless_normal(tf.shape(x_run), key)
                        noise /= _per_example(tf.maximum(_SIZES[norm](noise), 1e-12), noise)
                        start = tf.clip_by_value(x_run + start_radius * noise, clip_min, clip_max)
                    return _fab_run(
                        model_fn,
                        x_run,
                        tf.gather(y, todo),
                        tf.gather(ranked, todo)[:, rank],
                        start=start,
                        **params,
                    )

                empty = (tf.gather(x, todo), tf.fill(tf.shape(todo), np.float32(np.inf)))
                x_run, d_run = tf.cond(tf.size(todo) > 0, attack, lambda e=empty: e)
                closer = tf.where(d_run < tf.gather(distance, todo))[:, 0]
                index = tf.gather(todo, closer)[:, None]
                x_adv = tf.tensor_scatter_nd_update(x_adv, index, tf.gather(x_run, closer))
                distance = tf.tensor_scatter_nd_update(distance, index, tf.gather(d_run, closer))
        return x_adv, distance

    if tf.executing_eagerly():
        # Checked before tracing, so that the error is not wrapped by tf.function.
        _check_targets(model_fn(x[:1]).shape[-1], num_targets)
    x_adv, distance = _compile_if_eager(run)(x, y, _base_seed(seed))
    return dict(x_adv=tf.stop_gradient(tf.cast(x_adv, x.dtype)), distance=distance)


def fab(
    model_fn,
    x,
    y,
    *,
    epsilon,
    num_targets=FAB_DEFAULT_TARGETS,
    steps=FAB_DEFAULT_STEPS,
    restarts=1,
    alpha_max=FAB_ALPHA_MAX,
    eta=FAB_ETA,
    beta=FAB_BETA,
    norm="linf",
    clip_min=0.0,
    clip_max=1.0,
    seed=None,
):
    """FAB-T as an attack within a radius: AutoAttack's targeted FAB.

    Runs `fab_min_norm` with `epsilon` and returns, per example, the
    misclassified point it found if that lies within `epsilon` of `x`, and
    `x` itself otherwise. See `fab_min_norm` for the arguments
    (`epsilon` > 0 is required here).

    Returns:
        Images, same shape and dtype as `x`, inside the epsilon-ball and the
        pixel range, without gradient.

    Raises:
        ValueError: As `fab_min_norm`.
    """
    if epsilon is None:
        raise ValueError("`epsilon` must be a finite number > 0; got None.")
    out = fab_min_norm(
        model_fn,
        x,
        y,
        epsilon=epsilon,
        num_targets=num_targets,
        steps=steps,
        restarts=restarts,
        alpha_max=alpha_max,
        eta=eta,
        beta=beta,
        norm=norm,
        clip_min=clip_min,
        clip_max=clip_max,
        seed=seed,
    )
    x = tf.convert_to_tensor(x)
    within = out["distance"] <= epsilon
    x_adv = tf.where(_per_example(within, x), out["x_adv"], x)
    # Float rounding must not leave the ball.
    if norm == "linf":
        x_adv = tf.clip_by_value(x_adv, x - epsilon, x + epsilon)
    else:
        x_adv = _project(x_adv, x, epsilon, norm, clip_min, clip_max)
    return tf.stop_gradient(tf.clip_by_value(x_adv, clip_min, clip_max))
