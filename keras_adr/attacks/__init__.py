"""Evasion attacks as pure TensorFlow functions, one attack per module.

- `pgd`: `pgd` (Madry et al. 2018; also the TRADES KL attack) and `fgsm`.
- `apgd`: Auto-PGD (Croce & Hein 2020): `apgd`, `apgd_dlr_targeted`.
- `fab`: targeted FAB (Croce & Hein 2020), minimal L-inf or L2 perturbations:
  `fab`, `fab_min_norm`.
- `square`: the Square Attack (Andriushchenko et al. 2020), score-based
  (no gradients): `square`, `square_details`.

Every attack takes `model_fn`, a callable mapping images to logits. A Keras
model or layer is always called with `training=False`, so an attack never
updates BatchNorm statistics nor samples dropout masks. Plain callables are
called as they are: the caller is responsible for inference mode.

The attacks run eagerly or inside `tf.function` (the loops are
`tf.while_loop`s), work on any batch size, and return images inside the
epsilon-ball around `x` and inside `[clip_min, clip_max]`, with no gradient
flowing back to `x`.
"""

from keras_adr.attacks._common import ATTACK_LOSSES, inference_fn
from keras_adr.attacks._hyperplane import project_to_hyperplane_l2, project_to_hyperplane_linf
from keras_adr.attacks.apgd import (
    APGD_DEFAULT_TARGETS,
    APGD_LOSSES,
    APGD_MOMENTUM,
    _apgd_objective,  # noqa: F401  (tests reach the objective through the package)
    apgd,
    apgd_checkpoints,
    apgd_dlr_targeted,
)
from keras_adr.attacks.fab import (
    FAB_DEFAULT_STEPS,
    FAB_DEFAULT_TARGETS,
    fab,
    fab_min_norm,
)
from keras_adr.attacks.pgd import fgsm, pgd
from keras_adr.attacks.square import (
    SQUARE_DEFAULT_P_INIT,
    SQUARE_DEFAULT_QUERIES,
    square,
    square_details,
    square_p_schedule,
)

__all__ = [
    "APGD_DEFAULT_TARGETS",
    "APGD_LOSSES",
    "APGD_MOMENTUM",
    "ATTACK_LOSSES",
    "apgd",
    "apgd_checkpoints",
    "apgd_dlr_targeted",
    "fgsm",
    "inference_fn",
    "pgd",
    "SQUARE_DEFAULT_P_INIT",
    "SQUARE_DEFAULT_QUERIES",
    "square",
    "square_details",
    "square_p_schedule",
    "FAB_DEFAULT_STEPS",
    "FAB_DEFAULT_TARGETS",
    "fab",
    "fab_min_norm",
    "project_to_hyperplane_l2",
    "project_to_hyperplane_linf",
]
