"""Square Attack's proposals: its starting points, windows and `p` schedule.

The building blocks that `keras_adr.attacks.square` draws its candidates from
(Andriushchenko et al., ECCV 2020):

- The schedule of `p`, the fraction of pixels changed per query
  (`square_p_schedule`), and the side of the square window that it gives at
  each iteration (`_window_sides`).
- The L-inf start, vertical stripes of +-epsilon (`_linf_start`), and the L2
  start, a grid of the paper's centre-weighted bumps on the epsilon sphere
  (`_l2_start`, `_eta_profile`).
- The window helpers of the proposals: random corners and signs, the window
  mask, and placing / extracting per-example square patches.

All randomness is stateless, drawn from the keys passed in, so a seed gives
the same proposals eagerly and inside `tf.function`.
"""

import math

import numpy as np
import tensorflow as tf

from keras_adr.attacks._common import _per_example_norm

# AutoAttack's standard version: p_init = 0.8 (with 5,000 queries).
SQUARE_DEFAULT_P_INIT = 0.8
# The piecewise-constant schedule of p, on the scale of 10,000 queries:
# after iteration k (exclusive) p is p_init / divisor.
_SCHEDULE_TICKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_SCHEDULE_SCALE = 10000
# The L2 initialisation tiles the image with squares of side H // 5.
_L2_INIT_TILES = 5
_L2_MIN_SIDE = 3


def square_p_schedule(iteration, queries, p_init=SQUARE_DEFAULT_P_INIT):
    """The fraction `p` of pixels that Square changes at `iteration`.

    The paper's piecewise-constant schedule: `p_init` up to iteration 10,
    then halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
    (divisors 2, 4, ..., 512), with the iteration first rescaled to a budget
    of 10,000 queries (`int(iteration / queries * 10000)`), as AutoAttack
    does, so that a budget of 5,000 queries sweeps the whole schedule.

    Args:
        iteration: The 0-based query index after the initial one.
        queries: The query budget.
        p_init: The initial fraction, in (0, 1].

    Returns:
        A float in (0, p_init].
    """
    it = int(iteration / queries * _SCHEDULE_SCALE)
    halvings = sum(it > tick for tick in _SCHEDULE_TICKS)
    return p_init / 2**halvings


def _window_sides(queries, p_init, height, width, norm):
    """Side of the square window at each of the `queries` iterations."""
    sides = []
    for i in range(queries):
        side = int(round(math.sqrt(square_p_schedule(i, queries, p_init) * height * width)))
        if norm == "linf":
            side = max(side, 1)
        else:
            side = max(side, _L2_MIN_SIDE)
            side += 1 - side % 2  # Odd sides, as the paper's L2 attack.
        sides.append(min(side, height, width))
    return np.asarray(sides, np.int32)


def _eta_profile(side):
    """The paper's L2 bump on a `side` x `side` square (numpy, unit L2 norm).

    Two halves of opposite sign; each half is a sum of nested rectangles
    centred on its middle with weight 1 / (ring + 1)^2.
    """

    def rectangles(rows, cols):
        out = np.zeros((rows, cols))
        centre_r, centre_c = rows // 2, cols // 2
        for ring in range(max(centre_r + 1, centre_c + 1)):
            r0, c0 = max(centre_r - ring, 0), max(centre_c - ring, 0)
            out[r0 : min(centre_r + ring + 1, rows), c0 : min(centre_c + ring + 1, cols)] += (
                1.0 / (ring + 1) ** 2
            )
        return out / np.sqrt(np.sum(out**2))

    profile = np.zeros((side, side))
    profile[: side // 2] = rectangles(side // 2, side) if side // 2 else 0.0
    profile[side // 2 :] = -rectangles(side - side // 2, side)
    return profile / np.sqrt(np.sum(profile**2))


def _window_mask(corner_h, corner_w, side, height, width):
    """`[B, H, W, 1]` float mask of the squares with top-left corners (corner_h, corner_w)."""
    rows = tf.range(height)[None, :]
    cols = tf.range(width)[None, :]
    in_rows = tf.logical_and(rows >= corner_h[:, None], rows < corner_h[:, None] + side)
    in_cols = tf.logical_and(cols >= corner_w[:, None], cols < corner_w[:, None] + side)
    mask = tf.logical_and(in_rows[:, :, None], in_cols[:, None, :])
    return tf.cast(mask[..., None], tf.float32)


def _random_corners(key, batch, side, height, width):
    keys = tf.random.experimental.stateless_split(key, 2)
    corner_h = tf.random.stateless_uniform([batch], keys[0], 0, height - side + 1, tf.int32)
    corner_w = tf.random.stateless_uniform([batch], keys[1], 0, width - side + 1, tf.int32)
    return corner_h, corner_w


def _random_signs(key, shape):
    return tf.where(tf.random.stateless_uniform(shape, key) < 0.5, -1.0, 1.0)


def _linf_start(x, epsilon, key):
    shape = tf.stack([tf.shape(x)[0], 1, tf.shape(x)[2], tf.shape(x)[3]])
    return x + epsilon * _random_signs(key, shape)


def _bump(profile_table, side, max_side):
    """The `side` x `side` eta profile, zero-padded to `[max_side, max_side]`."""
    return tf.gather(profile_table, side)[:max_side, :max_side]


def _place(patch, corner_h, corner_w, side, height, width):
    """Places per-example `[B, side, side, C]` patches at the corners of `[B, H, W, C]` zeros."""
    rows = tf.clip_by_value(tf.range(height)[None, :] - corner_h[:, None], 0, side - 1)
    cols = tf.clip_by_value(tf.range(width)[None, :] - corner_w[:, None], 0, side - 1)
    placed = tf.gather(patch, rows, axis=1, batch_dims=1)
    placed = tf.gather(placed, cols, axis=2, batch_dims=1)
    return placed * _window_mask(corner_h, corner_w, side, height, width)


def _extract(images, corner_h, corner_w, side):
    """The `[B, side, side, C]` windows of `images` at the corners."""
    rows = corner_h[:, None] + tf.range(side)[None, :]
    cols = corner_w[:, None] + tf.range(side)[None, :]
    windows = tf.gather(images, rows, axis=1, batch_dims=1)
    return tf.gather(windows, cols, axis=2, batch_dims=1)


def _l2_start(x, epsilon, key):
    """The paper's L2 start: a grid of signed eta bumps, rescaled to the epsilon sphere."""
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    side = max(height // _L2_INIT_TILES, 1)
    offset = (height - side * _L2_INIT_TILES) // 2
    profile = tf.constant(_eta_profile(side), tf.float32)[None, :, :, None]
    delta = tf.zeros_like(x)
    keys = tf.random.experimental.stateless_split(key, (height // side) * (width // side))
    k = 0
    for i in range(height // side):
        for j in range(width // side):
            top, left = offset + i * side, offset + j * side
            if top + side > height or left + side > width:
                k += 1
                continue
            signs = _random_signs(keys[k], tf.stack([tf.shape(x)[0], 1, 1, channels]))
            patch = profile * signs
            delta += tf.pad(
                patch, [[0, 0], [top, height - top - side], [left, width - left - side], [0, 0]]
            )
            k += 1
    return x + epsilon * delta / _per_example_norm(delta)
