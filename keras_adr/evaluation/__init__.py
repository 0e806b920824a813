"""Robustness evaluation: attack suites, the worst case per example, sanity checks, reports.

Two suites:

- The default, fast one (`evaluate_robustness`, `epsilon_sweep`): FGSM, PGD
  and APGD attacks by name (`keras_adr.specs`), each on the examples the
  earlier ones left standing (or every attack on every example), the worst
  case per example (`suite`), configured by one
  `keras_adr.specs.EvalConfig` (or its fields as keyword arguments).
- AutoAttack's standard version (`autoattack`, `autoattack_suite`): APGD-CE,
  APGD-T, FAB-T and Square, each on the points still robust, reported in
  RobustBench's format too.

`sanity_checks` of either result looks for the signs of gradient masking
(`sanity`); `format_summary`, `write_report` and `write_autoattack_result`
write what was found (`report`), each file set complete or not at all, with
a completion marker that `read_report` checks. Models and data are read by `loading`;
results are `results`.

Example:

```python
model = evaluation.load_model("saved_models/fashion_mnist")  # or a .keras file
test = keras_adr.data.load("fashion_mnist", "test", batch_size=256, take=1000)
sweep = evaluation.epsilon_sweep(model, test, [0.05, 0.1, 0.2], headline_epsilon=0.1)
checks = evaluation.sanity_checks(sweep)
evaluation.write_report(sweep, "runs/eval", checks=checks)
print(evaluation.format_summary(sweep, checks))
```
"""

from keras_adr.evaluation.autoattack_suite import autoattack
from keras_adr.evaluation.loading import (
    LoadedModel,
    as_model_fn,
    load_model,
    materialise,
    resolve_model_path,
)
from keras_adr.evaluation.report import (
    REPORT_JSON,
    REPORT_MARKDOWN,
    REPORT_MARKER,
    REPORT_PLOT,
    ROBUSTBENCH_JSON,
    ROBUSTBENCH_MARKER,
    IncompleteReportError,
    ReportWriteError,
    format_summary,
    read_report,
    write_autoattack_result,
    write_report,
)
from keras_adr.evaluation.results import (
    AutoAttackResult,
    RobustnessResult,
    SweepResult,
    as_sweep,
    robustbench_eps,
)
from keras_adr.evaluation.sanity import (
    COMPARISON_TOLERANCE,
    FAILED,
    NEAR_ZERO_ACCURACY,
    PASSED,
    SKIPPED,
    SanityCheck,
    SanityCheckError,
    comparison_tolerance,
    sanity_checks,
)
from keras_adr.evaluation.suite import (
    LARGE_EPSILON_FRACTION,
    epsilon_sweep,
    eval_config,
    evaluate_robustness,
    large_epsilon,
)
from keras_adr.specs import AttackSpec, EvalConfig, parse_attack, parse_suite, worst_case_correct

__all__ = [
    "COMPARISON_TOLERANCE",
    "FAILED",
    "LARGE_EPSILON_FRACTION",
    "NEAR_ZERO_ACCURACY",
    "PASSED",
    "REPORT_JSON",
    "REPORT_MARKER",
    "REPORT_MARKDOWN",
    "REPORT_PLOT",
    "ROBUSTBENCH_JSON",
    "ROBUSTBENCH_MARKER",
    "IncompleteReportError",
    "ReportWriteError",
    "read_report",
    "SKIPPED",
    "AttackSpec",
    "AutoAttackResult",
    "EvalConfig",
    "LoadedModel",
    "RobustnessResult",
    "SanityCheck",
    "SanityCheckError",
    "SweepResult",
    "as_model_fn",
    "as_sweep",
    "autoattack",
    "comparison_tolerance",
    "epsilon_sweep",
    "eval_config",
    "evaluate_robustness",
    "format_summary",
    "large_epsilon",
    "load_model",
    "materialise",
    "parse_attack",
    "parse_suite",
    "resolve_model_path",
    "robustbench_eps",
    "sanity_checks",
    "worst_case_correct",
    "write_autoattack_result",
    "write_report",
]
