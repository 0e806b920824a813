"""One process of `benchmarks/precision_speed.py`: build, warm up, time, describe.

`measure` runs in the child process that `precision_speed.run_child`
starts; its row says what the process is (CPU, threads, environment), what
its timed steps took and cost (CPU seconds, the machine's idle and steal
time), the same after recompiling the step, and the parts of a step timed
on their own.
"""

import os
import resource
import statistics
import time

from benchmarks import op_profile, results_io


def _cpu_model():
    return results_io.cpu_info()[0]


def _status(policy, defense, settings):
    """What the child knows about its process before timing."""
    import tensorflow as tf

    try:
        with open("/proc/sys/kernel/randomize_va_space") as f:
            aslr = f.read().strip()
    except OSError:
        aslr = None
    return {
        "policy": policy,
        "defense": defense,
        "pid": os.getpid(),
        "cpu": _cpu_model(),
        "cpus_allowed": sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "aslr": aslr,
        "personality_no_aslr": bool(settings.no_aslr),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        # oneDNN's own cap on the instruction sets its kernels use (e.g.
        # `AVX512_CORE_BF16`: the bfloat16 kernels of a CPU without AMX).
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "load_before": os.getloadavg(),
    }


def measure(policy, defense, settings):
    """One run in this process: the row (without the oneDNN kernels)."""
    results_io.set_threads(settings.threads, settings.inter_op_threads)
    import keras
    import numpy as np

    import keras_adr
    from keras_adr import data, precision

    row = _status(policy, defense, settings)
    row["global_compactness_features"] = settings.global_compactness_features
    keras.utils.set_random_seed(0)
    with precision.policy_scope(policy):
        model = keras_adr.ADRModel(
            keras_adr.models.small_cnn(),
            keras_adr.presets.get(
                defense,
                attack_steps=settings.attack_steps,
                global_compactness_features=settings.global_compactness_features,
            ),
        )
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    batches = (
        data.load(
            "fashion_mnist",
            f"train[:{settings.batch_size * 20}]",
            batch_size=settings.batch_size,
            drop_remainder=True,
        )
        .cache()
        .repeat()
    )
    iterator = iter(batches)
    model.make_train_function()

    def step():
        logs = model.train_function(iterator)
        float(np.asarray(next(iter(logs.values()))))  # Waits for the step.

    _call_seconds(step, settings.warmup)
    first = _time_compiled_step(step, settings)
    row.update(
        step_seconds=[round(t, 5) for t in first["step_seconds"]],
        median_step_seconds=statistics.median(first["step_seconds"]),
        rounds=first["rounds"],
        machine_per_step=first["machine_per_step"],
        per_step=first["per_step"],
        load_after=os.getloadavg(),
    )
    if "op_profile" in first:
        row["op_profile"] = first["op_profile"]
    # The same steps again with the step compiled anew: a slow process whose
    # fresh compilation is fast was slow in its compiled step, not as a whole.
    recompiled = []
    for _ in range(settings.recompilations):
        model.make_train_function(force=True)
        _call_seconds(step, settings.warmup)
        recompiled.append(_time_compiled_step(step, settings))
    if recompiled:
        each = lambda key: [timing[key] for timing in recompiled]
        medians = [statistics.median(times) for times in each("step_seconds")]
        row["recompiled_median_step_seconds"] = medians[0]
        row["recompiled_median_step_seconds_each"] = medians
        # As `machine_per_step`, `per_step` and `op_profile`, for each recompilation.
        row["recompiled_machine_per_step_each"] = each("machine_per_step")
        row["recompiled_per_step_each"] = each("per_step")
        if settings.op_profile:
            row["recompiled_op_profile_each"] = each("op_profile")
    row["part_seconds"] = _part_seconds(model, next(iterator), settings.steps)
    return row


def _time_compiled_step(step, settings):
    """Times `settings.rounds` rounds of `settings.steps` calls of `step`, with CPU use.

    Per round: the median step, the cores this process kept busy, the
    machine's busy and stolen cores, and the busiest threads' cores
    (`_round`): issue 30's one-core rounds (one thread at work) and rounds
    slowed by another process (the machine busier than this process) then
    look different. `machine_per_step` and `per_step` are over all rounds.
    With `settings.op_profile`, then as many calls again under the profiler
    (the same compiled step, so a slow one is still slow): which ops take
    the time.
    """
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    machine_before = _machine_cpu_seconds()
    times, rounds = [], []
    for _ in range(settings.rounds):
        round_times, round_record = _round(step, settings.steps)
        times += round_times
        rounds.append(round_record)
    timing = {
        "step_seconds": times,
        "rounds": rounds,
        "machine_per_step": _machine_per_step(machine_before, _machine_cpu_seconds(), len(times)),
        "per_step": _usage_per_step(
            usage_before, resource.getrusage(resource.RUSAGE_SELF), len(times)
        ),
    }
    if settings.op_profile:
        profiled = []
        space = op_profile.profile(lambda: profiled.extend(_call_seconds(step, 1)), settings.steps)
        timing["op_profile"] = dict(
            op_profile.summarize(space, settings.steps),
            median_step_seconds=statistics.median(profiled),
        )
    return timing


def _round(step, steps):
    """`(step_seconds, record)` of one round of `steps` calls of `step`.

    The record has the round's median step and, over its wall time, the
    cores this process used (CPU seconds / wall seconds), the cores the
    whole machine was busy (user, nice, system, irq, softirq) and stolen by
    the hypervisor, and the three busiest threads' cores.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    machine = _machine_cpu_seconds()
    threads = _thread_cpu_seconds()
    started = time.perf_counter()
    times = _call_seconds(step, steps)
    wall = time.perf_counter() - started
    cores = lambda seconds: round(seconds / wall, 3)
    used = _usage_per_step(usage, resource.getrusage(resource.RUSAGE_SELF), 1)
    record = {
        "median_step_seconds": round(statistics.median(times), 5),
        "process_cores": cores(used["user_cpu_seconds"] + used["system_cpu_seconds"]),
    }
    delta = _machine_per_step(machine, _machine_cpu_seconds(), 1)
    if delta:
        record["machine_busy_cores"] = cores(sum(delta[name] for name in _BUSY_STATES))
        record["machine_steal_cores"] = cores(delta["steal"])
    threads_after = _thread_cpu_seconds()
    if threads and threads_after:
        # Which threads worked: TensorFlow's inter-op threads are named
        # `tf_Compute`, its intra-op pool's keep the process's name.
        by_thread = sorted(
            (
                (seconds - threads.get(tid, (name, 0.0))[1], name)
                for tid, (name, seconds) in threads_after.items()
            ),
            reverse=True,
        )
        record["busiest_threads"] = [[cores(s), name] for s, name in by_thread[:3]]
    return times, record


def _thread_cpu_seconds(task_dir="/proc/self/task"):
    """`{thread id: (name, user + system CPU seconds)}` of this process's threads, or None.

    Linux only (`proc(5)`): None where `task_dir` cannot be read.
    """
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    threads = {}
    for tid in tids:
        try:
            with open(os.path.join(task_dir, tid, "stat")) as f:
                text = f.read()
            # `pid (name) state ...`: the name may hold spaces and parentheses;
            # utime and stime are the 14th and 15th fields.
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 1 :].split()
            threads[tid] = (name, (int(fields[11]) + int(fields[12])) / ticks)
        except (OSError, ValueError, IndexError):
            continue  # The thread ended.
    return threads


def _call_seconds(call, repeats):
    """Wall seconds of each of `repeats` calls of `call()` (which waits for its result)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def _part_seconds(model, batch, repeats):
    """Median seconds of the parts of a step, each compiled on its own.

    Timed after the steps, so that a slow process can be told apart: every
    part slower (the process or the machine) or one part (a kernel).
    """
    import tensorflow as tf

    from keras_adr import graph, losses

    x, y = batch
    x_adv = model.adversarial_examples(x, y)

    def objective_gradients(x, y, x_adv):
        with tf.GradientTape() as tape:
            loss = model.compute_adr_loss(x, y, x_adv)[0]
        return tape.gradient(loss, model.trainable_variables)

    def global_compactness_gradient(y, z, z_adv):
        with tf.GradientTape() as tape:
            tape.watch(z_adv)
            # Raw codes, as the published rows measured (the default is now "rms").
            term = tf.reduce_sum(
                losses.global_compactness_per_example(y, z, z_adv, normalization="none")
            )
        return tape.gradient(term, z_adv)

    # Inference mode: taking the codes must not move BatchNorm statistics.
    (_, z), (_, z_adv) = model.clean_and_adversarial_outputs(x, x_adv, training=False)
    z, z_adv = (tf.cast(graph.flatten_batch(t), tf.float32) for t in (z, z_adv))
    parts = {
        "attack": (tf.function(model.adversarial_examples), (x, y)),
        "objective_and_gradients": (tf.function(objective_gradients), (x, y, x_adv)),
        "inference_forward": (tf.function(lambda x: model(x, training=False)), (x,)),
        "global_compactness_and_gradient": (
            tf.function(global_compactness_gradient),
            (tf.cast(y, tf.int32), z, z_adv),
        ),
    }
    return {
        name: round(_median_call_seconds(function, args, repeats), 5)
        for name, (function, args) in parts.items()
    }


def _median_call_seconds(function, args, repeats):
    """Median wall seconds of `function(*args)` until its outputs are on the host."""
    import numpy as np
    import tensorflow as tf

    call = lambda: [np.asarray(t) for t in tf.nest.flatten(function(*args))]
    _call_seconds(call, 2)  # Traces, then warms up.
    return statistics.median(_call_seconds(call, repeats))


# The first fields of the `cpu` line of /proc/stat, in clock ticks (proc(5)).
_PROC_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
# Of those, the states in which a CPU runs a process (or the kernel for one).
_BUSY_STATES = ("user", "nice", "system", "irq", "softirq")


def _machine_cpu_seconds(path="/proc/stat"):
    """Seconds every CPU of the machine spent in each state since boot, or None.

    `steal` is time the hypervisor gave this VM's CPUs to someone else: a
    process that gets less than its cores then shows it here.
    """
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return {name: int(value) / ticks for name, value in zip(_PROC_STAT_FIELDS, fields[1:])}


def _machine_per_step(before, after, steps):
    """Machine-wide CPU seconds per timed step in each state (all CPUs together)."""
    if before is None or after is None:
        return None
    return {name: round((after[name] - before[name]) / steps, 4) for name in before}


def _usage_per_step(before, after, steps):
    """What the timed steps cost the process beyond wall time, per step.

    A process that spends its time in the kernel (system CPU seconds, page
    faults from memory the allocator returned to the system and maps again)
    or waits (context switches) shows it here, not in the kernels it runs.
    """
    delta = lambda name: (getattr(after, name) - getattr(before, name)) / steps
    return {
        "user_cpu_seconds": round(delta("ru_utime"), 5),
        "system_cpu_seconds": round(delta("ru_stime"), 5),
        "minor_page_faults": round(delta("ru_minflt"), 1),
        "voluntary_context_switches": round(delta("ru_nvcsw"), 1),
        "involuntary_context_switches": round(delta("ru_nivcsw"), 1),
    }
