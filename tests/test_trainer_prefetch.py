"""Prefetch thread, ragged last batches (drop / pad), and data placement off the loop's thread."""

from __future__ import annotations

import threading
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from callbacks import Callback, NaNDetector
from conftest import TinyMLP, make_data
from trainer import ArrayLoader, Trainer, losses
from trainer.prefetch import BusyClock, Feed, Prefetcher


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "nnx-trainer-prefetch"]


def test_prefetcher_places_items_in_order_and_ends():
    items = [np.full(3, i, np.float32) for i in range(5)]
    with Prefetcher(iter(items), depth=2) as ahead:
        got = list(ahead)
    assert all(isinstance(x, jax.Array) for x in got)
    assert [int(x[0]) for x in got] == list(range(5))
    assert not ahead.alive


def test_prefetcher_reraises_the_original_error_in_the_consumer():
    error = RuntimeError("disk gone")

    def source():
        yield np.zeros(2)
        raise error

    ahead = Prefetcher(source(), depth=2)
    next(ahead)
    with pytest.raises(RuntimeError) as info:
        next(ahead)
    assert info.value is error  # the same object, with the traceback from the thread
    ahead.close()
    assert not ahead.alive


def test_closing_in_the_middle_stops_a_producer_blocked_on_a_full_queue():
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield np.zeros(2)

    ahead = Prefetcher(endless(), depth=2)
    next(ahead)
    ahead.close()
    assert not ahead.alive
    count = len(pulled)
    assert count <= 5  # depth 2: it never ran far ahead


@pytest.mark.parametrize("depth", [0, -1, 1.5])
def test_prefetcher_refuses_a_bad_depth(depth):
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter([]), depth=depth)


def test_the_next_batch_is_loaded_while_a_step_runs(data):
    """Batch 2 is pulled from the iterator while the loop is still inside step 1's hooks."""
    second_pulled = threading.Event()
    batches = list(ArrayLoader(data, 16, shuffle=False))
    placed_in = []

    class Source:
        def __iter__(self):
            for i, batch in enumerate(batches):
                if i == 1:
                    second_pulled.set()
                yield batch

    class WaitForSecond(Callback):
        seen = None

        def on_step_end(self, trainer, step, metrics):
            if step == 1:
                self.seen = second_pulled.wait(timeout=30)

    class Placing(Trainer):
        def place_batch(self, batch):
            placed_in.append(threading.current_thread().name)
            return super().place_batch(batch)

    spy = WaitForSecond()
    trainer = Placing(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=3, callbacks=[spy], prefetch=2)
    trainer.fit(Source())
    assert spy.seen is True
    assert set(placed_in) == {"nnx-trainer-prefetch"}
    assert not prefetch_threads()


def test_an_iterator_error_surfaces_in_fit_and_leaves_no_thread(data):
    error = OSError("file vanished")
    batches = list(ArrayLoader(data, 16))

    class Broken:
        def __iter__(self):
            yield batches[0]
            yield batches[1]
            raise error

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=1, prefetch=2)
    with pytest.raises(OSError) as info:
        trainer.fit(Broken())
    assert info.value is error
    assert trainer.step == 2
    assert not prefetch_threads()


def test_stopping_mid_epoch_leaves_no_thread(data):
    class StopAt(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 2:
                trainer.request_stop("test")

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=5, callbacks=[StopAt()], prefetch=2)
    trainer.fit(ArrayLoader(make_data(n=640), 16))  # 40 batches: the thread is blocked on a full queue
    assert trainer.step == 2
    assert not prefetch_threads()


def test_a_source_stuck_in_next_is_warned_about_and_never_hangs_the_stop(data, monkeypatch):
    """A stop while the thread waits inside the source (a queue whose producer died): fit returns after
    the close timeout with a warning; the thread ends once the source returns."""
    from trainer import prefetch

    monkeypatch.setattr(prefetch, "CLOSE_TIMEOUT_SECONDS", 0.2)
    release, batches = threading.Event(), list(ArrayLoader(data, 16))

    def stuck():
        yield from batches[:4]
        release.wait()  # never set until the test says so
        yield batches[4]

    class StopAt(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 3:
                trainer.request_stop("test")

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=1, callbacks=[StopAt()], prefetch=2)
    with pytest.warns(RuntimeWarning, match=r"still inside the data source's next\(\) after 0.2 s"):
        trainer.fit(stuck())
    left = prefetch_threads()
    assert trainer.step == 3 and len(left) == 1
    release.set()
    left[0].join()  # it ends once the source returns: nothing left behind for good
    assert not prefetch_threads()


def test_prefetch_off_trains_identically(data):
    runs = []
    for depth in (0, 3):
        trainer = Trainer(TinyMLP(dropout=0.2, rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=9, prefetch=depth)
        trainer.fit(ArrayLoader(data, 16, seed=2))
        runs.append(jax.device_get(trainer.state.params))
    for x, y in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
        np.testing.assert_array_equal(x, y)


def test_a_smaller_last_batch_is_dropped_with_one_compilation(data):
    batches = list(ArrayLoader(make_data(n=40), 16, shuffle=False, drop_remainder=False))  # 16, 16, 8
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=3)
    with pytest.warns(UserWarning, match=r"dropped a batch of 8 rows, fewer than the first batch's 16"):
        trainer.fit(batches)
    assert trainer.step == 6 and trainer.epoch == 3
    assert trainer._train_steps.single._cache_size() == 1


def test_a_padded_last_batch_trains_on_its_real_rows_only():
    data = make_data(n=24)
    first, last = {k: v[:16] for k, v in data.items()}, {k: v[16:] for k, v in data.items()}  # 16, then 8
    after_first = {}

    class Grab(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 1:
                after_first["params"] = jax.device_get(trainer.state.params)

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.5), max_steps=2, ragged_batches="pad", callbacks=[Grab()])
    trainer.fit([first, last])
    assert trainer._train_steps.single._cache_size() == 1

    def loss_on_real_rows(params):
        model = nnx.merge(trainer.graphdef, params, trainer.state.model_state)
        return jax.numpy.mean(losses.cross_entropy(model(last["x"]), last["label"]))

    grads = jax.grad(loss_on_real_rows)(after_first["params"])
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, after_first["params"], grads)
    for x, y in zip(jax.tree.leaves(jax.device_get(trainer.state.params)), jax.tree.leaves(expected)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_with_padding_the_epoch_means_count_every_real_row_once(k):
    data = make_data(n=40)  # batches of 16, 16 and 8 real rows (padded to 16)
    batches = [{key: v[i:i + 16] for key, v in data.items()} for i in (0, 16, 32)]
    losses_seen = []

    class Losses(Callback):
        def on_step_end(self, trainer, step, metrics):
            losses_seen.extend(np.asarray(metrics["loss"]).reshape(-1).tolist())

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=1, ragged_batches="pad",
                      steps_per_execution=k, callbacks=[Losses(), NaNDetector(check_every=k)])  # the guarded steps too
    trainer.fit(batches)
    assert len(losses_seen) == 3
    per_example = (16 * losses_seen[0] + 16 * losses_seen[1] + 8 * losses_seen[2]) / 40
    assert trainer.history[-1]["loss"] == pytest.approx(per_example, rel=1e-6)
    assert trainer.history[-1]["loss"] != pytest.approx(np.mean(losses_seen), rel=1e-6)  # not a mean of batch means


def test_bad_ragged_option():
    with pytest.raises(ValueError, match="ragged_batches='cut' must be one of"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=1, ragged_batches="cut")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("load, step, busy, chosen", [(0.001, 0.009, False, 0), (0.008, 0.002, False, 2),
                                                     (0.008, 0.002, True, 0)])
def test_auto_moves_loading_to_a_thread_only_when_it_limits_the_loop(load, step, busy, chosen):
    """Waiting idle 10% of the loop's time stays in the loop's thread, 80% gets a thread of depth 2;
    loading that keeps the loop's thread busy (CPU time = wall time) stays inline whatever its share."""
    clock, cpu = FakeClock(), FakeClock()

    def source():
        for i in range(30):
            clock.now += load
            cpu.now += load if busy else 0.0
            yield i

    feed = Feed(source(), "auto", place=lambda x: x, probe=8, clock=clock, cpu_clock=cpu, probe_seconds=0.05)
    got = []
    for item in feed:
        got.append(item)
        clock.now += step  # the loop's own work between two pulls
    feed.close()
    assert got == list(range(30))
    assert feed.depth_in_use == chosen


def test_busy_clock_counts_running_and_waiting_for_a_core_not_sleeping():
    import time

    clock = BusyClock()
    b0, w0 = clock(), time.perf_counter()
    time.sleep(0.05)  # blocked, like a read from a slow disk
    b1, w1 = clock(), time.perf_counter()
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:  # busy (running, or runnable while another process has the core)
        pass
    b2, w2 = clock(), time.perf_counter()
    clock.close()
    assert b1 - b0 < 0.5 * (w1 - w0)
    assert b2 - b1 > 0.8 * (w2 - w1)


def test_auto_measures_for_probe_seconds_not_just_a_few_fast_executions():
    """30 executions of 10 ms, idle 80%: before 0.5 s have passed it has not decided (still inline)."""
    clock, cpu = FakeClock(), FakeClock()

    def source():
        for i in range(30):
            clock.now += 0.008
            yield i

    feed = Feed(source(), "auto", place=lambda x: x, probe=8, clock=clock, cpu_clock=cpu, probe_seconds=0.5)
    for _ in feed:
        clock.now += 0.002
    feed.close()
    assert feed.depth_in_use is None and feed.measured_share is None


def test_auto_goes_on_measuring_over_epochs_shorter_than_its_probe():
    """Each epoch's ``Feed`` started measuring from nothing: with epochs shorter than the probe it never
    decided, and paid the probe's clock reads on every batch of every epoch."""
    clock, cpu = FakeClock(), FakeClock()
    measured: dict = {}
    decided = []
    for epoch in range(12):  # 5 executions of 10 ms an epoch (idle 80%: a thread), 0.05 s < probe_seconds
        def source():
            for i in range(5):
                clock.now += 0.008
                yield i

        feed = Feed(source(), "auto", place=lambda x: x, probe=8, clock=clock, cpu_clock=cpu, probe_seconds=0.25,
                    measured=measured)
        assert list(feed) == list(range(5))
        feed.close()
        decided.append(feed.depth_in_use)
        if feed.depth_in_use is not None:
            break
    assert decided[:-1] == [None] * (len(decided) - 1) and decided[-1] == 2
    assert 5 <= len(decided) <= 8  # ~0.25 s of measured pulls (the first of each epoch not timed), not never


def test_auto_picks_a_thread_for_a_slow_iterator_and_keeps_it(data):
    """An iterator that waits 20 ms per batch (a slow disk) against a sub-millisecond step."""
    import time

    batches = list(ArrayLoader(make_data(n=320), 16, shuffle=False))

    class SlowDisk:
        def __iter__(self):
            for batch in batches:
                time.sleep(0.02)
                yield batch

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=2)
    trainer.fit(SlowDisk())
    assert trainer.prefetch_in_use == 2
    assert trainer.step == 40 and not prefetch_threads()


def test_prefetch_option_is_checked():
    with pytest.raises(ValueError, match="prefetch='soon' must be an integer >= 0 or 'auto'"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=1, prefetch="soon")


def test_an_overridden_place_batch_runs_without_a_thread_too(data):
    """place_batch is where batches get their sharding: it applies whatever the prefetch mode."""
    seen = []

    class Placing(Trainer):
        def place_batch(self, batch):
            seen.append(threading.current_thread().name)
            return super().place_batch(batch)

    trainer = Placing(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=4, prefetch=0)
    trainer.fit(ArrayLoader(data, 16))
    assert seen == [threading.main_thread().name] * 4


def test_place_batch_is_told_which_batches_are_stacked_chunks_when_it_asks(data):
    """K=4 over 6-batch epochs: a chunk of 4 and 2 single batches an epoch. An override that takes
    ``stacked`` learns which is which; one written without it still gets both (as before)."""
    told, legacy = [], []

    class Told(Trainer):
        def place_batch(self, batch, *, stacked=False):
            told.append((batch["x"].shape, stacked))
            return super().place_batch(batch)

    class Legacy(Trainer):
        def place_batch(self, batch):
            legacy.append(batch["x"].shape)
            return super().place_batch(batch)

    def logged(method):  # a decorator without functools.wraps: the signature says only **kwargs
        def wrapper(*args, **kwargs):
            return method(*args, **kwargs)
        return wrapper

    class Decorated(Legacy):
        place_batch = logged(Legacy.place_batch)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Told(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=6, steps_per_execution=4).fit(ArrayLoader(data, 16))
    for cls in (Legacy, Decorated):  # told that chunks arrive: a sharding of their first axis would split the steps
        with pytest.warns(UserWarning, match=f"{cls.__name__}.place_batch takes no stacked keyword, but "
                                             r"steps_per_execution=4 hands it chunks of \[4, batch, ...\]"):
            cls(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=6, steps_per_execution=4).fit(ArrayLoader(data, 16))
    assert told == [((4, 16, 8), True), ((16, 8), False), ((16, 8), False)]
    assert legacy == [(4, 16, 8), (16, 8), (16, 8)] * 2


def test_a_checkpoint_records_the_trained_position_not_the_prefetched_one():
    from trainer.checkpoint import describe

    class StopAt(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 3:
                trainer.request_stop("test")

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=1, callbacks=[StopAt()], prefetch=4)
    trainer.fit(ArrayLoader(make_data(n=640), 16))  # the thread pulled batches beyond the third
    assert trainer.data_iterator.position > 3
    assert describe(trainer, [])["data_state"]["position"] == trainer.position == 3


class _Wide(nnx.Module):
    """Slow on the device (two 1024-wide products on 512 rows, ~1 GFLOP a step), quick to dispatch."""

    def __init__(self, rngs):
        self.a, self.b = nnx.Linear(1024, 1024, rngs=rngs), nnx.Linear(1024, 4, rngs=rngs)

    def __call__(self, x):
        return self.b(jax.nn.relu(self.a(x)))


@pytest.mark.parametrize("ahead", [None, 2])
def test_the_loop_runs_at_most_dispatch_ahead_executions_ahead_of_the_device(ahead):
    if ahead is None and jax.default_backend() != "cpu":
        pytest.skip("a GPU may finish this step before the host dispatches the next: nothing to bound")
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(512 * 8, 1024)).astype(np.float32), "y": rng.integers(0, 4, 512 * 8)}
    losses_by_step, behind = {}, []

    class Watch(Callback):  # at each step's end: has the step `ahead` executions back finished?
        def on_step_end(self, trainer, step, metrics):
            losses_by_step[step] = metrics["loss"]
            if step - 2 in losses_by_step:
                behind.append(losses_by_step[step - 2].is_ready())  # a query: never waits

    Trainer(_Wide(nnx.Rngs(0)), optax.sgd(0.01), max_steps=8, prefetch=0, dispatch_ahead=ahead,
            callbacks=[Watch()]).fit(ArrayLoader(data, 512, seed=0))
    if ahead is None:  # the host runs ahead of this device-bound step: the bound below is not vacuous
        assert not all(behind), behind
    else:  # dispatching step s waited for step s - 2
        assert all(behind), behind


def test_dispatch_ahead_is_checked(model):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="dispatch_ahead"):
            Trainer(model, optax.sgd(0.1), max_steps=1, dispatch_ahead=bad)


def test_the_bound_on_running_ahead_waits_once_every_few_executions_not_after_each(model, monkeypatch):
    """Each wait is a sleep and a wake-up of the loop's thread: waiting until half the bound is in flight
    keeps the bound and wakes the thread every ``dispatch_ahead // 2 + 1`` executions."""
    from jax._src.array import ArrayImpl

    waits = []
    real = ArrayImpl.block_until_ready
    monkeypatch.setattr(ArrayImpl, "block_until_ready", lambda self: waits.append(1) or real(self))
    trainer = Trainer(model, optax.sgd(0.1), max_steps=12, prefetch=0, dispatch_ahead=4)
    trainer.fit(ArrayLoader(make_data(n=192), 16, shuffle=False))
    assert trainer.step == 12 and len(waits) == 3  # at steps 5, 8 and 11 (each waits for the one 2 back)



def test_a_bound_of_one_keeps_the_newest_execution_in_flight(model):
    """Waiting until half of 1 (0) were in flight waited for the step just dispatched: the device idled."""
    seen = []

    class InFlight(Callback):
        def on_step_end(self, trainer, step, metrics):
            seen.append(len(trainer._in_flight))

    Trainer(model, optax.sgd(0.1), max_steps=8, prefetch=0, dispatch_ahead=1, callbacks=[InFlight()]).fit(
        ArrayLoader(make_data(n=128), 16, shuffle=False))
    assert seen == [1] * 8
