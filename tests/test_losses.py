"""ADR loss terms against independent numpy computations."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_adr import graph, losses, objective

SCALE = 0.99
TOL = dict(rtol=1e-5, atol=1e-6)
# The paper's raw codes; the functions default to the bounded form (RMS-normalised).
PAPER_Z = dict(normalization="none")


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(a):
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def _np_weights(y_rows, y_cols, scale=SCALE):
    return np.where(y_rows[:, None] == y_cols[None, :], 1.0, 1.0 - 1.0 / scale)


@pytest.fixture(params=["mixed", "all_same"])
def batch(request):
    rng = np.random.default_rng(0)
    b, k, c = 9, 6, 4
    y = rng.integers(0, c, b) if request.param == "mixed" else np.full(b, 2)
    z = rng.normal(size=(b, k)).astype(np.float32)
    z_adv = (z + 0.5 * rng.normal(size=(b, k))).astype(np.float32)
    logits = rng.normal(size=(b, c)).astype(np.float32) * 2
    logits_adv = (logits + rng.normal(size=(b, c))).astype(np.float32)
    return dict(y=y, z=z, z_adv=z_adv, logits=logits, logits_adv=logits_adv)


def test_local_compactness(batch):
    z, za = batch["z"].astype(np.float64), batch["z_adv"].astype(np.float64)
    np.testing.assert_allclose(
        losses.local_compactness(batch["z"], batch["z_adv"], **PAPER_Z),
        np.abs(z - za).mean(),
        **TOL,
    )
    np.testing.assert_allclose(
        losses.local_compactness(batch["z"], batch["z_adv"], "l2", **PAPER_Z),
        ((z - za) ** 2).mean(),
        **TOL,
    )


def test_local_compactness_flattens_higher_rank():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
    za = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
    np.testing.assert_allclose(
        losses.local_compactness(z, za, **PAPER_Z), np.abs(z - za).mean(), **TOL
    )


def test_local_smoothness(batch):
    p = _softmax(batch["logits"].astype(np.float64))
    expected = -(p * _log_softmax(batch["logits_adv"].astype(np.float64))).sum(-1).mean()
    np.testing.assert_allclose(
        losses.local_smoothness(batch["logits"], batch["logits_adv"]), expected, **TOL
    )


def test_pair_weights(batch):
    y = batch["y"]
    w = losses.pair_weights(y, scale=SCALE).numpy()
    np.testing.assert_allclose(w, _np_weights(y, y), **TOL)
    assert np.all(np.isfinite(w))
    other = np.arange(len(y))[::-1] % 4
    np.testing.assert_allclose(losses.pair_weights(y, other, SCALE), _np_weights(y, other), **TOL)


@pytest.mark.parametrize("method", ["sorted", "naive"])
def test_global_compactness(batch, method):
    y, z, za = batch["y"], batch["z"].astype(np.float64), batch["z_adv"].astype(np.float64)
    distances = np.abs(za[:, None, :] - z[None, :, :]).mean(-1)  # [i (adv), j (clean)]
    expected = (_np_weights(y, y) * distances).mean()
    value = losses.global_compactness(
        y, batch["z"], batch["z_adv"], SCALE, method=method, **PAPER_Z
    )
    assert np.isfinite(value)
    np.testing.assert_allclose(value, expected, **TOL)


def test_global_compactness_sorted_matches_naive_with_ties_and_reference():
    rng = np.random.default_rng(3)
    # Integer-valued codes make ties between clean and adversarial values common.
    z_ref = rng.integers(0, 3, size=(12, 5)).astype(np.float32)
    y_ref = rng.integers(0, 3, 12)
    z_adv = rng.integers(0, 3, size=(4, 5)).astype(np.float32)
    y = y_ref[:4]
    z_adv_var = tf.Variable(z_adv)
    values, grads = {}, {}
    for method in ("sorted", "naive"):
        with tf.GradientTape() as tape:
            values[method] = losses.global_compactness_per_example(
                y, None, z_adv_var, SCALE, reference=(y_ref, z_ref), method=method, **PAPER_Z
            )
            total = tf.reduce_sum(values[method])
        grads[method] = tape.gradient(total, z_adv_var).numpy()
    distances = np.abs(z_adv[:, None, :].astype(np.float64) - z_ref[None]).mean(-1)
    np.testing.assert_allclose(values["sorted"], (_np_weights(y, y_ref) * distances).mean(1), **TOL)
    np.testing.assert_allclose(values["sorted"], values["naive"], **TOL)
    # At exact ties the L1 subgradient is ambiguous; elsewhere they must agree.
    untied = ~np.any(z_adv[:, None, :] == z_ref[None], axis=1)
    np.testing.assert_allclose(grads["sorted"][untied], grads["naive"][untied], **TOL)


def test_global_compactness_sorted_is_exact_for_codes_outside_the_clean_range():
    # The (label, value) sort keys must keep classes apart whatever the codes:
    # adversarial codes far outside the clean codes' range, on both sides and
    # in every class, still give the exact value and gradient.
    rng = np.random.default_rng(5)
    z_ref = rng.uniform(-1.0, 1.0, size=(10, 6)).astype(np.float32)
    y = np.arange(10) % 3
    z_adv = (z_ref * rng.choice([-50.0, 0.5, 80.0], size=z_ref.shape)).astype(np.float32)
    z_adv_var = tf.Variable(z_adv)
    with tf.GradientTape() as tape:
        value = losses.global_compactness_per_example(y, z_ref, z_adv_var, SCALE, **PAPER_Z)
        total = tf.reduce_sum(value)
    gradient = tape.gradient(total, z_adv_var).numpy()
    weights = _np_weights(y, y)
    differences = z_adv[:, None, :].astype(np.float64) - z_ref[None]  # [i, j, d]
    np.testing.assert_allclose(value, (weights * np.abs(differences).mean(-1)).mean(1), **TOL)
    expected_gradient = (weights[:, :, None] * np.sign(differences)).sum(1) / z_ref.size
    np.testing.assert_allclose(gradient, expected_gradient, **TOL)


def test_global_compactness_sorted_handles_labels_without_references():
    # With a reference set (e.g. gathered across replicas) a query's label can
    # be absent from it: the same-label part is then empty, and the value and
    # gradient are those of the different-label pairs alone.
    rng = np.random.default_rng(11)
    z_ref = rng.normal(size=(9, 7)).astype(np.float32)
    y_ref = np.array([0, 1, 1, 0, 3, 3, 0, 1, 3])
    z_adv = rng.normal(scale=2.0, size=(5, 7)).astype(np.float32)
    y = np.array([2, 0, 4, 3, 2])
    z_adv_var = tf.Variable(z_adv)
    with tf.GradientTape() as tape:
        value = losses.global_compactness_per_example(
            y, None, z_adv_var, SCALE, reference=(y_ref, z_ref), **PAPER_Z
        )
        total = tf.reduce_sum(value)
    gradient = tape.gradient(total, z_adv_var).numpy()
    weights = _np_weights(y, y_ref)
    differences = z_adv[:, None, :].astype(np.float64) - z_ref[None]
    np.testing.assert_allclose(value, (weights * np.abs(differences).mean(-1)).mean(1), **TOL)
    expected_gradient = (weights[:, :, None] * np.sign(differences)).sum(1) / z_ref.size
    np.testing.assert_allclose(gradient, expected_gradient, **TOL)


def test_global_compactness_gradient_matches_numpy(batch):
    y, z, za = batch["y"], batch["z"], batch["z_adv"]
    b, k = z.shape
    # d/dza_i,d of mean_ij W_ij mean_d |z_j,d - za_i,d| = sum_j W_ij sign(za_i,d - z_j,d) / (B B k)
    expected = (_np_weights(y, y)[:, :, None] * np.sign(za[:, None, :] - z[None])).sum(1) / (
        b * b * k
    )
    za_var = tf.Variable(za)
    z_var = tf.Variable(z)
    with tf.GradientTape() as tape:
        value = losses.global_compactness(y, z_var, za_var, SCALE, **PAPER_Z)
    grad_adv, grad_clean = tape.gradient(value, [za_var, z_var])
    np.testing.assert_allclose(grad_adv, expected, rtol=1e-5, atol=1e-7)
    assert grad_clean is None  # the clean side is stop-gradient


def test_global_smoothness(batch):
    y = batch["y"]
    p = _softmax(batch["logits"].astype(np.float64))  # clean, column j
    log_q = _log_softmax(batch["logits_adv"].astype(np.float64))  # adversarial, row i
    ce = -(p[None, :, :] * log_q[:, None, :]).sum(-1)  # [i, j]
    expected = (_np_weights(y, y) * ce).mean()
    value = losses.global_smoothness(
        y, batch["logits"], batch["logits_adv"], SCALE, push="cross_entropy"
    )
    assert np.isfinite(value)
    np.testing.assert_allclose(value, expected, **TOL)


def test_conditional_entropy(batch):
    p = _softmax(batch["logits_adv"].astype(np.float64))
    expected = -(p * np.log(p)).sum(-1).mean()
    np.testing.assert_allclose(losses.conditional_entropy(batch["logits_adv"]), expected, **TOL)


def test_trades_kl(batch):
    lp = _log_softmax(batch["logits"].astype(np.float64))
    lq = _log_softmax(batch["logits_adv"].astype(np.float64))
    expected = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    np.testing.assert_allclose(
        losses.trades_kl(batch["logits"], batch["logits_adv"]), expected, **TOL
    )


@pytest.mark.parametrize("name", ["local_compactness", "global_compactness"])
def test_latent_terms_stop_gradient_on_clean_side(batch, name):
    z, za = tf.Variable(batch["z"]), tf.Variable(batch["z_adv"])
    with tf.GradientTape() as tape:
        if name == "local_compactness":
            value = losses.local_compactness(z, za)
        else:
            value = losses.global_compactness(batch["y"], z, za)
    grad_clean, grad_adv = tape.gradient(value, [z, za])
    assert grad_clean is None
    assert np.abs(grad_adv.numpy()).sum() > 0


@pytest.mark.parametrize("name", ["local_smoothness", "global_smoothness", "label_propagation"])
def test_prediction_terms_stop_gradient_on_clean_side(batch, name):
    logits, logits_adv = tf.Variable(batch["logits"]), tf.Variable(batch["logits_adv"])
    z, za = tf.Variable(batch["z"]), tf.Variable(batch["z_adv"])
    with tf.GradientTape() as tape:
        if name == "local_smoothness":
            value = losses.local_smoothness(logits, logits_adv)
        elif name == "global_smoothness":
            value = losses.global_smoothness(batch["y"], logits, logits_adv)
        else:
            value = losses.label_propagation(batch["y"], z, za, logits_adv, k=3)
    grads = tape.gradient(value, [logits, logits_adv, z, za])
    assert grads[0] is None and grads[2] is None and grads[3] is None
    assert np.abs(grads[1].numpy()).sum() > 0


def test_conditional_entropy_and_trades_kl_gradients_flow(batch):
    logits, logits_adv = tf.Variable(batch["logits"]), tf.Variable(batch["logits_adv"])
    with tf.GradientTape(persistent=True) as tape:
        entropy = losses.conditional_entropy(logits_adv)
        kl = losses.trades_kl(logits, logits_adv)
    assert np.abs(tape.gradient(entropy, logits_adv).numpy()).sum() > 0
    grad_clean, grad_adv = tape.gradient(kl, [logits, logits_adv])
    assert np.abs(grad_clean.numpy()).sum() > 0 and np.abs(grad_adv.numpy()).sum() > 0
    # Independent check of the entropy gradient: d H / d l = -p (log p + H).
    p = _softmax(batch["logits_adv"].astype(np.float64))
    h = -(p * np.log(p)).sum(-1, keepdims=True)
    expected = -p * (np.log(p) + h) / len(p)
    np.testing.assert_allclose(tape.gradient(entropy, logits_adv), expected, rtol=1e-4, atol=1e-6)


def _np_propagation(z, y, z_adv, num_classes, alpha, k):
    nodes = np.concatenate([z, z_adv]).astype(np.float64)
    n = len(nodes)
    d2 = ((nodes[:, None] - nodes[None]) ** 2).sum(-1)
    d = np.sqrt(d2)
    off = d[~np.eye(n, dtype=bool)]
    sigma = np.sort(off)[(off.size - 1) // 2]
    w = np.exp(-d2 / (2 * sigma**2))
    np.fill_diagonal(w, 0)
    knn = np.zeros((n, n), bool)
    for i in range(n):
        order = np.argsort(-w[i] + np.eye(n)[i] * 10, kind="stable")[:k]
        knn[i, order] = True
    w = w * (knn | knn.T)
    deg = w.sum(1)
    s = w / np.sqrt(deg[:, None] * deg[None, :])
    seeds = np.zeros((n, num_classes))
    seeds[np.arange(len(y)), y] = 1
    f = np.linalg.solve(np.eye(n) - alpha * s, seeds)
    f = f / f.sum(1, keepdims=True)
    return f, s, seeds


def test_propagate_labels_matches_numpy(batch):
    f, _, _ = _np_propagation(batch["z"], batch["y"], batch["z_adv"], 4, 0.99, 3)
    q = losses.propagate_labels(batch["z"], batch["y"], batch["z_adv"], 4, alpha=0.99, k=3)
    np.testing.assert_allclose(q, f[len(batch["y"]) :], rtol=1e-4, atol=1e-5)
    expected = (
        -(f[len(batch["y"]) :] * _log_softmax(batch["logits_adv"].astype(np.float64)))
        .sum(-1)
        .mean()
    )
    np.testing.assert_allclose(
        losses.label_propagation(
            batch["y"], batch["z"], batch["z_adv"], batch["logits_adv"], alpha=0.99, k=3
        ),
        expected,
        rtol=1e-4,
    )


def test_label_propagation_two_clusters():
    rng = np.random.default_rng(5)
    centers = np.array([[0.0] * 4, [20.0] * 4])
    y = np.repeat([0, 1], 8)
    z = (centers[y] + rng.normal(size=(16, 4))).astype(np.float32)
    z_adv = (centers[y] + rng.normal(size=(16, 4))).astype(np.float32)
    q = losses.propagate_labels(z, y, z_adv, 2, alpha=0.99, k=5).numpy()
    np.testing.assert_array_equal(q.argmax(1), y)
    assert np.all(q.max(1) > 0.9)


def test_closed_form_matches_iteration(batch):
    # The iteration F <- a S F + (1 - a) Y converges to (1 - a)(I - a S)^-1 Y,
    # equal after row normalisation; alpha 0.9 converges in 200 steps (0.9^200 ~ 7e-10).
    alpha = 0.9
    nodes = np.concatenate([batch["z"], batch["z_adv"]])
    s = graph.normalized_affinity(graph.affinity_graph(nodes, k=3)).numpy().astype(np.float64)
    seeds = np.zeros((len(nodes), 4))
    seeds[np.arange(len(batch["y"])), batch["y"]] = 1
    f = seeds.copy()
    for _ in range(200):
        f = alpha * s @ f + (1 - alpha) * seeds
    f = f / f.sum(1, keepdims=True)
    closed = graph.propagate(tf.constant(s, tf.float32), tf.constant(seeds, tf.float32), alpha)
    np.testing.assert_allclose(closed, f, rtol=1e-4, atol=1e-5)


def test_affinity_graph_is_symmetric_knn_with_zero_diagonal(batch):
    nodes = np.concatenate([batch["z"], batch["z_adv"]])
    w = graph.affinity_graph(nodes, k=3).numpy()
    np.testing.assert_allclose(w, w.T)
    assert np.all(np.diag(w) == 0)
    assert np.all((w > 0).sum(1) >= 3)


def test_loss_classes_match_functions_and_serialize(batch):
    z, za = batch["z"], batch["z_adv"]
    lg, lga = batch["logits"], batch["logits_adv"]
    cases = [
        (losses.LocalCompactness(distance="l2"), (z, za), losses.local_compactness(z, za, "l2")),
        (
            losses.LocalCompactness(normalization="rms"),
            (z, za),
            losses.local_compactness(z, za, normalization="rms"),
        ),
        (losses.LocalSmoothness(), (lg, lga), losses.local_smoothness(lg, lga)),
        (losses.ConditionalEntropy(), (batch["y"], lga), losses.conditional_entropy(lga)),
        (losses.TradesKL(), (lg, lga), losses.trades_kl(lg, lga)),
    ]
    for loss, args, expected in cases:
        np.testing.assert_allclose(loss(*args), expected, rtol=1e-5, err_msg=loss.name)
        clone = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(clone) is type(loss) and clone.get_config() == loss.get_config()
        np.testing.assert_allclose(clone(*args), expected, rtol=1e-5, err_msg=loss.name)


@pytest.mark.parametrize("preset", ["adr_pgd", "adr_pgd_paper"])
def test_terms_of_the_objective_match_the_functional_api(batch, preset):
    """`TERMS[name](ADRBatch, config)`: the one signature the train step uses."""
    from keras_adr import presets

    config = presets.get(
        preset,
        label_propagation=1.0,
        propagation_neighbors=3,
        compactness_distance="l2",
        label_scale=0.9,
    )
    y, z, za = batch["y"], batch["z"], batch["z_adv"]
    lg, lga = batch["logits"], batch["logits_adv"]
    norm, push = config.latent_normalization, config.smoothness_push
    expected = {
        "ce": keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, lg),
        "adv_ce": keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, lga),
        "trades_kl": losses.trades_kl(lg, lga),
        "local_compactness": losses.local_compactness(z, za, "l2", normalization=norm),
        "local_smoothness": losses.local_smoothness(lg, lga),
        "global_compactness": losses.global_compactness(y, z, za, 0.9, normalization=norm),
        "global_smoothness": losses.global_smoothness(y, lg, lga, 0.9, push=push),
        "conditional_entropy": losses.conditional_entropy(lga),
        "label_propagation": losses.label_propagation(y, z, za, lga, alpha=0.99, k=3),
    }
    assert set(objective.TERMS) == set(expected)
    adr_batch = objective.ADRBatch(
        labels=tf.constant(y, tf.int32), logits=lg, z=z, logits_adv=lga, z_adv=za
    )
    for name, term in objective.TERMS.items():
        values = term(adr_batch, config)
        assert values.shape == (len(y),), name
        np.testing.assert_allclose(tf.reduce_mean(values), expected[name], rtol=1e-4, err_msg=name)


def test_pairwise_terms_compare_with_the_reference(batch):
    """A batch that is rows 3..6 of a larger reference gets the reference's values there."""
    from keras_adr import presets

    config = presets.get("adr_pgd", label_propagation=1.0, propagation_neighbors=3)
    y = tf.constant(batch["y"], tf.int32)
    full = objective.ADRBatch(
        labels=y,
        logits=batch["logits"],
        z=batch["z"],
        logits_adv=batch["logits_adv"],
        z_adv=batch["z_adv"],
    )
    rows = slice(3, 7)
    part = objective.ADRBatch(
        *(t[rows] for t in full[:5]), reference=full.resolved_reference._replace(offset=3)
    )
    for name in objective.PAIRWISE_TERMS:
        np.testing.assert_allclose(
            objective.TERMS[name](part, config),
            objective.TERMS[name](full, config)[rows],
            rtol=1e-4,
            atol=1e-6,
            err_msg=name,
        )
    # Without the reference the same rows only see each other: different values.
    alone = objective.TERMS["global_compactness"](part._replace(reference=None), config)
    assert not np.allclose(alone, objective.TERMS["global_compactness"](full, config)[rows])


def test_bad_arguments():
    with pytest.raises(ValueError, match="distance"):
        losses.local_compactness(np.zeros((2, 2)), np.zeros((2, 2)), distance="cosine")
    with pytest.raises(ValueError, match="method"):
        losses.global_compactness([0, 1], np.zeros((2, 2)), np.zeros((2, 2)), method="fast")
    with pytest.raises(ValueError, match="distance"):
        losses.LocalCompactness(distance="l3")


# ---------------------------------------------------------------------------
# The bounded formulation: RMS-normalised codes and the overlap push.
# ---------------------------------------------------------------------------


def _np_rms(z):
    z = z.reshape(len(z), -1).astype(np.float64)
    return z / np.sqrt((z**2).mean(1, keepdims=True) + 1e-6)


def test_rms_normalized_compactness_matches_numpy(batch):
    y, z, za = batch["y"], batch["z"], batch["z_adv"]
    zn, zan = _np_rms(z), _np_rms(za)
    np.testing.assert_allclose(
        losses.local_compactness(z, za, normalization="rms"), np.abs(zn - zan).mean(), **TOL
    )
    np.testing.assert_allclose(
        losses.local_compactness(z, za, "l2", normalization="rms"), ((zn - zan) ** 2).mean(), **TOL
    )
    pairwise = np.abs(zan[:, None, :] - zn[None, :, :]).mean(-1)  # [i, j]
    expected = (_np_weights(y, y) * pairwise).mean()
    for method in ("sorted", "naive"):
        np.testing.assert_allclose(
            losses.global_compactness(y, z, za, SCALE, method=method, normalization="rms"),
            expected,
            **TOL,
        )


def test_overlap_global_smoothness_matches_numpy(batch):
    y, lg, lga = batch["y"], batch["logits"], batch["logits_adv"]
    p = _softmax(lg.astype(np.float64))
    log_q = _log_softmax(lga.astype(np.float64))
    same = y[:, None] == y[None, :]
    ce = -(p[None, :, :] * log_q[:, None, :]).sum(-1)  # [i, j] = CE(p_j, q_i)
    overlap = np.exp(log_q) @ p.T  # [i, j] = <q_i, p_j>
    expected = np.where(same, ce, (1 / SCALE - 1) * overlap).mean()
    np.testing.assert_allclose(
        losses.global_smoothness(y, lg, lga, SCALE, push="overlap"), expected, **TOL
    )
    # With one label only there is nothing to push: the paper's value.
    one = np.zeros_like(y)
    np.testing.assert_allclose(
        losses.global_smoothness(one, lg, lga, push="overlap"),
        losses.global_smoothness(one, lg, lga, push="cross_entropy"),
        **TOL,
    )


def _adr_terms(y, z, za, lg, lga, bounded):
    kw = dict(normalization="rms" if bounded else "none")
    push = "overlap" if bounded else "cross_entropy"
    return {
        "local_compactness": losses.local_compactness(z, za, **kw),
        "global_compactness": losses.global_compactness(y, z, za, SCALE, **kw),
        "local_smoothness": losses.local_smoothness(lg, lga),
        "global_smoothness": losses.global_smoothness(y, lg, lga, SCALE, push=push),
        "conditional_entropy": losses.conditional_entropy(lga),
    }


def test_bounded_objective_cannot_be_lowered_by_scaling_codes_or_logits():
    """Inflating `z` and the logits is how the paper's objective runs away.

    The batch is the state training reaches: codes clustered by class and
    predictions correct. Scaled up, its paper objective falls linearly
    (different-label distances and cross-entropies carry negative weights);
    the bounded one stays above a fixed bound and its compactness does not
    move.
    """
    rng = np.random.default_rng(3)
    b, k, c = 40, 16, 5
    y = np.arange(b) % c
    centres = 3.0 * np.eye(c, k)
    z = np.abs(centres[y] + 0.01 * rng.normal(size=(b, k))).astype(np.float32)  # ReLU codes
    za = np.abs(z + 0.01 * rng.normal(size=(b, k))).astype(np.float32)
    lg = (4.0 * np.eye(c)[y] + 0.5 * rng.normal(size=(b, c))).astype(np.float32)
    lga = (lg + 0.5 * rng.normal(size=(b, c))).astype(np.float32)
    base = _adr_terms(y, z, za, lg, lga, bounded=True)
    paper_totals = []
    for s in (1.0, 10.0, 100.0, 1000.0):
        bounded = _adr_terms(y, s * z, s * za, s * lg, s * lga, bounded=True)
        # Every term is >= 0 at every scale except global compactness, whose
        # push is at most (1/scale - 1) * 2 (mean L1 of RMS-1 codes <= 2).
        floor = {"global_compactness": -2 * (1 / SCALE - 1)}
        assert all(float(v) >= floor.get(n, 0.0) for n, v in bounded.items()), (s, bounded)
        # The compactness terms do not change at all with the scale of z.
        for name in ("local_compactness", "global_compactness"):
            np.testing.assert_allclose(bounded[name], base[name], rtol=1e-4, err_msg=name)
        paper = _adr_terms(y, s * z, s * za, s * lg, s * lga, bounded=False)
        paper_totals.append(float(sum(paper.values())))
    # The paper's objective falls without bound (linearly in the scale).
    assert paper_totals == sorted(paper_totals, reverse=True)
    assert paper_totals[-1] < -20 and paper_totals[-1] < 5 * paper_totals[-2]


def test_rms_compactness_gradient_is_orthogonal_to_the_code(batch):
    """A scale-invariant term has no gradient along `z_adv`: it cannot grow `z`."""
    y, z = batch["y"], tf.constant(batch["z"])
    za = tf.constant(np.abs(batch["z_adv"]) + 0.1)
    for term in (
        lambda a: losses.local_compactness(z, a, normalization="rms"),
        lambda a: losses.global_compactness(y, z, a, normalization="rms"),
    ):
        with tf.GradientTape() as tape:
            tape.watch(za)
            value = term(za)
        grad = tape.gradient(value, za).numpy()
        radial = (grad * za.numpy()).sum(1) / np.linalg.norm(za.numpy(), axis=1)
        assert np.abs(radial).max() < 1e-4 * np.abs(grad).sum(1).max()
        assert np.abs(grad).max() > 0


def test_bounded_terms_stop_gradient_on_clean_side(batch):
    y = batch["y"]
    z, za = tf.constant(batch["z"]), tf.constant(batch["z_adv"])
    lg, lga = tf.constant(batch["logits"]), tf.constant(batch["logits_adv"])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([z, lg])
        terms = [
            losses.local_compactness(z, za, normalization="rms"),
            losses.global_compactness(y, z, za, normalization="rms"),
            losses.global_smoothness(y, lg, lga, push="overlap"),
        ]
    for value in terms:
        assert all(g is None for g in tape.gradient(value, [z, lg]))


def test_bounded_options_validate_and_serialize():
    with pytest.raises(ValueError, match="normalization"):
        losses.local_compactness(np.ones((2, 2)), np.ones((2, 2)), normalization="l2")
    with pytest.raises(ValueError, match="push"):
        losses.global_smoothness([0, 1], np.ones((2, 2)), np.ones((2, 2)), push="kl")
    with pytest.raises(ValueError, match="normalization"):
        losses.LocalCompactness(normalization="batch")
    with pytest.raises(ValueError, match="normalization"):
        losses.global_compactness([0, 1], np.ones((2, 2)), np.ones((2, 2)), normalization="l1")


# ---------------------------------------------------------------------------
# Global compactness on sampled features (ADRConfig.global_compactness_features)
# ---------------------------------------------------------------------------


def test_sample_features_draws_a_seeded_uniform_subset():
    subset = losses.sample_features(10, 0.3, [1, 2]).numpy()
    assert subset.dtype == np.int32 and len(subset) == 3
    assert np.all(np.diff(subset) > 0) and subset.min() >= 0 and subset.max() < 10
    np.testing.assert_array_equal(losses.sample_features(10, 0.3, [1, 2]), subset)
    np.testing.assert_array_equal(losses.sample_features(7, 1.0, [5, 5]), np.arange(7))
    assert len(losses.sample_features(7, 0.01, [0, 0])) == 1  # at least one feature
    # Uniform: over many steps every feature is kept about `fraction` of the time.
    counts = np.zeros(10)
    for step in range(2000):
        counts[losses.sample_features(10, 0.3, [7, step]).numpy()] += 1
    np.testing.assert_allclose(counts / 2000, 0.3, atol=0.04)


def test_global_compactness_on_features_matches_numpy(batch):
    y, z, za = batch["y"], batch["z"], batch["z_adv"]
    features = np.array([0, 2, 5])
    value = losses.global_compactness_per_example(
        y, z, za, SCALE, features=features, normalization="rms"
    )
    # Independently: normalise over all features, then compare the kept ones.
    rms = lambda a: a / np.sqrt((a.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-6)
    zn, zan = rms(z)[:, features], rms(za)[:, features]
    distances = np.abs(zan[:, None, :] - zn[None]).mean(-1)
    np.testing.assert_allclose(value, (_np_weights(y, y) * distances).mean(1), **TOL)


def test_global_compactness_on_features_is_unbiased(batch):
    # Why sampling is allowed: the term is a mean over features, so the mean of
    # its estimates over the blocks of any partition into equal blocks (and
    # hence over uniform random subsets) is the full term, value and gradient.
    y, z = batch["y"], batch["z"]
    za = tf.Variable(batch["z_adv"])
    k = z.shape[1]
    blocks = np.random.default_rng(4).permutation(k).reshape(3, k // 3)

    def value_and_gradient(features):
        with tf.GradientTape() as tape:
            value = losses.global_compactness(
                y, z, za, SCALE, normalization="rms", features=features
            )
        return value.numpy(), tape.gradient(value, za).numpy()

    full_value, full_gradient = value_and_gradient(None)
    estimates = [value_and_gradient(np.sort(block)) for block in blocks]
    np.testing.assert_allclose(np.mean([v for v, _ in estimates]), full_value, **TOL)
    np.testing.assert_allclose(np.mean([g for _, g in estimates], 0), full_gradient, **TOL)
    assert not np.allclose(estimates[0][0], full_value)  # each block alone differs


def test_sampled_global_compactness_term_needs_and_uses_the_step_seed(batch):
    from keras_adr import presets

    config = presets.get("adr_pgd", global_compactness_features=0.5)
    adr_batch = objective.ADRBatch(
        labels=tf.constant(batch["y"], tf.int32),
        logits=batch["logits"],
        z=batch["z"],
        logits_adv=batch["logits_adv"],
        z_adv=batch["z_adv"],
    )
    with pytest.raises(ValueError, match="global_compactness_features"):
        objective.TERMS["global_compactness"](adr_batch, config)
    seed = tf.constant([3, 11], tf.int64)
    value = objective.TERMS["global_compactness"](adr_batch._replace(seed=seed), config)
    features = losses.sample_features(batch["z"].shape[1], 0.5, seed)
    assert len(features) == batch["z"].shape[1] // 2
    expected = losses.global_compactness_per_example(
        batch["y"], batch["z"], batch["z_adv"], SCALE, normalization="rms", features=features
    )
    np.testing.assert_allclose(value, expected, **TOL)
    # Another seed with another subset gives another value.
    other_seed = next(
        seed + s
        for s in range(1, 50)
        if not np.array_equal(losses.sample_features(6, 0.5, seed + s), features)
    )
    other = objective.TERMS["global_compactness"](adr_batch._replace(seed=other_seed), config)
    assert not np.allclose(value, other)


def test_functional_losses_default_to_the_bounded_form_of_adr_config(batch):
    from keras_adr.config import ADRConfig

    config = ADRConfig()
    assert (config.latent_normalization, config.smoothness_push) == ("rms", "overlap")
    y, z, za, lg, lga = (batch[k] for k in ("y", "z", "z_adv", "logits", "logits_adv"))
    bounded = _adr_terms(y, z, za, lg, lga, bounded=True)
    defaults = {
        "local_compactness": losses.local_compactness(z, za),
        "global_compactness": losses.global_compactness(y, z, za, SCALE),
        "global_smoothness": losses.global_smoothness(y, lg, lga, SCALE),
        "local_compactness_loss": losses.LocalCompactness()(z, za),
    }
    for name in ("local_compactness", "global_compactness", "global_smoothness"):
        np.testing.assert_allclose(defaults[name], bounded[name], **TOL)
    np.testing.assert_allclose(
        defaults["local_compactness_loss"], bounded["local_compactness"], **TOL
    )
    # And they differ from the paper's on this batch, so the check above can fail.
    paper = _adr_terms(y, z, za, lg, lga, bounded=False)
    if len(set(y.tolist())) > 1:  # with one label both pushes are empty
        assert not np.isclose(defaults["global_smoothness"], paper["global_smoothness"])
    assert not np.isclose(defaults["local_compactness"], paper["local_compactness"])
