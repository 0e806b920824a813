"""benchmarks.results_io, shared by the benchmark scripts, and how the scripts are run."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import results_io

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rows_keep_their_file_format(tmp_path):
    # Finished benchmark rows must stay byte-compatible: sorted keys, indent 2, newline.
    payload = {"b": 1, "a": {"y": [1.5, None], "x": "s"}}
    path = tmp_path / "row.json"
    results_io.write_json_atomic(path, payload)
    assert path.read_text() == json.dumps(payload, indent=2, sort_keys=True) + "\n"
    assert results_io.read_json(path) == payload
    assert results_io.read_json(tmp_path / "missing.json") is None


def test_write_results_writes_json_and_markdown(tmp_path):
    path = tmp_path / "out" / "speed.json"
    results_io.write_results(str(path), {"b": 2, "a": object}, markdown="# Speed\n")
    assert list(json.loads(path.read_text())) == ["b", "a"]  # insertion order kept
    assert json.loads(path.read_text())["a"] == str(object)
    assert (tmp_path / "out" / "speed.md").read_text() == "# Speed\n"


def test_markdown_table():
    assert results_io.markdown_table(
        ["name", "s", "note"], [["a", 1.5, ""], ["b", 2, "x"]], align="lrl"
    ) == ["| name | s | note |", "|---|---:|---|", "| a | 1.5 |  |", "| b | 2 | x |"]
    assert results_io.markdown_table(["a", "b"], [])[1] == "|---|---:|"


def test_machine_info_names_the_cpu_and_versions():
    import keras
    import tensorflow as tf

    info = results_io.machine_info(load=[0.5])
    assert info["cpu"] == results_io.cpu_info()[0] and info["cpu"]
    assert info["cpus"] == os.cpu_count() and info["load"] == [0.5]
    assert (info["tensorflow"], info["keras"]) == (tf.__version__, keras.__version__)


@pytest.mark.slow
def test_scripts_run_as_modules_and_as_files(tmp_path):
    for command in (["-m", "benchmarks.robustness"], [os.path.join("benchmarks", "robustness.py")]):
        result = subprocess.run(
            [sys.executable, *command, "--preset=cpu", "--list", f"--results_dir={tmp_path}"],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "pgd_at" in result.stdout and "pending" in result.stdout


def _run(module, *flags, timeout=120):
    """Runs `python -m benchmarks.<module>` with `flags`; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *flags],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )


def _benchmark(module, *flags, timeout=120):
    """Runs `python -m benchmarks.<module>` with `flags`; returns its stdout."""
    result = _run(module, *flags, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _robustness(*flags, timeout=120):
    return _benchmark("robustness", *flags, timeout=timeout)


@pytest.mark.slow
def test_precision_axis_keeps_the_finished_fmnist_rows(tmp_path):
    # Rows of float32-only presets keep their names and fingerprints: the
    # committed fmnist rows are still done.
    status = {
        line.split()[0]: line.split()[4]
        for line in _robustness("--preset=fmnist", "--list").splitlines()
    }
    for name in ("pgd_at", "adr_pgd", "pgd_at_seed1", "adr_pgd_seed1"):
        assert status[name] == "done", name
    listed = _robustness("--preset=precision", "--list", f"--results_dir={tmp_path}")
    names = [line.split()[0] for line in listed.splitlines()]
    assert names == [
        f"{row}_{p}"
        for row in ("pgd_at", "adr_pgd", "pgd_at_seed1", "adr_pgd_seed1")
        for p in ("float32", "mixed_bfloat16")
    ]


@pytest.mark.slow
def test_precision_preset_trains_each_precision_and_compares_them(tmp_path):
    import keras

    from keras_adr import data, precision

    try:
        data.load("fashion_mnist", "test", batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    rows = ("pgd_at_float32", "pgd_at_mixed_bfloat16")
    _robustness(
        "--preset=precision",
        f"--results_dir={tmp_path / 'results'}",
        f"--workdir={tmp_path / 'runs'}",
        "--train_examples=320",
        "--validation_examples=64",
        "--test_examples=32",
        "--restarts=1",
        "--eval_attacks=pgd5,apgd_ce5",
        f"--rows={','.join(rows)}",
        "--threads=1",
        "--verbose=0",
        timeout=300,
    )
    for name, policy, dtype in zip(rows, ("float32", "mixed_bfloat16"), ("float32", "bfloat16")):
        row = json.loads((tmp_path / "results" / "precision_rows" / f"{name}.json").read_text())
        assert row["precision"] == row["precision_record"]["training"] == policy
        assert row["evaluation_precision"] == "float32"
        model = keras.models.load_model(tmp_path / "runs" / name / "best.keras", compile=False)
        assert precision.compute_dtype(model.backbone) == dtype  # trained in the policy
    summary = json.loads((tmp_path / "results" / "precision.json").read_text())
    pair = summary["precision_comparison"]["comparisons"]["mixed_bfloat16"]["pgd_at"]
    assert [e["seed"] for e in pair["seeds"]] == pair["mean"]["seeds"] == [0]
    robust = pair["mean"]["robust_accuracy"]
    assert robust["difference"] == robust["mixed_bfloat16"] - robust["float32"]
    assert set(pair["mean"]["paired"]) == {"clean", "worst case"}
    assert "## Training precision: mixed_bfloat16 against float32" in (
        (tmp_path / "results" / "precision.md").read_text()
    )


def _speed_row(policy, defense, seconds):
    return {"policy": policy, "defense": defense, "median_step_seconds": seconds}


def test_precision_analysis_marks_issue_14_targets():
    from benchmarks import precision_speed_report

    rows = [
        _speed_row("float32", "pgd_at", 0.30),
        _speed_row("float32", "pgd_at", 0.32),
        _speed_row("float32", "pgd_at", 0.34),
        _speed_row("mixed_bfloat16", "pgd_at", 0.15),
        _speed_row("mixed_bfloat16", "pgd_at", 0.17),  # 0.32 / 0.17 = 1.88: met
        _speed_row("float32", "adr_pgd", 0.33),
        _speed_row("mixed_bfloat16", "adr_pgd", 0.16),
        _speed_row("mixed_bfloat16", "adr_pgd", 0.25),  # 0.33 / 0.25 = 1.32: not met
    ]
    analysis = precision_speed_report.analyse(rows)
    by_key = {(c["defense"], c["policy"]): c for c in analysis["configurations"]}
    pgd_bf16 = by_key[("pgd_at", "mixed_bfloat16")]
    assert pgd_bf16["processes"] == 2
    assert pgd_bf16["median_step_seconds"] == pytest.approx(0.16)
    assert (pgd_bf16["min_step_seconds"], pgd_bf16["max_step_seconds"]) == (0.15, 0.17)
    assert pgd_bf16["speedup_over_float32"] == pytest.approx(0.32 / 0.16)
    assert by_key[("pgd_at", "float32")]["speedup_over_float32"] == 1
    ratios = analysis["adr_pgd_over_pgd_at"]
    assert analysis["adr_pgd_over_pgd_at_per_round"] == {}  # these rows have no rounds
    assert ratios["float32"] == pytest.approx(0.33 / 0.32)
    assert ratios["mixed_bfloat16"] == pytest.approx(0.205 / 0.16)
    met = {t["target"]: t["met"] for t in analysis["targets"]}
    assert met == {
        "every mixed_bfloat16 process of pgd_at at least 1.7x faster than float32's median": True,
        "every mixed_bfloat16 process of adr_pgd at least 1.7x faster than float32's median": False,
        "adr_pgd <= 1.05 x pgd_at in float32 (medians over processes)": True,
        "adr_pgd <= 1.05 x pgd_at in mixed_bfloat16 (medians over processes)": False,
    }
    text = "\n".join(precision_speed_report.markdown_lines(analysis))
    assert "| adr_pgd | mixed_bfloat16 | 2 | 0.205 | 0.160 | 0.250 | 1.61 | 1.32 |" in text
    assert "**not met**" in text and "**met**" in text


def test_precision_analysis_pairs_the_defenses_round_by_round():
    from benchmarks import precision_speed_report

    def row(defense, run, seconds):
        return dict(_speed_row("mixed_bfloat16", defense, seconds), run=run)

    rows = [
        row("pgd_at", 0, 0.10),
        row("adr_pgd", 0, 0.11),  # 1.10
        row("pgd_at", 1, 0.20),
        row("adr_pgd", 1, 0.21),  # 1.05
        row("pgd_at", 2, 0.10),
        row("adr_pgd", 2, 0.20),  # 2.00
        row("pgd_at", 3, 0.10),  # no adr_pgd process in this round
    ]
    analysis = precision_speed_report.analyse(rows)
    per_round = analysis["adr_pgd_over_pgd_at_per_round"]["mixed_bfloat16"]
    assert per_round == {"rounds": 3, "median": pytest.approx(1.10)}
    # The ratio of medians over processes mixes rounds: 0.20 / 0.10.
    assert analysis["adr_pgd_over_pgd_at"]["mixed_bfloat16"] == pytest.approx(
        1.1 / 1.0 * 0.2 / 0.11
    )
    text = "\n".join(precision_speed_report.markdown_lines(analysis))
    assert "| mixed_bfloat16 | 2.000 | 1.100 (3) |" in text


def _require_fashion_mnist():
    from keras_adr import data

    try:
        data.load("fashion_mnist", "test", batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")


@pytest.mark.slow
def test_speed_precision_section_writes_the_precision_table(tmp_path):
    # One process per (defense, precision), 2 timed steps: checks the plumbing, not speed.
    _require_fashion_mnist()
    output = tmp_path / "speed.json"
    _benchmark(
        "speed",
        "--sections=precision",
        "--precisions=float32,mixed_bfloat16",
        "--precision_defenses=pgd_at,adr_pgd",
        "--precision_processes=1",
        "--precision_steps=2",
        "--precision_warmup=1",
        "--attack_steps=1",
        "--batch_size=32",
        f"--output={output}",
        timeout=240,
    )
    precision = json.loads(output.read_text())["precision"]
    assert [
        (c["defense"], c["policy"], c["processes"]) for c in precision["analysis"]["configurations"]
    ] == [
        ("pgd_at", "float32", 1),
        ("pgd_at", "mixed_bfloat16", 1),
        ("adr_pgd", "float32", 1),
        ("adr_pgd", "mixed_bfloat16", 1),
    ]
    assert len(precision["rows"]) == 4
    assert all(len(row["step_seconds"]) == 2 for row in precision["rows"])
    assert set(precision["analysis"]["adr_pgd_over_pgd_at"]) == {"float32", "mixed_bfloat16"}
    assert len(precision["analysis"]["targets"]) == 4
    assert all(isinstance(t["met"], bool) for t in precision["analysis"]["targets"])
    text = (tmp_path / "speed.md").read_text()
    assert "## Training step per precision" in text
    assert "| defense | precision | processes | median s/step | min | max |" in text
    assert "| precision | adr_pgd / pgd_at (medians) |" in text
    assert "Targets of issue 14:" in text
    # --render_only keeps the table (the analysis is recomputed from the rows).
    _benchmark("speed", f"--render_only={output}")
    assert (tmp_path / "speed.md").read_text() == text


@pytest.mark.slow
def test_precision_speed_keeps_its_command_line(tmp_path):
    _require_fashion_mnist()
    _benchmark(
        "precision_speed",
        "--runs=1",
        "--steps=2",
        "--warmup=1",
        "--attack_steps=1",
        "--batch_size=32",
        "--policies=float32",
        "--defenses=adr_pgd",
        "--global_compactness_features=0.5",
        "--inter_op_threads=1",
        "--recompilations=2",
        "--op_profile",
        f"--output_dir={tmp_path}",
    )
    row = json.loads((tmp_path / "rows" / "float32_adr_pgd_run0.json").read_text())
    assert row["inter_op_threads"] == 1  # set in the child, before TensorFlow ran an op
    assert len(row["recompiled_median_step_seconds_each"]) == 2
    assert all("idle" in machine for machine in row["recompiled_machine_per_step_each"])
    assert all(usage["user_cpu_seconds"] > 0 for usage in row["recompiled_per_step_each"])
    profile = row["op_profile"]
    assert 0 < profile["op_busy_seconds"] < 1.5 * max(row["step_seconds"]) * 2
    assert any("Conv" in op for op in profile["op_self_seconds"])  # the model's kernels
    assert len(row["recompiled_op_profile_each"]) == 2
    assert (row["steps"], row["warmup"], len(row["step_seconds"])) == (2, 1, 2)
    assert row["global_compactness_features"] == 0.5  # the child process got the flag
    assert set(row["part_seconds"]) == {
        "attack",
        "objective_and_gradients",
        "inference_forward",
        "global_compactness_and_gradient",
    }
    assert all(seconds > 0 for seconds in row["part_seconds"].values())
    # The attack alone is part of a step, so it takes less than a whole step.
    assert row["part_seconds"]["attack"] < max(row["step_seconds"]) * 1.5
    assert row["per_step"]["user_cpu_seconds"] > 0
    assert set(row["machine_per_step"]) >= {"user", "system", "idle", "steal"}
    assert row["recompiled_median_step_seconds"] > 0
    report = (tmp_path / "summary.md").read_text()
    assert "| adr_pgd | float32 | 1 |" in report
    assert "`global_compactness_features=0.5`" in report
    assert "## Where each process spends a step" in report
    assert "inter-op 1." in report
    assert "## Time per op type (`--op_profile`)" in report
    assert "## Slow compilations" in report


def _xspace(lines):
    """An XSpace of one plane; `lines`: per thread, `(name, start_ms, end_ms)` events."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    ids = {}
    for events in lines:
        line = plane.lines.add(timestamp_ns=1000)
        for name, start, end in events:
            if name not in ids:
                ids[name] = len(ids) + 1
                plane.event_metadata[ids[name]].name = name
            ms = 10**9  # picoseconds
            line.events.add(
                metadata_id=ids[name], offset_ps=start * ms, duration_ps=(end - start) * ms
            )
    return space


def test_op_profile_counts_self_time_per_op_type_and_overlap_across_threads():
    from benchmarks import op_profile

    space = _xspace(
        [
            [
                ("ExecutorState::Process", 0, 130),  # the runtime's, not an op
                ("loop:While", 0, 100),
                ("loop/body/conv:_MklNativeConv2D", 10, 40),  # nested in the While op
                ("loop/body/dense:_MklMatMul", 50, 70),
            ],
            [("EagerLocalExecute: __inference_f", 55, 58), ("sort:TopKV2", 60, 120)],
        ]
    )
    summary = op_profile.summarize(space, steps=2)
    assert summary["op_self_seconds"] == {
        "TopKV2": 0.03,
        "While": 0.025,  # 100 ms less the 30 + 20 of its body, over 2 steps
        "_MklNativeConv2D": 0.015,
        "_MklMatMul": 0.01,
    }
    assert summary["op_busy_seconds"] == 0.06  # 0-120 ms
    assert summary["op_overlap_seconds"] == 0.02  # 60-100 ms on both threads
    assert summary["threads_with_ops"] == 2
    assert list(op_profile.summarize(space, steps=2, top=1)["op_self_seconds"]) == ["TopKV2"]


def test_slow_compilations_count_first_and_faster_of_two_and_leave_out_disturbed_ones():
    from benchmarks import precision_speed_compilations

    quiet = {"user": 0.2, "nice": 0.0, "system": 0.0}
    busy = {"user": 0.3, "nice": 0.0, "system": 0.0}  # 0.1 s/step of someone else's
    own = {"user_cpu_seconds": 0.2, "system_cpu_seconds": 0.0}

    def row(first, recompiled, machines=None):
        return {
            "defense": "adr_pgd",
            "policy": "mixed_bfloat16",
            "median_step_seconds": first,
            "machine_per_step": quiet,
            "per_step": own,
            "recompiled_median_step_seconds_each": recompiled,
            "recompiled_machine_per_step_each": machines or [quiet] * len(recompiled),
            "recompiled_per_step_each": [own] * len(recompiled),
        }

    rows = [
        row(0.18, [0.12, 0.12]),  # slow first, fixed by the second
        row(0.12, [0.18, 0.12]),  # slow second: the faster of two is fine
        row(0.19, [0.18, 0.12]),  # both slow
        row(0.12, [0.30], machines=[busy]),  # the slow one was disturbed
        {  # an older row: one recompilation, no CPU figures (counted)
            "defense": "adr_pgd",
            "policy": "mixed_bfloat16",
            "median_step_seconds": 0.12,
            "recompiled_median_step_seconds": 0.12,
        },
        {"defense": "pgd_at", "policy": "mixed_bfloat16", "median_step_seconds": 0.11},
    ]
    adr, pgd = precision_speed_compilations.slow_compilations(rows)
    assert adr["median_step_seconds"] == 0.12
    assert (adr["compilations"], adr["disturbed"], adr["slow"]) == (12, 1, 4)
    assert (adr["processes_with_two"], adr["first_slow"], adr["faster_of_two_slow"]) == (4, 2, 1)
    assert (pgd["compilations"], pgd["slow"], pgd["processes_with_two"]) == (1, 0, 0)
    text = "\n".join(precision_speed_compilations.slow_compilation_lines(rows))
    assert "| adr_pgd | mixed_bfloat16 | 120.0 | 12 | 1 | 4 | 2 of 4 | 1 of 4 |" in text
    assert precision_speed_compilations.slow_compilation_lines(rows[-1:]) == []


def test_slow_op_differences_compare_slow_and_other_profiled_compilations():
    from benchmarks import precision_speed_compilations

    def profile(**ops):
        return {"op_self_seconds": ops, "median_step_seconds": 0.1}

    fast = profile(_MklNativeMaxPoolGrad=0.008, ReluGrad=0.04)
    slow = profile(MaxPoolGrad=0.05, _MklNativeMaxPoolGrad=0.002, ReluGrad=0.041)
    rows = [
        {
            "defense": "adr_pgd",
            "policy": "mixed_bfloat16",
            "median_step_seconds": first,
            "op_profile": profiles[0],
            "recompiled_median_step_seconds_each": recompiled,
            "recompiled_op_profile_each": profiles[1:],
        }
        for first, recompiled, profiles in [
            (0.12, [0.18, 0.12], [fast, slow, fast]),
            (0.19, [0.12, 0.13], [slow, fast, fast]),
        ]
    ]
    (result,) = precision_speed_compilations.slow_op_differences(rows, top=2)
    assert (result["slow"], result["others"]) == (2, 4)
    assert result["ops"] == [["MaxPoolGrad", 0.05, 0.0], ["_MklNativeMaxPoolGrad", 0.002, 0.008]]
    text = "\n".join(precision_speed_compilations.slow_op_lines(rows))
    assert "| adr_pgd | mixed_bfloat16 | MaxPoolGrad | 50.0 | 0.0 | 2 | 4 |" in text
    # Without a slow compilation there is nothing to compare.
    assert (
        precision_speed_compilations.slow_op_lines(
            [dict(rows[0], recompiled_median_step_seconds_each=[0.12, 0.12])]
        )
        == []
    )


def test_usage_per_step_divides_the_change_by_the_steps():
    import resource

    from benchmarks.precision_speed_measure import _usage_per_step

    before = resource.struct_rusage((1.0, 0.5) + (0,) * 4 + (100, 0) + (0,) * 6 + (10, 2))
    after = resource.struct_rusage((3.0, 0.9) + (0,) * 4 + (140, 0) + (0,) * 6 + (30, 10))
    assert _usage_per_step(before, after, 4) == {
        "user_cpu_seconds": 0.5,
        "system_cpu_seconds": 0.1,
        "minor_page_faults": 10.0,
        "voluntary_context_switches": 5.0,
        "involuntary_context_switches": 2.0,
    }


def test_machine_cpu_seconds_reads_the_cpu_line_of_proc_stat(tmp_path):
    import os

    from benchmarks.precision_speed_measure import _machine_cpu_seconds, _machine_per_step

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 20 30 400 5 0 1 7 0 0\ncpu0 50 10 15 200 2 0 0 3 0 0\n")
    tick = 1 / os.sysconf("SC_CLK_TCK")
    before = _machine_cpu_seconds(str(stat))
    assert before["user"] == pytest.approx(100 * tick)
    assert before["steal"] == pytest.approx(7 * tick)
    stat.write_text("cpu  300 20 30 400 5 0 1 47 0 0\n")
    per_step = _machine_per_step(before, _machine_cpu_seconds(str(stat)), 2)
    assert per_step["user"] == pytest.approx(round(100 * tick, 4))
    assert per_step["steal"] == pytest.approx(round(20 * tick, 4))
    assert per_step["idle"] == 0
    assert _machine_cpu_seconds(str(tmp_path / "missing")) is None
    assert _machine_per_step(None, before, 2) is None


def test_part_lines_sort_processes_and_skip_rows_without_parts():
    from benchmarks.precision_speed_report import part_lines

    def row(defense, step, attack):
        return {
            "defense": defense,
            "policy": "mixed_bfloat16",
            "median_step_seconds": step,
            "part_seconds": {
                "attack": attack,
                "objective_and_gradients": 0.03,
                "global_compactness_and_gradient": 0.0075,
            },
            "per_step": {"user_cpu_seconds": 0.2, "system_cpu_seconds": 0.01},
        }

    old_row = {"defense": "pgd_at", "policy": "float32", "median_step_seconds": 0.3}
    assert part_lines([old_row]) == []
    slow = row("pgd_at", 0.12, 0.09)
    slow["recompiled_median_step_seconds"] = 0.105
    slow["machine_per_step"] = {
        "user": 0.0,
        "nice": 0.2,
        "system": 0.06,
        "idle": 0.002,
        "iowait": 0.0,
        "irq": 0.0,
        "softirq": 0.0,
        "steal": 0.1,
    }
    lines = part_lines([slow, old_row, row("pgd_at", 0.11, 0.08)])
    assert lines[2:] == [
        "| pgd_at | mixed_bfloat16 | 110.0 | - | 80.0 | 30.0 | 7.5 | 0.200 | 0.010 | - | - | - |",
        "| pgd_at | mixed_bfloat16 | 120.0 | 105.0 | 90.0 | 30.0 | 7.5 | 0.200 | 0.010 "
        "| 0.002 | 0.100 | 0.050 |",
    ]


def test_row_pairs_count_discordant_examples_of_finished_pairs():
    from benchmarks.robustness_stats import bits, row_pairs

    def row(name, clean, robust):
        return {
            "name": name,
            "evaluation": {"num_examples": len(clean)},
            "clean_accuracy": sum(clean) / len(clean),
            "robust_accuracy": sum(robust) / len(robust),
            "clean_correct_bits": bits(clean),
            "robust_correct_bits": bits(robust),
        }

    adr = row("adr_pgd", [1, 1, 1, 0, 1], [1, 1, 0, 0, 1])
    trades = row("trades", [1, 1, 0, 1, 1], [1, 0, 0, 0, 0])
    (pair,) = row_pairs([adr, trades])  # adr_trades and adr_pgd_paper are not finished
    assert (pair["row"], pair["reference"]) == ("adr_pgd", "trades")
    assert pair["robust_difference"] == 0.6 - 0.2
    assert pair["paired"]["worst case"] == {"row_only": 2, "reference_only": 0, "p_value": 0.5}
    assert pair["paired"]["clean"]["row_only"] == pair["paired"]["clean"]["reference_only"] == 1


def test_seed_rows_are_of_the_defenses_a_preset_runs():
    from benchmarks import robustness_presets as rp

    names = [row.name for row in rp.rows_of(rp.PRESETS["compactness_sampling_fmnist"])]
    assert names == [
        "adr_pgd_mixed_bfloat16",
        "adr_pgd_seed1_mixed_bfloat16",
        "adr_pgd_seed2_mixed_bfloat16",
        "adr_pgd_gc_quarter_mixed_bfloat16",
        "adr_pgd_gc_quarter_seed1_mixed_bfloat16",
        "adr_pgd_gc_quarter_seed2_mixed_bfloat16",
    ]
    fmnist = {row.name for row in rp.rows_of(rp.PRESETS["fmnist"])}
    assert {"pgd_at_seed1", "adr_pgd_seed1", "pgd_at_seed2", "adr_pgd_seed2"} <= fmnist


def test_compactness_sampling_pairs_each_variant_row_with_its_seed(tmp_path):
    from benchmarks import robustness_presets as rp
    from benchmarks import robustness_report
    from benchmarks.robustness_stats import bits, variant_pairs

    preset = rp.PRESETS["compactness_sampling"]
    rows = rp.rows_of(preset)
    overrides = (("global_compactness_features", 0.25),)
    pairs = variant_pairs(rows, overrides)
    assert pairs == tuple(
        (f"adr_pgd_gc_quarter{s}_mixed_bfloat16", f"adr_pgd{s}_mixed_bfloat16")
        for s in ("", "_seed1", "_seed2", "_seed3")
    )
    by_name = {row.name: row for row in rows}
    assert dict(by_name[pairs[2][0]].overrides) == dict(overrides)
    assert by_name[pairs[2][0]].seed == by_name[pairs[2][1]].seed == 2
    # The precision preset's rows of the same recipe count here too.
    precision = rp.PRESETS["precision"]
    for row in rp.rows_of(precision):
        if row.name in by_name:
            assert rp.fingerprint(precision, row) == rp.fingerprint(preset, by_name[row.name])
    assert rp.fingerprint(preset, by_name[pairs[0][0]]) != rp.fingerprint(
        preset, by_name[pairs[0][1]]
    )

    def result(row, clean, robust):
        return {
            "name": row.name,
            "defense": row.defense,
            "seed": row.seed,
            "group": row.group,
            "overrides": dict(row.overrides),
            "precision": row.precision,
            "evaluation": {"num_examples": 4},
            "clean_accuracy": sum(clean) / 4,
            "robust_accuracy": sum(robust) / 4,
            "attack_accuracy": {a: sum(robust) / 4 for a in preset.eval_attacks},
            "clean_correct_bits": bits(clean),
            "robust_correct_bits": bits(robust),
            "train_seconds": 1.0,
            "eval_seconds": 1.0,
            "row_seconds": 2.0,
            "fingerprint": rp.fingerprint(preset, row),
        }

    rows_dir = tmp_path / "compactness_sampling_rows"
    rows_dir.mkdir()
    outcomes = {  # (clean, worst case) per example; the variant loses example 3 twice
        pairs[0][1]: ([1, 1, 1, 1], [1, 1, 1, 0]),
        pairs[0][0]: ([1, 1, 1, 1], [1, 1, 0, 0]),
        pairs[1][1]: ([1, 1, 1, 0], [1, 0, 1, 0]),
        pairs[1][0]: ([1, 1, 1, 0], [1, 0, 0, 0]),
    }
    for name, (clean, robust) in outcomes.items():
        (rows_dir / f"{name}.json").write_text(json.dumps(result(by_name[name], clean, robust)))
    robustness_report.write_summary(
        "compactness_sampling", preset, rows, str(rows_dir), str(tmp_path)
    )
    summary = json.loads((tmp_path / "compactness_sampling.json").read_text())
    seeds = summary["seed_summary"]["adr_pgd_gc_quarter_mixed_bfloat16"]
    assert seeds["seeds"] == [0, 1] and seeds["robust_accuracy"]["mean"] == (0.5 + 0.25) / 2
    *per_seed, pooled = summary["row_pairs"]
    assert [(p["row"], p["reference"]) for p in per_seed] == list(pairs[:2])
    assert pooled["row"] == "adr_pgd_gc_quarter (seeds 0, 1)"
    assert pooled["robust_difference"] == -0.25
    assert pooled["paired"]["worst case"] == {"row_only": 0, "reference_only": 2, "p_value": 0.5}
    assert "adr_pgd_gc_quarter (seeds 0, 1) − adr_pgd" in (
        (tmp_path / "compactness_sampling.md").read_text()
    )


@pytest.mark.slow
def test_attack_agreement_refuses_a_saved_model_before_attacking():
    # ART needs a Keras model: a SavedModel must be refused at once, not after
    # the minutes our own attacks take.
    saved_model = os.path.join(_ROOT, "saved_models", "fashion_mnist_adr")
    result = _run("attack_agreement", f"--model_path={saved_model}")
    if "Fashion-MNIST" in result.stderr and "not installed" in result.stderr:
        pytest.skip("Fashion-MNIST is not installed")
    assert result.returncode != 0
    assert "is a SavedModel; the ART comparison needs a .keras file" in result.stderr
    assert "apgd-ce" not in result.stdout  # no attack ran


@pytest.mark.slow
def test_attack_agreement_resumes_from_finished_rows(tmp_path):
    # A killed 1,000-image run must keep what finished: rows already in
    # <output>.rows.json are not run again (so ART is not needed here), and a
    # rows file of another configuration is refused rather than mixed in.
    flags = ["--num_examples=20", "--steps=2", "--targets=1", "--square_queries=10"]
    flags += ["--train_examples=300", f"--output={tmp_path / 'agreement.json'}"]
    configuration = {
        "model": "tiny CNN, 300 training images, 3 epochs",
        "num_examples": 20,
        "epsilon": 0.1,
        "steps": 2,
        "targets": 1,
        "square_queries": 10,
        "batch_size": 250,
        "seed": 0,
        "train_examples": 300,
    }
    planted = {"ours_accuracy": 0.55, "ours_seconds": 1.0, "ours_threads": 0}
    art = {"art_accuracy": 0.5, "art_seconds": 3.0, "art_threads": 0, "art_version": "planted"}
    rows = {name: dict(planted) for name in ("apgd-ce", "apgd-t", "fab-t", "square")}
    for name in ("apgd-ce", "apgd-t", "square"):
        rows[name].update(art, ours_minus_art_points=5.0, speedup=3.0)
    rows_path = tmp_path / "agreement.rows.json"

    results_io.write_json_atomic(rows_path, {"configuration": configuration, "rows": rows})
    result = _run("attack_agreement", *flags, "--steps=3")
    if "Fashion-MNIST" in result.stderr and "not installed" in result.stderr:
        pytest.skip("Fashion-MNIST is not installed")
    assert result.returncode != 0
    assert "holds rows of another configuration" in result.stderr
    assert json.loads(rows_path.read_text())["rows"] == rows  # untouched

    _benchmark("attack_agreement", *flags)
    results = json.loads((tmp_path / "agreement.json").read_text())
    assert results["attacks"] == rows  # nothing ran again
    assert results["art_version"] == "planted"
    suite = results["suite"]  # the suite itself always runs
    robust, clean = float(suite["autoattack_acc"]), float(suite["clean_acc"])  # RobustBench: "%.2f"
    assert suite["n_examples"] == 20 and 0 <= robust <= clean
    assert results["suite_minus_worst_art_points"] == pytest.approx(robust - 50, abs=0.01)


def test_precision_speed_names_a_capped_onednn_in_the_summary():
    from benchmarks import precision_speed_report

    note = precision_speed_report._isa_note({"onednn_max_cpu_isa": "AVX512_CORE_BF16"})
    assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in note
    assert precision_speed_report._isa_note({"onednn_max_cpu_isa": None}) == ""
    assert precision_speed_report._isa_note({}) == ""  # rows from before the field


def test_frontier_curve_follows_the_family_knob_not_clean_accuracy():
    from benchmarks import robustness_frontier, robustness_frontier_report

    def entry(point, epsilon, seed, clean, robust):
        return {
            "family": "pgd_at",
            "ema": False,
            "point": point,
            "seed": seed,
            "overrides": {"attack_epsilon": epsilon},
            "clean_accuracy": clean,
            "robust_accuracy": robust,
        }

    entries = [
        entry("eps0p16", 0.16, 0, 0.856, 0.70),
        entry("eps0p14", 0.14, 0, 0.855, 0.74),
        entry("eps0p14", 0.14, 1, 0.853, 0.72),
        entry("eps0p1", 0.10, 0, 0.866, 0.727),
    ]
    # By clean accuracy the order would be eps0p14 (85.4), eps0p16 (85.6), eps0p1.
    curve = robustness_frontier.curve(entries, "pgd_at", ema=False)
    assert [runs[0]["point"] for _, _, runs in curve] == ["eps0p1", "eps0p14", "eps0p16"]
    assert curve[1][:2] == pytest.approx((85.4, 73.0))  # the mean over the seeds run
    assert robustness_frontier.curve(entries, "trades", ema=False) == []
    assert robustness_frontier_report.zoom_box(entries) is None  # no ADR run to zoom on
    # Seed 0's line in knob order: 0.1 (86.6) -> 0.14 (85.5) -> 0.16 (85.6), then a
    # larger epsilon that turns back (more clean accuracy, far less robust).
    turned = entries + [entry("eps0p2", 0.2, 0, 0.864, 0.57)]
    # 85.55 is crossed by 0.1-0.14 (73.94) and 0.14-0.16 (72.0); 85.7 by 0.1-0.14
    # (73.76) and 0.16-0.2 (68.4): the highest crossing counts.
    assert robustness_frontier.curve_height(turned, "pgd_at", 0, 0.8555) == pytest.approx(
        0.74 - 0.013 / 22
    )
    assert robustness_frontier.curve_height(turned, "pgd_at", 0, 0.857) == pytest.approx(
        0.74 - 0.013 * 2 / 11
    )
    assert robustness_frontier.curve_height(turned, "pgd_at", 0, 0.87) is None
    assert robustness_frontier.curve_height(turned, "trades", 0, 0.86) is None
    entries.append({**entry("adr", 0.0, 0, 0.85, 0.75), "family": "adr_pgd"})
    side, below, above = robustness_frontier_report._ZOOM_MARGINS
    assert robustness_frontier_report.zoom_box(entries) == pytest.approx(
        (85 - side, 85 + side, 75 - below, 75 + above)
    )


def test_frontier_verdict_tells_a_curve_still_to_run_from_one_that_cannot_reach_adr():
    from benchmarks import robustness_frontier, robustness_frontier_report

    def entry(point, family, seed, clean, robust):
        return {
            "family": family,
            "ema": False,
            "point": point,
            "seed": seed,
            "clean_accuracy": clean,
            "robust_accuracy": robust,
            "result": {"evaluation": {"num_examples": 4}},  # no per-example bits: no sign test
        }

    entries = [entry("adr", "adr_pgd", seed, 0.85, 0.75) for seed in (0, 1, 2)]
    entries += [
        entry("eps0p1", "pgd_at", 0, 0.86, 0.72),
        entry("eps0p14", "pgd_at", 0, 0.84, 0.74),
        # Seeds 1 and 2: both PGD-AT points land above ADR's clean accuracy.
        *(
            entry(p, "pgd_at", s, c, r)
            for s in (1, 2)
            for p, c, r in (("a", 0.86, 0.73), ("b", 0.87, 0.72))
        ),
        entry("beta6", "trades", 0, 0.84, 0.70),
        entry("beta1", "trades", 0, 0.88, 0.66),
    ]
    chosen = {"adr_point": "adr"}
    waiting = robustness_frontier.verdict(entries, chosen, {("pgd_at", 1), ("pgd_at", 2)})
    assert waiting["unreachable_seeds"] == {} and waiting["seeds_complete"] is False
    assert waiting["per_seed"][1]["families"]["pgd_at"]["unreachable"] is False
    assert waiting["moves_frontier"] is None  # seeds 1 and 2 may still gain
    assert "(seeds incomplete)" in "\n".join(robustness_frontier_report._verdict_lines(waiting))

    done = robustness_frontier.verdict(entries, chosen, {("pgd_at", 0)})  # seed 0: a curve point
    assert done["unreachable_seeds"] == {"pgd_at": [1, 2]} and done["seeds_complete"] is True
    assert done["gain_seeds"] == [0] and done["mean_gain_over_best"] == pytest.approx(0.02)
    # Undecided all the same: the bar is a gain at every seed, never an extrapolated one.
    assert done["moves_frontier"] is None
    lines = "\n".join(robustness_frontier_report._verdict_lines(done))
    assert "(seeds incomplete)" not in lines
    assert "at seeds 1, 2 the PGD-AT curve does not reach ADR's clean accuracy" in lines
    assert "every planned point has run" in lines
    # No interpolation: seed 1's most robust PGD-AT point that is as accurate as ADR.
    over = done["per_seed"][1]["families"]["pgd_at"]["over_more_accurate"]
    assert over == {"point": "a", "robust": 0.73, "gain": pytest.approx(0.02)}
    assert "`a`, has 73.0 (ADR +2.0 points)" in lines
    assert done["per_seed"][0]["families"]["pgd_at"]["over_more_accurate"]["point"] == "eps0p1"
    assert (
        "+2.0 points over the PGD-AT curve (seed 0 only: at seeds 1, 2 that curve does not "
        "reach ADR's clean accuracy)" in robustness_frontier_report.headline(done)
    )


def test_frontier_summary_chooses_on_validation_and_interpolates_the_baselines(tmp_path):
    import dataclasses

    from benchmarks import robustness_frontier_report, robustness_report
    from benchmarks import robustness_presets as rp
    from benchmarks.robustness_stats import bits

    preset = dataclasses.replace(
        rp.PRESETS["frontier"], seeded_points=("adr_pgd_x1", "trades_beta6", "trades_beta3")
    )
    rows = rp.rows_of(preset)
    by_point = {}
    for row in rows:
        by_point[(row.name.replace(f"_seed{row.seed}", ""), row.seed)] = row
    tag = "_mixed_bfloat16"
    # (point, seed): (test clean, test worst case, validation clean, validation robust)
    numbers = {
        ("pgd_at_eps0p1", 0): (0.86, 0.72, 0.87, 0.73),
        ("pgd_at_eps0p12", 0): (0.84, 0.73, 0.85, 0.74),
        ("pgd_at_eps0p14", 0): (0.82, 0.74, 0.83, 0.75),
        ("trades_beta6", 0): (0.845, 0.735, 0.855, 0.745),
        ("trades_beta3", 0): (0.87, 0.72, 0.875, 0.73),
        ("adr_pgd_x1", 0): (0.85, 0.76, 0.86, 0.78),
        ("adr_pgd_x0p5", 0): (0.855, 0.75, 0.865, 0.77),  # test-best would be chosen on test
        ("adr_pgd_x2", 0): (0.84, 0.77, 0.85, 0.78),  # ties x1 with less clean accuracy
        ("adr_pgd_x1_ema", 0): (0.86, 0.765, 0.87, 0.785),  # EMA points are not candidates
        ("adr_pgd_x1_pgd5", 0): (0.86, 0.77, 0.87, 0.79),  # nor adr-train's default point
        ("adr_pgd_x1", 1): (0.85, 0.75, 0.86, 0.77),
        ("trades_beta6", 1): (0.845, 0.735, 0.855, 0.745),
        ("trades_beta3", 1): (0.87, 0.72, 0.875, 0.73),
    }
    rows_dir = tmp_path / "frontier_rows"
    rows_dir.mkdir()
    for (point, seed), (clean, robust, val_clean, val_robust) in numbers.items():
        row = by_point[(point + tag, seed)]
        result = {
            "name": row.name,
            "defense": row.defense,
            "seed": seed,
            "overrides": dict(row.overrides),
            "ema_momentum": row.ema_momentum,
            "evaluation": {"num_examples": 4},
            "clean_accuracy": clean,
            "robust_accuracy": robust,
            "attack_accuracy": {a: robust for a in preset.eval_attacks},
            "clean_correct_bits": bits([1, 1, 1, 0]),
            "robust_correct_bits": bits([1, 1, 0, 0] if point.startswith("adr") else [1, 0, 0, 0]),
            "history": {"val_accuracy": [0.5, val_clean], "val_adv_accuracy": [0.3, val_robust]},
            "train_seconds": 1.0,
            "eval_seconds": 1.0,
            "row_seconds": 2.0,
            "fingerprint": rp.fingerprint(preset, row),
        }
        (rows_dir / f"{row.name}.json").write_text(json.dumps(result))
    robustness_report.write_summary("frontier", preset, rows, str(rows_dir), str(tmp_path))
    summary = json.loads((tmp_path / "frontier.json").read_text())
    chosen = summary["choices_on_validation"]
    assert chosen["adr_point"] == "adr_pgd_x1" + tag
    families = {r["point"]: r["family"] for r in summary["rows"]}
    assert families["adr_pgd_x1_pgd5" + tag] == "default"
    assert chosen["brackets"] == {
        "pgd_at": ["pgd_at_eps0p12" + tag, "pgd_at_eps0p1" + tag],
        "trades": ["trades_beta6" + tag, "trades_beta3" + tag],
    }
    verdict = summary["verdict"]
    seed0, seed1 = verdict["per_seed"]
    # PGD-AT at 0.85 clean: halfway between (0.84, 0.73) and (0.86, 0.72).
    assert seed0["families"]["pgd_at"]["interpolated_robust"] == pytest.approx(0.725)
    # TRADES: a fifth of the way from (0.845, 0.735) to (0.87, 0.72).
    assert seed0["families"]["trades"]["interpolated_robust"] == pytest.approx(0.732)
    assert seed0["best_family"] == "trades"
    assert seed0["gain_over_best"] == pytest.approx(0.028)
    assert seed1["gain_over_best"] == pytest.approx(0.018)
    assert seed1["families"]["pgd_at"]["gain"] is None  # no seed-1 PGD-AT runs
    assert verdict["mean_gain_over_best"] == pytest.approx(0.023)
    assert verdict["gain_seeds"] == [0, 1]  # the seeds the mean is over
    assert verdict["moves_frontier"] is True and verdict["seeds_complete"] is False
    nearest = verdict["nearest_baseline_test"]
    assert nearest["baseline_point"] == "trades_beta6" + tag and nearest["seeds"] == 2
    assert nearest["worst case"] == {"adr_only": 2, "baseline_only": 0, "p_value": 0.5}
    # trades_beta6 and beta3 ran at both of ADR's seeds (0 and 1); PGD-AT at seed 0 only.
    tested = verdict["seeded_baseline_tests"]
    assert [t["baseline_point"] for t in tested] == ["trades_beta6" + tag, "trades_beta3" + tag]
    assert tested[0] == nearest
    assert summary["ema_pairs"][0]["robust_difference"] == pytest.approx(0.005)
    text = (tmp_path / "frontier.md").read_text()
    assert "ADR moves the frontier" in text and "**yes**" in text
    assert robustness_frontier_report.headline(verdict) == (
        "**ADR moves the robustness-accuracy frontier here** (the bar: at least +1 point of "
        "worst-case accuracy over the best baseline curve at equal clean accuracy, in every "
        "seed). The ADR point chosen on validation has 85.0% clean and 75.5% worst-case "
        "accuracy (seeds 0, 1, mean), +3.5 points over the PGD-AT curve (seed 0 only) and "
        "+2.3 points over the TRADES curve (seeds 0, 1: +2.8, +1.8)."
    )
    assert robustness_frontier_report.headline(verdict) in text
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"

    # A seed where ADR gains less than a point: no.
    numbers[("adr_pgd_x1", 1)] = (0.85, 0.735, 0.86, 0.77)
    row = by_point[("adr_pgd_x1" + tag, 1)]
    result = json.loads((rows_dir / f"{row.name}.json").read_text())
    result["robust_accuracy"] = 0.735
    (rows_dir / f"{row.name}.json").write_text(json.dumps(result))
    robustness_report.write_summary("frontier", preset, rows, str(rows_dir), str(tmp_path))
    assert (
        json.loads((tmp_path / "frontier.json").read_text())["verdict"]["moves_frontier"] is False
    )

    # ADR's clean accuracy below every measured baseline point at seed 0:
    # no best family and no verdict yet, whatever the other seed gains.
    result["robust_accuracy"] = 0.75
    (rows_dir / f"{row.name}.json").write_text(json.dumps(result))
    first = by_point[("adr_pgd_x1" + tag, 0)]
    result = json.loads((rows_dir / f"{first.name}.json").read_text())
    result["clean_accuracy"] = 0.815
    (rows_dir / f"{first.name}.json").write_text(json.dumps(result))
    robustness_report.write_summary("frontier", preset, rows, str(rows_dir), str(tmp_path))
    verdict = json.loads((tmp_path / "frontier.json").read_text())["verdict"]
    assert verdict["per_seed"][0]["gain_over_best"] is None
    assert verdict["moves_frontier"] is None
    assert "**not decided yet**" in (tmp_path / "frontier.md").read_text()


def test_thread_cpu_seconds_reads_names_with_spaces_and_parentheses(tmp_path):
    import os

    from benchmarks.precision_speed_measure import _thread_cpu_seconds

    tick = 1 / os.sysconf("SC_CLK_TCK")
    for tid, name, utime, stime in (("11", "tf_Compute", 30, 10), ("12", "a (b) c", 5, 0)):
        (tmp_path / tid).mkdir()
        fields = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 5
        (tmp_path / tid / "stat").write_text(f"{tid} ({name}) {' '.join(fields)}\n")
    (tmp_path / "13").mkdir()  # a thread that ended while being read
    threads = _thread_cpu_seconds(str(tmp_path))
    assert threads.keys() == {"11", "12"}
    assert threads["11"] == ("tf_Compute", pytest.approx(40 * tick))
    assert threads["12"] == ("a (b) c", pytest.approx(5 * tick))
    assert _thread_cpu_seconds(str(tmp_path / "missing")) is None


def test_a_round_records_the_cores_of_the_process_and_its_threads():
    import threading
    import time

    from benchmarks.precision_speed_measure import _round

    def busy_step():  # two threads at work for 0.1 s
        def spin():
            end = time.perf_counter() + 0.1
            while time.perf_counter() < end:
                pass

        worker = threading.Thread(target=spin)
        worker.start()
        spin()
        worker.join()

    times, record = _round(busy_step, 3)
    assert len(times) == 3 and record["median_step_seconds"] >= 0.1
    # Only lower bounds: another process may take a core from this one.
    assert record["machine_busy_cores"] >= record["process_cores"] - 0.1
    assert 0 < record["process_cores"] <= 2.2
    assert len(record["busiest_threads"]) <= 3
    assert all(cores >= 0 for cores, _ in record["busiest_threads"])


def _round_row(policy, defense, *rounds):
    """A precision_speed row whose rounds are `(s/step, process cores, machine busy)`."""
    return {
        "policy": policy,
        "defense": defense,
        "median_step_seconds": rounds[0][0],
        "rounds": [
            {"median_step_seconds": s, "process_cores": c, "machine_busy_cores": m}
            for s, c, m in rounds
        ],
    }


def test_round_targets_of_issue_30_count_only_free_machine_rounds():
    from benchmarks import precision_speed_rounds

    rows = [
        _round_row("float32", "pgd_at", (0.45, 1.9, 1.9), (0.47, 1.9, 1.95)),
        _round_row("float32", "pgd_at", (0.90, 0.9, 2.0)),  # another process took a core
        # 0.46 / 0.27 = 1.70; the one-core round (0.65 s, 1.0 core) fails both targets.
        _round_row("mixed_bfloat16", "pgd_at", (0.26, 1.8, 1.8), (0.27, 1.8, 1.85)),
        _round_row("mixed_bfloat16", "adr_pgd", (0.26, 1.8, 1.8), (0.65, 1.0, 1.05)),
        _round_row("float32", "adr_pgd", (0.46, 1.9, 1.9)),
    ]
    analysis = precision_speed_rounds.analyse_rounds(rows)
    by_key = {(c["defense"], c["policy"]): c for c in analysis["configurations"]}
    assert by_key[("pgd_at", "float32")] == {
        "defense": "pgd_at",
        "policy": "float32",
        "rounds": 3,
        "free_rounds": 2,
        "median_step_seconds": pytest.approx(0.46),
    }
    values = {t["target"]: (round(t["value"], 3), t["met"]) for t in analysis["targets"]}
    speed = "round of {} at least 1.6x faster than float32's median round"
    cores = "every free {} round of {} keeps at least 1.3 cores busy"
    assert values == {
        f"every free mixed_bfloat16 {speed.format('pgd_at')}": (round(0.46 / 0.27, 3), True),
        cores.format("float32", "pgd_at"): (1.9, True),
        cores.format("mixed_bfloat16", "pgd_at"): (1.8, True),
        f"every free mixed_bfloat16 {speed.format('adr_pgd')}": (round(0.46 / 0.65, 3), False),
        cores.format("float32", "adr_pgd"): (1.9, True),
        cores.format("mixed_bfloat16", "adr_pgd"): (1.0, False),
    }
    text = "\n".join(precision_speed_rounds.round_lines(rows))
    assert "| pgd_at | float32 | - | 0.900 (0.90 / 2.00) * |" in text
    assert "| adr_pgd | mixed_bfloat16 | - | 0.260 (1.80 / 1.80), 0.650 (1.00 / 1.05) |" in text
    assert "**not met**" in text
    # Rows from before --rounds have none: no section.
    assert precision_speed_rounds.round_lines([{"policy": "float32", "defense": "pgd_at"}]) == []


def test_frontier_defaults_compare_one_change_at_a_time_with_the_default():
    from benchmarks import frontier_defaults as fd
    from benchmarks import robustness_presets as rp
    from benchmarks.robustness_stats import bits

    preset = rp.PRESETS["frontier"]
    rows = rp.rows_of(preset)
    tag = "_mixed_bfloat16"
    listed = fd.candidates(rows, "adr_pgd_x2" + tag)
    assert [(r.name, c) for r, c in listed] == [
        ("adr_pgd_x1_pgd5" + tag, fd.TODAY),
        ("adr_pgd_x1" + tag, "PGD-10 training attack"),
        ("adr_pgd_x2" + tag, "PGD-10, the weight scale chosen on validation"),
        ("adr_pgd_x1_ema" + tag, "PGD-10, EMA of the weights"),
    ]
    steps = [rp.adr_config(preset, r).attack.steps for r, _ in listed]
    assert steps == [5, 10, 10, 10]  # the default trains as adr-train does
    # The chosen point at scale 1 is not listed twice.
    assert len(fd.candidates(rows, "adr_pgd_x1" + tag)) == 3

    def evaluated(clean, robust):
        return {
            "clean_accuracy": sum(clean) / 4,
            "robust_accuracy": sum(robust) / 4,
            "clean_correct_bits": bits(clean),
            "robust_correct_bits": bits(robust),
            "evaluation": {"num_examples": 4},
        }

    models = [
        (listed[0][0], fd.TODAY, evaluated([1, 1, 1, 0], [1, 1, 0, 0])),
        (listed[1][0], listed[1][1], evaluated([1, 1, 1, 1], [1, 1, 1, 0])),
        (listed[3][0], listed[3][1], evaluated([1, 1, 1, 0], [0, 1, 0, 0])),
    ]
    decision = fd.decide(models)
    assert decision["best"] == "adr_pgd_x1" + tag and decision["change"] is True
    first, ema = decision["comparisons"]
    assert first["robust_difference"] == pytest.approx(0.25)
    assert first["sign_test"]["worst case"] == {
        "candidate_only": 1,
        "default_only": 0,
        "p_value": 1.0,
    }
    assert ema["sign_test"]["worst case"]["default_only"] == 1
    text = fd.markdown(preset, {**decision, "not_evaluated": []}, models, {})
    assert "Decision: **change**" in text and "`adr_pgd_x1_pgd5" in text

    # No candidate above the default: keep it.
    models[0] = (listed[0][0], fd.TODAY, evaluated([1, 1, 1, 1], [1, 1, 1, 1]))
    decision = fd.decide(models)
    assert decision["change"] is False
    text = fd.markdown(preset, {**decision, "not_evaluated": ["x"]}, models, {})
    assert "Decision: **keep**" in text and "Provisional: x" in text


def test_frontier_defaults_evaluate_on_the_split_the_rows_validated_on(tmp_path):
    import dataclasses
    import types

    import keras

    from benchmarks import frontier_defaults as fd
    from benchmarks import robustness_presets as rp
    from keras_adr import _run_inputs, data

    preset = dataclasses.replace(
        rp.PRESETS["frontier"],
        validation_examples=64,
        eval_attacks=("pgd5", "apgd_ce5"),
        apgd_targets=1,
    )
    info = data.info(preset.dataset)
    options = types.SimpleNamespace(
        train_examples=None, validation_examples=64, dataset=preset.dataset
    )
    _, validation_split, _ = _run_inputs.splits(options, info)
    try:
        data.load(preset.dataset, validation_split, batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    checkpoint = str(tmp_path / "best.keras")
    model.save(checkpoint)

    result = fd.evaluate(checkpoint, preset)
    assert result["split"] == validation_split  # the images every row selected on
    assert result["evaluation"]["num_examples"] == 64
    assert 0 <= result["robust_accuracy"] <= result["clean_accuracy"] <= 1
    assert list(result["attack_accuracy"]) == ["pgd5", "apgd_ce5"]


_ADR_TRAIN_FLAGS = """
import json, sys
from absl import flags
from keras_adr.cli import train
F = flags.FLAGS
for argv in json.loads(sys.stdin.read()):
    F.unparse_flags()
    F(["adr-train", *argv])
    print(json.dumps([train.adr_config_from_flags().result_config(), F.precision,
                      F.ema_momentum, F.validation_epsilon, F.seed, F.epochs]))
"""


def test_reference_export_chooses_on_validation_and_names_its_adr_train_command():
    import shlex

    from benchmarks import export_reference
    from benchmarks import robustness_presets as rp

    models = [{"row": "today", "robust_accuracy": 0.7}, {"row": "b", "robust_accuracy": 0.7}]
    assert export_reference.choose(models)["row"] == "today"  # a tie keeps the default
    models.append({"row": "c", "robust_accuracy": 0.71})
    assert export_reference.choose(models)["row"] == "c"

    # The command of a row trains it as the benchmark did (ADRConfig and options).
    preset = rp.PRESETS["frontier"]
    points = ("pgd_at_eps0p12_ema", "pgd_at_eps0p14", "adr_pgd_x0p5", "adr_pgd_x1_pgd5")
    rows = [r for r in rp.rows_of(preset) if r.name in {f"{p}_mixed_bfloat16" for p in points}]
    assert len(rows) == len(points)
    commands = []
    for row in rows:
        result = {
            "defense": row.defense,
            "adr_config": rp.adr_config(preset, row).get_config(),
            "overrides": dict(row.overrides),
            "precision": row.precision,
            "seed": row.seed,
            "ema_momentum": row.ema_momentum,
            "validation_epsilon": preset.validation_epsilon,
        }
        command = shlex.split(export_reference.train_command(result))
        assert command[0] == "adr-train"
        commands.append(command[1:])
    out = subprocess.run(
        [sys.executable, "-c", _ADR_TRAIN_FLAGS],
        input=json.dumps(commands),
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    ).stdout.splitlines()[-len(rows) :]
    for row, line in zip(rows, out):
        config = rp.adr_config(preset, row)
        parsed, policy, ema, validation_epsilon, seed, epochs = json.loads(line)
        assert parsed == json.loads(json.dumps(config.result_config())), row.name
        assert (policy, ema, seed, epochs) == (row.precision, row.ema_momentum, 0, preset.epochs)
        expected = None if config.attack.epsilon == preset.validation_epsilon else 0.1
        assert validation_epsilon == expected, row.name


# The cpu study's rows were measured before the bounded form (docs/benchmarks.md):
# rerunning that preset trains them again.
_COMMITTED_CURRENT = (
    "fmnist",
    "precision",
    "compactness_sampling",
    "compactness_sampling_fmnist",
    "frontier",
)


@pytest.mark.parametrize("name", _COMMITTED_CURRENT)
def test_committed_rows_are_the_presets_rows(name):
    """A rerun of a study resumes: its committed rows still match their fingerprints."""
    from benchmarks import robustness_presets as rp

    preset = rp.PRESETS[name]
    rows = {row.name: row for row in rp.rows_of(preset)}
    rows_dir = os.path.join(_ROOT, "benchmarks", "results", f"{name}_rows")
    files = sorted(f for f in os.listdir(rows_dir) if f.endswith(".json"))
    assert files
    for file in files:
        result = results_io.read_json(os.path.join(rows_dir, file))
        assert result["fingerprint"] == rp.fingerprint(preset, rows[result["name"]]), file


def test_studies_keep_their_rows_when_the_library_defaults_move(monkeypatch):
    """Pinned to PGD-5 and unit ADR weights, the studies do not follow adr-train's defaults."""
    import dataclasses

    from benchmarks import robustness_presets as rp
    from keras_adr import presets

    assert (rp.PGD5_RECIPE.attack_steps, rp.PGD5_RECIPE.attack_step_size) == (5, 0.05)
    before = {
        (name, row.name): rp.fingerprint(preset, row)
        for name, preset in rp.PRESETS.items()
        for row in rp.rows_of(preset)
    }
    doubled = {term: 2.0 for term in rp.ABLATED_TERMS}
    monkeypatch.setitem(presets._PRESETS, "adr_pgd", dict(objective="pgd", **doubled))
    monkeypatch.setitem(presets._PRESETS, "adr_trades", dict(objective="trades", **doubled))
    assert presets.get("adr_pgd").local_compactness == 2.0
    after = {
        (name, row.name): rp.fingerprint(preset, row)
        for name, preset in rp.PRESETS.items()
        for row in rp.rows_of(preset)
    }
    assert after == before
    assert rp.pinned_config("adr_pgd", local_compactness=0.5).local_compactness == 0.5
    assert dataclasses.asdict(rp.pinned_config("pgd_at")) == dataclasses.asdict(
        presets.get("pgd_at")
    )
