"""The one training recipe and the one default evaluation suite."""

import dataclasses

import pytest

from keras_adr import callbacks, config, pipeline, recipe, specs


def test_adr_train_defaults_are_the_recipe():
    options = pipeline.TrainOptions()
    for field in dataclasses.fields(recipe.Recipe):
        if hasattr(options, field.name):
            assert getattr(options, field.name) == getattr(recipe.RECIPE, field.name), field.name
    attack = config.ADRConfig().attack
    assert attack.epsilon == recipe.RECIPE.epsilon
    assert attack.steps == recipe.RECIPE.attack_steps
    assert attack.resolved_step_size == pytest.approx(recipe.RECIPE.attack_step_size)


def test_the_benchmarks_start_from_the_recipe():
    """The studies run the recipe with the PGD-5 attack they were measured with, pinned."""
    presets = pytest.importorskip("benchmarks.robustness_presets")
    stability = pytest.importorskip("benchmarks.stability")
    pinned = presets.PGD5_RECIPE
    assert pinned == dataclasses.replace(recipe.RECIPE, attack_steps=5)
    fmnist = presets.PRESETS["fmnist"]
    assert (fmnist.epochs, fmnist.batch_size, fmnist.learning_rate) == (
        recipe.RECIPE.epochs,
        recipe.RECIPE.batch_size,
        recipe.RECIPE.learning_rate,
    )
    assert (fmnist.attack_steps, fmnist.step_size) == (5, 0.05)
    frontier = presets.PRESETS["frontier"]
    assert frontier.step_size == pytest.approx(config.pgd_step_size(0.1, 10))
    assert stability.RECIPE["step_size"] == pinned.attack_step_size == 0.05
    assert stability.RECIPE["lr_decay_fractions"] == recipe.RECIPE.lr_decay_fractions


def test_one_default_evaluation_suite():
    assert pipeline.TrainOptions().eval_attacks == specs.EVAL_ATTACKS
    assert specs.EvalConfig().attacks == specs.EVAL_ATTACKS
    robust = callbacks.RobustAccuracy(([], []), epsilon=0.1)
    assert robust.options["attacks"] == specs.EVAL_ATTACKS
    presets = pytest.importorskip("benchmarks.robustness_presets")
    assert presets.PRESETS["fmnist"].eval_attacks == specs.EVAL_ATTACKS


def test_the_step_size_follows_epsilon_and_steps():
    assert recipe.RECIPE.attack_step_size == 0.025
    assert dataclasses.replace(recipe.RECIPE, attack_steps=5).attack_step_size == 0.05


def test_adr_train_defaults_are_the_frontier_point_chosen_on_validation():
    """`adr_pgd` with the library's attack is the frontier row frontier_defaults chose."""
    import os

    rp = pytest.importorskip("benchmarks.robustness_presets")
    from benchmarks import results_io
    from keras_adr import presets

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    summary = results_io.read_json(
        os.path.join(root, "benchmarks", "results", "frontier_defaults.json")
    )
    assert summary["decision"]["change"] is True
    frontier = rp.PRESETS["frontier"]
    chosen = next(r for r in rp.rows_of(frontier) if r.name == summary["decision"]["best"])
    library = presets.get(chosen.defense)
    # The rows give the step size; the library computes the same 2.5 * eps / steps.
    library = library.replace(attack_step_size=library.attack.resolved_step_size)
    assert rp.adr_config(frontier, chosen).result_config() == library.result_config()
    assert chosen.ema_momentum == pipeline.TrainOptions().ema_momentum == 0.0
