"""The throughput summary: measured over logged windows only, never divided by a window that did not run."""

from types import SimpleNamespace

from preference_dpo.metrics import ThroughputCallback

ARGS = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=1, world_size=1, logging_steps=10)


def test_a_run_with_no_logged_step_reports_no_throughput():
    callback = ThroughputCallback()
    state = SimpleNamespace(global_step=0)
    callback.on_train_begin(ARGS, state, None)
    state.global_step = 1  # one step, fewer than LOGGING_STEPS: no window closed
    summary = callback.summary(ARGS, state, wall_seconds=3.0)
    assert "samples/s" not in summary and "tokens/s" not in summary
    assert "wall 3 s, 1 steps, throughput not measured (no training step was logged; LOGGING_STEPS=10)" in summary


def test_throughput_counts_only_the_timed_steps(monkeypatch):
    clock = iter([100.0, 102.0])  # train begin, then the log at step 10: 2 s
    monkeypatch.setattr("preference_dpo.metrics.time.perf_counter", lambda: next(clock))
    callback = ThroughputCallback()
    state = SimpleNamespace(global_step=0)
    callback.on_train_begin(ARGS, state, None)
    state.global_step = 10
    logs = {"loss": 0.5, "num_tokens": 4000}
    callback.on_log(ARGS, state, None, logs=logs)
    assert logs["samples_per_second"] == 10 * 8 / 2.0 and logs["tokens_per_second"] == 2000.0
    state.global_step = 13  # three more steps after the last log: not timed, not counted
    assert "40.00 samples/s (pairs), 2000 tokens/s over 2 s" in callback.summary(ARGS, state, wall_seconds=5.0)
