"""`RobustAccuracy`: the worst-case accuracy under an attack suite, in the logs.

`RobustAccuracy` logs the worst-case accuracy under an attack suite on
held-out data, for `ModelCheckpoint`, `EarlyStopping` and TensorBoard.
"""

import keras

from keras_adr import specs


class RobustAccuracy(keras.callbacks.Callback):
    """Logs the worst-case accuracy over an attack suite every `every` epochs.

    At the end of every `every`-th epoch the model (in inference mode) is
    attacked on `data` with `keras_adr.evaluation.evaluate_robustness`, and
    `logs[name]` gets the per-example worst case over `attacks` (and
    `logs[name + "_clean"]` the clean accuracy), so the value lands in the
    `History` and in the callbacks that read it (`ModelCheckpoint(monitor=
    name)`, `EarlyStopping`, `CSVLogger`, `TensorBoard`). Put it before
    them in the `callbacks` list: Keras calls them in order. A progress bar
    (`keras.utils.Progbar`) follows the attack's batches.

    Args:
        data: Held-out `(images, labels)`: a `tf.data.Dataset` or arrays.
        epsilon: Radius of the threat model.
        norm: `"linf"` or `"l2"`.
        attacks: The suite (at least one PGD and one APGD attack); default
            `keras_adr.specs.EVAL_ATTACKS`.
        every: Evaluate every this many epochs.
        restarts, apgd_targets, seed, batch_size: See `evaluate_robustness`.
        name: The log key.
        verbose: `"auto"` (that of `fit`), 0 (silent), 1 (progress bar) or
            2 (one line when done).
    """

    def __init__(
        self,
        data,
        *,
        epsilon,
        norm="linf",
        attacks=specs.EVAL_ATTACKS,
        every=1,
        restarts=1,
        apgd_targets=3,
        seed=0,
        batch_size=128,
        name="val_robust_accuracy",
        verbose="auto",
    ):
        super().__init__()
        from keras_adr import evaluation

        evaluation.parse_suite(attacks)  # fail now, not after the first epoch
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be an integer >= 1; got {every!r}.")
        if verbose not in ("auto", 0, 1, 2):
            raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2; got {verbose!r}.")
        self.verbose = verbose
        self.data = data
        self.every = every
        self.name = name
        self.options = dict(
            epsilon=epsilon,
            norm=norm,
            attacks=tuple(attacks),
            restarts=restarts,
            apgd_targets=apgd_targets,
            seed=seed,
            batch_size=batch_size,
        )
        self.last_result = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every or logs is None:
            return
        from keras_adr import evaluation

        fit_verbose = (self.params or {}).get("verbose", 1)
        verbose = self.verbose if self.verbose != "auto" else fit_verbose
        verbose = 1 if verbose == "auto" else verbose
        attacks, epsilon = ", ".join(self.options["attacks"]), self.options["epsilon"]
        what = f"{self.name} ({attacks}, epsilon {epsilon:g})"
        if verbose == 1:
            # `fit`'s own bar is still mid-line (it ends at the epoch end).
            print(("\n" if fit_verbose in (1, "auto") else "") + what + ":", flush=True)
        bar = None

        def progress(done, total):
            nonlocal bar
            if bar is None:
                bar = keras.utils.Progbar(total, verbose=verbose, unit_name="batch")
            bar.update(done)

        result = evaluation.evaluate_robustness(
            self.model, self.data, progress=progress if verbose == 1 else None, **self.options
        )
        if verbose == 2:
            print(f"{what}: {result.robust_accuracy:.4f}", flush=True)
        self.last_result = result
        logs[self.name] = result.robust_accuracy
        logs[f"{self.name}_clean"] = result.clean_accuracy
