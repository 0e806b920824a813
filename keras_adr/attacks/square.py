"""Square Attack (Andriushchenko et al., ECCV 2020): score-based random search.

Square needs only the model's logits, not its gradients, so it is not fooled
by gradient masking: AutoAttack runs it last, on the points that the
gradient-based attacks left robust.

L-inf: the search starts from vertical stripes (each column and channel of
the image shifted by +-epsilon) and, at each query, sets one random square
window of side `s` (per channel, one random sign) to `x +- epsilon`. The new
point is kept when it lowers the margin loss `z_y - max_{j != y} z_j`, or
misclassifies. The side `s = round(sqrt(p * H * W))` shrinks with the
schedule of `square_p_schedule`. Each example draws its own window and signs.

L2: the search starts from a grid of `eta` bumps (squares of side `H // 5`
with the centre-weighted profile of the paper) scaled to the epsilon sphere;
each query moves the mass of two random windows into the first one, plus a
fresh bump, and rescales the perturbation to the sphere.

Queries go only to the points that are still correctly classified: the
others leave the batch (no model evaluation is spent on them).
"""

import numpy as np
import tensorflow as tf

from keras_adr.attacks._common import (
    _base_seed,
    _check_count,
    _check_seed,
    _compile_if_eager,
    _margin,
    _per_example_norm,
    _validate,
    inference_fn,
)
from keras_adr.attacks._square_proposals import (
    SQUARE_DEFAULT_P_INIT,
    _bump,
    _eta_profile,
    _extract,
    _l2_start,
    _linf_start,
    _place,
    _random_corners,
    _random_signs,
    _window_mask,
    _window_sides,
    square_p_schedule,  # noqa: F401  (re-exported: public name of this module)
)

# AutoAttack's standard version: 5,000 queries, p_init = 0.8
# (`SQUARE_DEFAULT_P_INIT`, with the p schedule in `_square_proposals`).
SQUARE_DEFAULT_QUERIES = 5000


def _square_run(model_fn, x, y, *, epsilon, norm, queries, p_init, clip_min, clip_max, seed):
    """One Square run on a batch of correctly classified examples.

    Returns:
        A dict: `x_adv` (the best point), `margin` (its margin loss),
        `start_margin` (the margin of the starting point) and `queries`
        (model evaluations per example, int32 `[B]`).
    """
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    sides = _window_sides(max(queries - 1, 1), p_init, height, width, norm)
    sides_t = tf.constant(sides)
    batch = tf.shape(x)[0]
    base = tf.stack([seed, tf.constant(0x5C0A2E, tf.int64)])
    start_key, loop_key = tf.unstack(tf.random.experimental.stateless_split(base, 2))
    if norm == "linf":
        x_start = _linf_start(x, epsilon, start_key)
    else:
        x_start = _l2_start(x, epsilon, start_key)
        max_side = int(sides.max())
        profiles = np.zeros((max_side + 1, max_side, max_side), np.float32)
        for s in set(sides.tolist()):
            profiles[s, :s, :s] = _eta_profile(s)
        profiles = tf.constant(profiles)
    x_start = tf.clip_by_value(x_start, clip_min, clip_max)
    margin_start = _margin(model_fn(x_start), y)

    def propose(i, x_orig, x_best, key):
        """New candidates for the examples `x_orig` whose best points are `x_best`."""
        n = tf.shape(x_orig)[0]
        side = tf.gather(sides_t, i)
        keys = tf.random.experimental.stateless_split(key, 4)
        corner_h, corner_w = _random_corners(keys[0], n, side, height, width)
        if norm == "linf":
            mask = _window_mask(corner_h, corner_w, side, height, width)
            signs = _random_signs(keys[1], tf.stack([n, 1, 1, channels]))
            candidate = x_best + mask * (2.0 * epsilon) * signs
            candidate = tf.clip_by_value(candidate, x_orig - epsilon, x_orig + epsilon)
            return tf.clip_by_value(candidate, clip_min, clip_max)
        # L2: a second window whose mass moves into the first one, a fresh
        # bump on the first one, and a rescale to the epsilon sphere.
        corner_h2, corner_w2 = _random_corners(keys[2], n, side, height, width)
        delta = x_best - x_orig
        mask1 = _window_mask(corner_h, corner_w, side, height, width)
        mask2 = _window_mask(corner_h2, corner_w2, side, height, width)
        union = tf.maximum(mask1, mask2)
        norm_image = _per_example_norm(delta)
        norm_union = tf.sqrt(tf.reduce_sum(tf.square(delta * union), axis=[1, 2], keepdims=True))
        window = _extract(delta, corner_h, corner_w, side)
        window_norm = tf.sqrt(tf.reduce_sum(tf.square(window), axis=[1, 2], keepdims=True))
        bump = _bump(profiles, side, side)[None, :, :, None]
        # The paper's bump is split along rows or, with probability 1/2, along columns.
        flip = tf.random.stateless_uniform([n, 1, 1, 1], keys[3]) < 0.5
        bump = tf.where(flip, tf.transpose(bump, [0, 2, 1, 3]), bump)
        signs = _random_signs(keys[1], tf.stack([n, 1, 1, channels]))
        new = bump * signs + window / (window_norm + 1e-12)
        budget = tf.maximum(epsilon**2 - tf.square(norm_image), 0.0) / channels + tf.square(
            norm_union
        )
        new = new / (tf.sqrt(tf.reduce_sum(tf.square(new), axis=[1, 2], keepdims=True)) + 1e-12)
        new = new * tf.sqrt(budget)
        delta = delta * (1.0 - union) + _place(new, corner_h, corner_w, side, height, width)
        delta = epsilon * delta / _per_example_norm(delta)
        return tf.clip_by_value(x_orig + delta, clip_min, clip_max)

    def body(i, x_best, margin, used):
        todo = tf.where(margin > 0)[:, 0]
        key = tf.random.experimental.stateless_fold_in(loop_key, tf.cast(i, tf.int64))
        x_orig = tf.gather(x, todo)
        x_cur = tf.gather(x_best, todo)
        candidate = propose(i, x_orig, x_cur, key)
        margin_new = _margin(model_fn(candidate), tf.gather(y, todo))
        better = margin_new < tf.gather(margin, todo)
        keep = tf.where(better)[:, 0]
        index = tf.gather(todo, keep)[:, None]
        x_best = tf.tensor_scatter_nd_update(x_best, index, tf.gather(candidate, keep))
        margin = tf.tensor_scatter_nd_update(margin, index, tf.gather(margin_new, keep))
        used = tf.tensor_scatter_nd_add(used, todo[:, None], tf.ones_like(todo, tf.int32))
        return i + 1, x_best, margin, used

    def cond(i, x_best, margin, used):
        return tf.logical_and(i < queries - 1, tf.reduce_any(margin > 0))

    _, x_best, margin, used = tf.while_loop(
        cond,
        body,
        (tf.constant(0), x_start, margin_start, tf.ones([batch], tf.int32)),
        parallel_iterations=1,
    )
    return dict(x_adv=x_best, margin=margin, start_margin=margin_start, queries=used)


def _validate_square(x, y, *, epsilon, norm, queries, p_init, restarts, clip_min, clip_max, seed):
    _check_count("queries", queries)
    _check_count("restarts", restarts)
    if (
        isinstance(p_init, bool)
        or not isinstance(p_init, (int, float, np.number))
        or not (0 < p_init <= 1)
    ):
        raise ValueError(f"`p_init` must be a number in (0, 1]; got {p_init!r}.")
    _check_seed(seed)
    if y is None:
        raise ValueError("`y` (integer labels) is required by Square.")
    x = _validate(
        x,
        epsilon=epsilon,
        step_size=epsilon,
        steps=queries,
        norm=norm,
        loss="ce",
        clip_min=clip_min,
        clip_max=clip_max,
    )
    if x.shape.rank != 4 or None in x.shape[1:]:
        raise ValueError(
            f"`x` must be images [batch, height, width, channels] of known size for Square; got "
            f"shape {x.shape}."
        )
    return x


def square_details(
    model_fn,
    x,
    y,
    *,
    epsilon,
    norm="linf",
    queries=SQUARE_DEFAULT_QUERIES,
    p_init=SQUARE_DEFAULT_P_INIT,
    restarts=1,
    clip_min=0.0,
    clip_max=1.0,
    seed=None,
):
    """`square`, also returning the margins and the queries spent per example.

    Returns:
        A dict of tensors: `x_adv` `[B, H, W, C]`; `margin` `[B]`, the margin
        loss `z_y - max_{j != y} z_j` at `x_adv`; `start_margin` `[B]`, at the
        first run's starting point (at `x` for the examples misclassified
        there, which are not attacked); `queries` int32 `[B]`, the model
        evaluations of perturbed points per example (at most
        `restarts * queries`; one clean evaluation comes on top).

    Raises:
        ValueError: As `square`.
    """
    x = _validate_square(
        x,
        y,
        epsilon=epsilon,
        norm=norm,
        queries=queries,
        p_init=p_init,
        restarts=restarts,
        clip_min=clip_min,
        clip_max=clip_max,
        seed=seed,
    )
    model_fn = inference_fn(model_fn)
    epsilon, p_init = float(epsilon), float(p_init)

    def run(x, y, seed):
        x = tf.stop_gradient(tf.cast(x, tf.float32))
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        margin = _margin(model_fn(x), y)
        start_margin = margin
        x_adv = x
        used = tf.zeros_like(y)
        for restart in range(restarts):
            todo = tf.where(margin > 0)[:, 0]

            def attack(todo=todo, restart=restart):
                out = _square_run(
                    model_fn,
                    tf.gather(x, todo),
                    tf.gather(y, todo),
                    epsilon=epsilon,
                    norm=norm,
                    queries=queries,
                    p_init=p_init,
                    clip_min=clip_min,
                    clip_max=clip_max,
                    seed=seed + restart,
                )
                return out["x_adv"], out["margin"], out["start_margin"], out["queries"]

            empty = (
                tf.zeros_like(tf.gather(x, todo)),
                tf.zeros_like(tf.gather(margin, todo)),
                tf.zeros_like(tf.gather(margin, todo)),
                tf.zeros_like(todo, tf.int32),
            )
            x_run, margin_run, start_run, used_run = tf.cond(
                tf.size(todo) > 0, attack, lambda e=empty: e
            )
            index = todo[:, None]
            if restart == 0:
                start_margin = tf.tensor_scatter_nd_update(start_margin, index, start_run)
            better = tf.where(margin_run < tf.gather(margin, todo))[:, 0]
            x_adv = tf.tensor_scatter_nd_update(
                x_adv, tf.gather(index, better), tf.gather(x_run, better)
            )
            margin = tf.tensor_scatter_nd_update(
                margin, tf.gather(index, better), tf.gather(margin_run, better)
            )
            used = tf.tensor_scatter_nd_add(used, index, used_run)
        return x_adv, margin, start_margin, used

    if x.shape[0] == 0:
        empty = tf.zeros([0], tf.float32)
        return dict(
            x_adv=tf.stop_gradient(x),
            margin=empty,
            start_margin=empty,
            queries=tf.zeros([0], tf.int32),
        )
    seed = _base_seed(seed)
    x_adv, margin, start_margin, used = _compile_if_eager(run)(x, y, seed)
    return dict(
        x_adv=tf.stop_gradient(tf.cast(x_adv, x.dtype)),
        margin=margin,
        start_margin=start_margin,
        queries=used,
    )


def square(
    model_fn,
    x,
    y,
    *,
    epsilon,
    norm="linf",
    queries=SQUARE_DEFAULT_QUERIES,
    p_init=SQUARE_DEFAULT_P_INIT,
    restarts=1,
    clip_min=0.0,
    clip_max=1.0,
    seed=None,
):
    """Square Attack (Andriushchenko et al. 2020) on the margin loss.

    Only correctly classified examples are attacked, each until it is
    misclassified or its budget is spent; per example the result is the
    point of lowest margin loss found (a misclassified one if any), or `x`
    itself for an example misclassified at `x` or for which no point
    improved on the clean margin.

    Args:
        model_fn: Callable images -> logits; Keras models run with
            `training=False`. Only its outputs are used (no gradients).
        x: Float images `[B, H, W, C]` inside `[clip_min, clip_max]`.
        y: Integer labels `[B]`.
        epsilon: Radius of the perturbation ball, > 0.
        norm: `"linf"` or `"l2"`.
        queries: Model evaluations per example and run, including the
            starting point, >= 1 (AutoAttack: 5,000).
        p_init: Initial fraction of the pixels in the square window, in
            (0, 1] (AutoAttack: 0.8); see `square_p_schedule`.
        restarts: Runs (from new random starts) on the examples still
            correctly classified, >= 1 (AutoAttack: 1).
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
        seed: None (a fresh random seed) or an integer (Python or scalar
            tensor): the same seed gives the same result.

    Returns:
        Adversarial images, same shape and dtype as `x`, inside the ball and
        the pixel range, without gradient.

    Raises:
        ValueError: For an invalid argument, images that are not
            `[B, H, W, C]`, or (eagerly) `x` outside `[clip_min, clip_max]`.
    """
    return square_details(
        model_fn,
        x,
        y,
        epsilon=epsilon,
        norm=norm,
        queries=queries,
        p_init=p_init,
        restarts=restarts,
        clip_min=clip_min,
        clip_max=clip_max,
        seed=seed,
    )["x_adv"]
