"""The benchmark workers' pacer: what it reports, and a clock that leaves out the paused time."""

import io
import json

import pytest

from benchmarks.protocol import Pacer


class Coordinator(io.StringIO):
    """Answers ``run`` twice, then ``stop``; each answer comes after ``pause`` seconds of a fake clock."""

    def __init__(self, clock: list, pause: float):
        super().__init__()
        self.clock, self.pause, self.answers = clock, pause, ["run", "run", "stop"]

    def readline(self, *args):
        self.clock[0] += self.pause  # the other variants run their chunks meanwhile
        return self.answers.pop(0) + "\n"


def test_running_clock_leaves_out_the_time_paused_for_other_variants(monkeypatch):
    now = [1000.0]
    out = io.StringIO()
    pacer = Pacer(chunk=3, warmup=2, stdin=Coordinator(now, pause=50.0), stdout=out, clock=lambda: now[0])
    exited = []

    def leave(code):  # the worker's os._exit, without ending the test process
        exited.append(code)
        raise SystemExit

    monkeypatch.setattr("benchmarks.protocol.os._exit", leave)
    pacer.start()
    start = pacer.running_clock()
    try:
        for _ in range(20):
            now[0] += 1.0  # one second a step
            pacer.step_done(1)
    except SystemExit:
        pass
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == ["first", "ready", "timed", "timed", "done"] and exited == [0]
    steps = 1 + 2 + 3 + 3  # first, warmup, two timed chunks
    assert pacer.count == steps
    assert pacer.running_clock() - start == steps * 1.0  # three pauses of 50 s are not counted
    assert now[0] - 1000.0 == steps * 1.0 + 3 * 50.0


def test_leave_one_out_chooses_callback_sets_by_class_name():
    from benchmarks.leave_one_out import choose_callbacks

    class A: ...
    class B: ...
    class C: ...

    defaults = [A(), B(), C()]
    names = lambda spec: [type(c).__name__ for c in choose_callbacks(defaults, spec)]  # noqa: E731
    assert names("bare") == [] and names("default") == ["A", "B", "C"]
    assert names("without:A,C") == ["B"] and names("only:A,C") == ["A", "C"]
    with pytest.raises(ValueError, match=r"\['D'\], not among the defaults"):
        choose_callbacks(defaults, "without:A,D")
    with pytest.raises(ValueError, match="use bare, default, without:"):
        choose_callbacks(defaults, "-A")


def test_leave_one_out_times_one_window_per_set_and_round():
    from benchmarks.leave_one_out import run, table

    with pytest.raises(ValueError, match="multiples of steps_per_execution=2"):
        run("mlp", ["bare"], steps_per_execution=2, window=5)
    seconds = run("mlp", ["bare", "only:NaNDetector"], steps_per_execution=2, window=6, rounds=2)
    assert [len(v) for v in seconds.values()] == [2, 2] and all(s > 0 for v in seconds.values() for s in v)
    assert table(seconds, 6).splitlines()[2].startswith("| bare | ") and "1.000 (1.00-1.00)" in table(seconds, 6)
