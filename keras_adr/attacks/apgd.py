"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and targeted APGD-T.

This module holds the attack loop (`_apgd_run`, one run from a random start)
and the public `apgd` and `apgd_dlr_targeted`, which run it over restarts and
target classes on the examples not yet fooled. The objectives, the step-size
checkpoints, the random start and the argument checks are in
`keras_adr.attacks._apgd_setup`; their names are re-exported here.
"""

import numpy as np
import tensorflow as tf

from keras_adr.attacks._apgd_setup import (
    APGD_LOSSES,  # noqa: F401  (re-exported: public name of this module)
    _apgd_objective,
    _apgd_start,
    _check_num_classes,
    _validate_apgd,
    apgd_checkpoints,
)
from keras_adr.attacks._common import (
    _ascent_direction,
    _per_example,
    _project,
    inference_fn,
)
from keras_adr.attacks._gradient import eot_input_gradient

# Momentum weight alpha of APGD (Croce & Hein 2020, Sec. 3.2).
APGD_MOMENTUM = 0.75
# Default number of target classes of the targeted attack. AutoAttack's
# APGD-T uses 9 (every wrong class of a 10-class problem); 3 keeps a CPU
# evaluation affordable and covers the most likely wrong classes, where the
# decision boundary is usually closest.
APGD_DEFAULT_TARGETS = 3


def _apgd_run(
    model_fn,
    x,
    y,
    target,
    *,
    epsilon,
    steps,
    norm,
    loss,
    targeted,
    rho,
    eot_iterations,
    clip_min,
    clip_max,
    seed,
):
    """One APGD run from a random start on a batch.

    Returns:
        `(x_out, fooled, best_loss)`: per example a misclassified point if
        one was found (`fooled`), else the highest-loss point; and the
        highest loss reached.
    """
    checkpoints = apgd_checkpoints(steps)
    is_checkpoint = np.zeros(steps + 1, bool)
    window = np.ones(steps + 1, np.float32)
    previous = 0
    for w in checkpoints:
        is_checkpoint[w] = True
        window[w] = w - previous
        previous = w
    is_checkpoint = tf.constant(is_checkpoint)
    window = tf.constant(window)

    def evaluate(x_adv):
        # The gradient up to a positive factor per example: APGD uses only
        # its sign (L-inf) or direction (L2).
        logits, values, grad = eot_input_gradient(
            model_fn,
            lambda logits: _apgd_objective(logits, y, target, loss, targeted),
            x_adv,
            eot_iterations,
        )
        wrong = tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
        return values, grad, wrong

    expand = lambda mask: _per_example(mask, x)
    batch = tf.shape(x)[:1]
    x_start = _project(_apgd_start(x, epsilon, norm, seed), x, epsilon, norm, clip_min, clip_max)
    loss_start, grad_start, wrong_start = evaluate(x_start)
    step_size = tf.fill(tf.shape(expand(loss_start)), tf.cast(2.0 * epsilon, x.dtype))

    state = dict(
        t=tf.constant(1),
        x_cur=x_start,
        x_prev=x_start,
        grad=grad_start,
        loss_cur=loss_start,
        step_size=step_size,
        x_best=x_start,
        loss_best=loss_start,
        grad_best=grad_start,
        x_fooled=x_start,
        fooled=wrong_start,
        increases=tf.zeros(batch, tf.float32),
        loss_best_checkpoint=loss_start,
        halved_last_checkpoint=tf.zeros(batch, tf.bool),
    )

    def cond(s):
        # Stops early once every example of the batch is misclassified.
        return tf.logical_and(s["t"] <= steps, tf.logical_not(tf.reduce_all(s["fooled"])))

    def body(s):
        x_cur = s["x_cur"]
        # No momentum on the first step (x_1 = P(x_0 + eta * grad)).
        alpha = tf.where(
            s["t"] == 1, tf.constant(1.0, x.dtype), tf.constant(APGD_MOMENTUM, x.dtype)
        )
        z = _project(
            x_cur + s["step_size"] * _ascent_direction(s["grad"], norm),
            x,
            epsilon,
            norm,
            clip_min,
            clip_max,
        )
        x_new = _project(
            x_cur + alpha * (z - x_cur) + (1.0 - alpha) * (x_cur - s["x_prev"]),
            x,
            epsilon,
            norm,
            clip_min,
            clip_max,
        )
        loss_new, grad_new, wrong_new = evaluate(x_new)

        x_fooled = tf.where(expand(wrong_new), x_new, s["x_fooled"])
        fooled = tf.logical_or(s["fooled"], wrong_new)
        increases = s["increases"] + tf.cast(loss_new > s["loss_cur"], tf.float32)
        improved = loss_new > s["loss_best"]
        x_best = tf.where(expand(improved), x_new, s["x_best"])
        grad_best = tf.where(expand(improved), grad_new, s["grad_best"])
        loss_best = tf.where(improved, loss_new, s["loss_best"])

        # Checkpoint: halve the step and restart from the best point when
        # too few steps raised the loss (condition 1), or when neither the
        # step size nor the best loss changed since the last checkpoint
        # (condition 2).
        at_checkpoint = tf.gather(is_checkpoint, s["t"])
        too_few_increases = increases < rho * tf.gather(window, s["t"])
        stalled = tf.logical_and(
            tf.logical_not(s["halved_last_checkpoint"]), loss_best <= s["loss_best_checkpoint"]
        )
        halve = tf.logical_and(at_checkpoint, tf.logical_or(too_few_increases, stalled))
        halve_b = expand(halve)
        return dict(
            t=s["t"] + 1,
            x_cur=tf.where(halve_b, x_best, x_new),
            x_prev=tf.where(halve_b, x_best, x_cur),
            grad=tf.where(halve_b, grad_best, grad_new),
            loss_cur=tf.where(halve, loss_best, loss_new),
            step_size=tf.where(halve_b, s["step_size"] / 2.0, s["step_size"]),
            x_best=x_best,
            loss_best=loss_best,
            grad_best=grad_best,
            x_fooled=x_fooled,
            fooled=fooled,
            increases=tf.where(at_checkpoint, tf.zeros_like(increases), increases),
            loss_best_checkpoint=tf.where(at_checkpoint, loss_best, s["loss_best_checkpoint"]),
            halved_last_checkpoint=tf.where(at_checkpoint, halve, s["halved_last_checkpoint"]),
        )

    (state,) = tf.while_loop(
        lambda s: cond(s), lambda s: (body(s),), (state,), parallel_iterations=1
    )
    x_out = tf.where(expand(state["fooled"]), state["x_fooled"], state["x_best"])
    return x_out, state["fooled"], state["loss_best"]


def apgd(
    model_fn,
    x,
    y,
    *,
    epsilon,
    steps=100,
    norm="linf",
    loss="ce",
    targeted=False,
    num_targets=APGD_DEFAULT_TARGETS,
    restarts=1,
    rho=0.75,
    eot_iterations=1,
    clip_min=0.0,
    clip_max=1.0,
    seed=None,
):
    """Auto-PGD (Croce & Hein 2020): step-size-free PGD with momentum.

    Each run starts at a random point of the ball (uniform for L-inf, on the
    sphere for L2) with the per-example step size `eta = 2 * epsilon`, and
    takes momentum steps (alpha = 0.75) on the loss. At the checkpoints of
    `apgd_checkpoints(steps)` an example's step size is halved, and its
    iterate moved back to its best point, when the loss increased on fewer
    than a fraction `rho` of the steps since the previous checkpoint, or when
    neither its step size nor its best loss changed since then.

    Runs: `restarts` random restarts; with `targeted=True`, `restarts` runs
    for each of `num_targets` target classes: the classes of the 2nd, 3rd,
    ..., (num_targets + 1)-th largest clean logit, i.e. the most likely wrong
    classes of a correctly classified example (AutoAttack's APGD-T uses all
    9 wrong classes of a 10-class problem; the default 3 is cheaper on CPU).
    Examples already misclassified (at `x` or by an earlier run) are not
    attacked again.

    Success is misclassification (`argmax != y`), also for the targeted
    attack. Per example the result is a misclassified point if any run found
    one (or `x` itself if it is misclassified), otherwise the point of
    highest loss over all runs.

    Args:
        model_fn: Callable images -> logits; Keras models run with
            `training=False`.
        x: Float images `[B, ...]` inside `[clip_min, clip_max]`.
        y: Integer labels `[B]`.
        epsilon: Radius of the perturbation ball, > 0.
        steps: Iterations per run, >= 1 (AutoAttack: 100).
        norm: `"linf"` (signed-gradient steps) or `"l2"` (normalised steps).
        loss: `"ce"` (cross-entropy; targeted: minus the CE to the target)
            or `"dlr"` (difference of logits ratio; targeted: the targeted
            DLR loss). DLR needs >= 3 classes, targeted DLR >= 4.
        targeted: Run the targeted variant over `num_targets` target classes.
        num_targets: Number of target classes with `targeted=True`, at most
            the number of classes - 1. Ignored otherwise.
        restarts: Random restarts (per target class when targeted), >= 1.
        rho: Fraction of loss-increasing steps below which the step size is
            halved at a checkpoint, in (0, 1].
        eot_iterations: Calls of `model_fn` per step, >= 1 (Expectation over
            Transformation, for randomized defenses: AutoAttack's rand
            version uses 20). The step follows their average gradient, and
            the loss and the decision are those of the average logits and
            losses. 1 (the default) is plain APGD.
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
        seed: None (stateful random ops, seeded by `tf.random.set_seed`) or
            an integer (Python or scalar tensor) for reproducible stateless
            random starts.

    Returns:
        Adversarial images, same shape and dtype as `x`, inside the ball and
        the pixel range, without gradient.

    Raises:
        ValueError: For an invalid argument, too few classes for the loss,
            or (eagerly) `x` outside `[clip_min, clip_max]`.
    """
    x = _validate_apgd(
        x,
        y,
        epsilon=epsilon,
        steps=steps,
        norm=norm,
        loss=loss,
        targeted=targeted,
        num_targets=num_targets,
        restarts=restarts,
        rho=rho,
        eot_iterations=eot_iterations,
        clip_min=clip_min,
        clip_max=clip_max,
        seed=seed,
    )
    if x.shape[0] == 0:
        return tf.stop_gradient(x)  # Nothing to attack (and some kernels reject empty batches).
    model_fn = inference_fn(model_fn)
    x = tf.stop_gradient(x)
    y = tf.reshape(tf.cast(y, tf.int32), [-1])
    rho = float(rho)

    clean_logits = tf.cast(model_fn(x), tf.float32)
    num_classes = clean_logits.shape[-1]
    _check_num_classes(num_classes, loss, targeted, num_targets)
    num_runs = restarts * (num_targets if targeted else 1)
    ranked = tf.math.top_k(clean_logits, k=tf.shape(clean_logits)[-1]).indices
    if seed is not None:
        seed = tf.cast(seed, tf.int64)

    def run(j, fooled, x_out, best_loss):
        todo = tf.where(tf.logical_not(fooled))[:, 0]

        def attack():
            # Run j attacks target rank 2 + j // restarts (the (j // restarts + 1)-th
            # most likely wrong class for a correctly classified example).
            rank = 1 + j // restarts
            targets = tf.gather(ranked, todo)[:, rank] if targeted else tf.gather(y, todo)
            run_seed = None if seed is None else tf.stack([seed, tf.cast(j, tf.int64)])
            x_run, fooled_run, loss_run = _apgd_run(
                model_fn,
                tf.gather(x, todo),
                tf.gather(y, todo),
                targets,
                epsilon=epsilon,
                steps=steps,
                norm=norm,
                loss=loss,
                targeted=targeted,
                rho=rho,
                eot_iterations=int(eot_iterations),
                clip_min=clip_min,
                clip_max=clip_max,
                seed=run_seed,
            )
            # Keep a run's point if it fools the model, or if it has a higher
            # loss than the earlier runs' (for examples no run fooled yet).
            better = tf.logical_or(fooled_run, loss_run > tf.gather(best_loss, todo))
            keep = tf.where(better)[:, 0]
            index = tf.gather(todo, keep)[:, None]
            return (
                tf.tensor_scatter_nd_update(fooled, index, tf.gather(fooled_run, keep)),
                tf.tensor_scatter_nd_update(x_out, index, tf.gather(x_run, keep)),
                tf.tensor_scatter_nd_update(best_loss, index, tf.gather(loss_run, keep)),
            )

        fooled, x_out, best_loss = tf.cond(
            tf.size(todo) > 0, attack, lambda: (fooled, x_out, best_loss)
        )
        return j + 1, fooled, x_out, best_loss

    clean_wrong = tf.not_equal(tf.argmax(clean_logits, axis=-1, output_type=tf.int32), y)
    best_loss = tf.fill(tf.shape(y), tf.float32.min)
    _, _, x_adv, _ = tf.while_loop(
        lambda j, *_: j < num_runs,
        run,
        (tf.constant(0), clean_wrong, x, best_loss),
        parallel_iterations=1,
    )
    return tf.stop_gradient(_project(x_adv, x, epsilon, norm, clip_min, clip_max))


def apgd_dlr_targeted(
    model_fn,
    x,
    y,
    *,
    epsilon,
    steps=100,
    norm="linf",
    num_targets=APGD_DEFAULT_TARGETS,
    restarts=1,
    rho=0.75,
    eot_iterations=1,
    clip_min=0.0,
    clip_max=1.0,
    seed=None,
):
    """APGD-T: `apgd` with the targeted DLR loss over `num_targets` targets.

    See `apgd` for the arguments. AutoAttack runs it with 9 targets on
    10 classes; the default here is `APGD_DEFAULT_TARGETS` (3).
    """
    return apgd(
        model_fn,
        x,
        y,
        epsilon=epsilon,
        steps=steps,
        norm=norm,
        loss="dlr",
        targeted=True,
        num_targets=num_targets,
        restarts=restarts,
        rho=rho,
        eot_iterations=eot_iterations,
        clip_min=clip_min,
        clip_max=clip_max,
        seed=seed,
    )
