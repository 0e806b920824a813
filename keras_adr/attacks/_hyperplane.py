"""FAB's projections: the smallest step onto a hyperplane inside the pixel box.

FAB (Croce & Hein, ICML 2020) linearises the decision boundary at each
step and projects onto it; the step must stay inside the pixel box, which
turns the projection into a small convex problem per example. Both norms
solve it exactly by sorting the coordinates by where they meet their box
face: the reachable change of `w . x` is piecewise linear and
non-decreasing in the step's size (its L-inf radius, or the multiplier of
the L2 step), so the optimum lies on the segment where it reaches `c`.
"""

import numpy as np
import tensorflow as tf


def _oriented_room(points, w, c, clip_min, clip_max):
    """What both projections start from, with the problem turned so that `c >= 0`.

    Returns:
        `(direction, target, room, weight)`: `[B, 1]` signs of `c`, `[B]`
        `|c|`, `[B, D]` distances from `points` to the box face in the
        direction that raises `w . x`, and `[B, D]` `|w|`.
    """
    direction = tf.where(c < 0, -1.0, 1.0)[:, None]
    w = w * direction
    room = tf.where(w > 0, clip_max - points, tf.where(w < 0, points - clip_min, 0.0))
    return direction, tf.abs(c), room, tf.abs(w)


def project_to_hyperplane_linf(points, w, c, clip_min=0.0, clip_max=1.0):
    """Smallest L-inf step `d` with `w . d = c` that keeps `points + d` in the box.

    Solves, per row, `min ||d||_inf` subject to `w . d = c` and
    `clip_min <= points + d <= clip_max`. For a radius `r` the largest
    reachable `|w . d|` is `F(r) = sum_i |w_i| min(r, room_i)`, where `room_i`
    is the distance from `points_i` to the box face in the direction that
    helps; `F` is piecewise linear and non-decreasing, so the optimal radius
    solves `F(r) = |c|` on the segment found by sorting the rooms, and
    `d_i = sign * min(r, room_i)`. When no step inside the box reaches the
    hyperplane, the step goes as far as the box allows (`r` = largest room).

    Args:
        points: `[B, D]` points inside the box.
        w: `[B, D]` hyperplane normals.
        c: `[B]` required changes of `w . x`.
        clip_min: Lower face of the box.
        clip_max: Upper face of the box.

    Returns:
        `[B, D]` steps.
    """
    direction, target, room, weight = _oriented_room(points, w, c, clip_min, clip_max)
    order = tf.argsort(room, axis=1)
    room_sorted = tf.gather(room, order, batch_dims=1)
    weight_sorted = tf.gather(weight, order, batch_dims=1)
    total = tf.reduce_sum(weight, axis=1, keepdims=True)
    below = tf.cumsum(weight_sorted * room_sorted, axis=1)  # Saturated coordinates.
    remaining = total - tf.cumsum(weight_sorted, axis=1)  # Weight of the unsaturated ones.
    reach = below + room_sorted * remaining  # F at each sorted room.
    k = tf.reduce_sum(tf.cast(reach < target[:, None], tf.int32), axis=1)
    dims = tf.shape(points)[1]
    previous = tf.maximum(k - 1, 0)
    below_prev = tf.where(k > 0, tf.gather(below, previous, batch_dims=1), 0.0)
    remaining_prev = tf.where(k > 0, tf.gather(remaining, previous, batch_dims=1), total[:, 0])
    radius = (target - below_prev) / tf.maximum(remaining_prev, 1e-30)
    radius = tf.where(k >= dims, room_sorted[:, -1], radius)
    radius = tf.maximum(radius, 0.0)
    return tf.sign(w) * direction * tf.minimum(radius[:, None], room)


def project_to_hyperplane_l2(points, w, c, clip_min=0.0, clip_max=1.0):
    """Smallest L2 step `d` with `w . d = c` that keeps `points + d` in the box.

    Solves, per row, `min ||d||_2` subject to `w . d = c` and
    `clip_min <= points + d <= clip_max` (the L2 projection of FAB, Croce &
    Hein 2020). With the sign of `c` folded into `w` (so that `c >= 0`), the
    optimality conditions give `d_i = sign(w_i) min(lam |w_i|, room_i)` for
    one multiplier `lam >= 0`, where `room_i` is the distance from
    `points_i` to the box face in the direction that helps: without the box
    this is `d = c w / ||w||^2`, and each coordinate stops at its face once
    `lam` passes its knee `room_i / |w_i|`. The reachable change
    `G(lam) = sum_i |w_i| min(lam |w_i|, room_i)` is piecewise linear and
    non-decreasing in `lam`, with slope the sum of `w_i^2` over the
    coordinates not yet at a face; the optimal `lam` solves `G(lam) = |c|`
    on the segment found by sorting the knees. When no step inside the box
    reaches the hyperplane, every coordinate with `w_i != 0` goes to its
    face (the box step closest to the hyperplane).

    Args:
        points: `[B, D]` points inside the box.
        w: `[B, D]` hyperplane normals.
        c: `[B]` required changes of `w . x`.
        clip_min: Lower face of the box.
        clip_max: Upper face of the box.

    Returns:
        `[B, D]` steps.
    """
    direction, target, room, weight = _oriented_room(points, w, c, clip_min, clip_max)
    active = weight > 0
    knee = tf.where(active, room / tf.where(active, weight, 1.0), np.float32(np.inf))
    order = tf.argsort(knee, axis=1)
    knee_sorted = tf.gather(knee, order, batch_dims=1)
    weight_sorted = tf.gather(weight, order, batch_dims=1)
    room_sorted = tf.gather(room, order, batch_dims=1)
    below = tf.cumsum(weight_sorted * room_sorted, axis=1)  # Coordinates at their faces.
    # Slope of G after each knee: the squared weights of the coordinates still free
    # (exactly zero after the last active one, so that no inf * 0 arises).
    slope = tf.cumsum(tf.square(weight_sorted), axis=1, exclusive=True, reverse=True)
    reach = below + tf.where(slope > 0, knee_sorted * slope, 0.0)  # G at each knee.
    k = tf.reduce_sum(tf.cast(reach < target[:, None], tf.int32), axis=1)
    dims = tf.shape(points)[1]
    previous = tf.maximum(k - 1, 0)
    below_prev = tf.where(k > 0, tf.gather(below, previous, batch_dims=1), 0.0)
    slope_prev = tf.where(
        k > 0,
        tf.gather(slope, previous, batch_dims=1),
        tf.reduce_sum(tf.square(weight), axis=1),
    )
    lam = tf.maximum((target - below_prev) / tf.maximum(slope_prev, 1e-30), 0.0)
    step = tf.where(active, tf.minimum(lam[:, None] * weight, room), 0.0)
    step = tf.where((k >= dims)[:, None], room, step)  # The box binds: go to the faces.
    return tf.sign(w) * direction * step
