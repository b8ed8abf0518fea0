"""Each writer round-trips what it wrote: JSONL, CSV and TensorBoard files read back and compared."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from callbacks import ConsoleWriter, CsvWriter, JsonlWriter, TensorBoardWriter, read_jsonl

SCALARS = [(10, {"loss": 0.5, "accuracy": 0.25}), (20, {"loss": 0.25, "accuracy": 0.5, "eval/loss": 0.3})]


def tensorboard_scalars(logdir, tag):
    """``(step, value)`` of ``tag`` as TensorBoard shows it, read by both of its readers: the classic
    ``EventAccumulator`` and the server's (``plugin_event_accumulator``, whose purge logic differs)."""
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator

    classic = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    classic.Reload()
    served = plugin_event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    served.Reload()
    shown = [(e.step, e.value) for e in classic.Scalars(tag)]
    assert [(e.step, float(e.tensor_proto.float_val[0])) for e in served.Tensors(tag)] == shown
    return shown


def test_jsonl_round_trip(tmp_path):
    writer = JsonlWriter(tmp_path / "run" / "metrics.jsonl")
    writer.write_hparams({"lr": 1e-3, "nested": {"depth": 2}, "path": tmp_path})
    for step, scalars in SCALARS:
        writer.write_scalars(step, scalars)
    writer.write_texts(20, {"sample": "hello world"})
    writer.write_images(20, {"plots/grid": np.full((8, 6, 3), 200, np.uint8)})
    writer.close()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records[0] == {"hparams": {"lr": 1e-3, "nested": {"depth": 2}, "path": str(tmp_path)}}
    assert [(r["step"], r["scalars"]) for r in records[1:3]] == SCALARS
    assert records[3] == {"step": 20, "texts": {"sample": "hello world"}}
    image_path = tmp_path / "run" / records[4]["images"]["plots/grid"]
    from matplotlib import image
    assert image.imread(image_path).shape[:2] == (8, 6)


def test_jsonl_appends_after_reopening(tmp_path):
    writer = JsonlWriter(tmp_path / "m.jsonl")
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    writer.write_scalars(2, {"loss": 2.0})
    writer.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]


def test_csv_header_grows_and_file_stays_valid(tmp_path):
    path = tmp_path / "metrics.csv"
    writer = CsvWriter(path)
    writer.write_scalars(10, SCALARS[0][1])
    writer.flush()
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == ["step", "loss", "accuracy"]
    writer.write_scalars(20, SCALARS[1][1])
    writer.close()
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss", "accuracy", "eval/loss"]
    assert all(len(row) == 4 for row in rows)  # no ragged row: a valid table
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert [int(r["step"]) for r in back] == [10, 20]
    assert float(back[0]["loss"]) == 0.5 and back[0]["eval/loss"] == ""
    assert float(back[1]["eval/loss"]) == 0.3
    assert not (tmp_path / "metrics.csv.tmp").exists()


def test_csv_writer_continues_an_existing_file(tmp_path):
    path = tmp_path / "metrics.csv"
    CsvWriter(path).write_scalars(1, {"loss": 1.0})
    again = CsvWriter(path)
    again.write_scalars(2, {"loss": 0.5})
    again.close()
    with open(path, newline="") as f:
        assert [r["loss"] for r in csv.DictReader(f)] == ["1.0", "0.5"]


def test_tensorboard_round_trip_without_tensorflow(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = TensorBoardWriter(tmp_path / "tb")
    writer.write_hparams({"lr": 0.001})
    for step, scalars in SCALARS:
        writer.write_scalars(step, scalars)
    writer.write_scalars(30, {"/odd name(1)": 1.5})  # tagged as tensorboardX's add_scalar tags it
    writer.write_texts(5, {"sample": "the quick brown fox"})
    writer.write_images(5, {"grid": np.linspace(0, 1, 4 * 5 * 3).reshape(4, 5, 3)})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [(e.step, e.value) for e in loss] == [(10, 0.5), (20, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(20, pytest.approx(0.3))]
    assert [(e.step, e.value) for e in acc.Scalars("odd_name_1_")] == [(30, 1.5)]
    image = acc.Images("grid")[0]
    assert (image.step, image.width, image.height) == (5, 5, 4)
    texts = {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"]}
    sample = texts["sample/text_summary"][0]
    assert sample.step == 5 and b"the quick brown fox" in sample.tensor_proto.string_val[0]
    assert b"0.001" in texts["config/text_summary"][0].tensor_proto.string_val[0]
    import sys
    assert "tensorflow" not in sys.modules


def test_tensorboard_rewind_hides_the_steps_after_it_and_keeps_the_first_file(tmp_path):
    """A resumed run rewinds the writer to its checkpoint's step: TensorBoard then shows each step
    once. Both files open within the same second: the second must not overwrite the first."""
    pytest.importorskip("tensorboard")
    writer = TensorBoardWriter(tmp_path / "tb")
    for step in (10, 20, 30):
        writer.write_scalars(step, {"loss": float(step)})
    writer.rewind(20)
    for step in (30, 40):
        writer.write_scalars(step, {"loss": step + 0.5})
    writer.close()
    assert len(list((tmp_path / "tb").glob("*tfevents*"))) == 2
    assert tensorboard_scalars(tmp_path / "tb", "loss") == [(10, 10.0), (20, 20.0), (30, 30.5), (40, 40.5)]


def test_console_writer_prints_steps_and_values():
    out = io.StringIO()
    writer = ConsoleWriter(out)
    writer.write_hparams({"lr": 0.1})
    writer.write_scalars(10, {"loss": 0.123456})
    assert out.getvalue().splitlines() == ['config {"lr": 0.1}', "step 10  loss 0.1235"]


def test_tensorboard_flush_hands_events_to_the_os_between_fsyncs(tmp_path):
    """A flush inside flush_seconds skips the fsync, not the write: a reader (or a killed run) sees
    every event flushed, without close()."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = TensorBoardWriter(tmp_path / "tb", flush_seconds=3600)
    for step in (5, 10, 15):
        writer.write_scalars(step, {"loss": float(step)})
        writer.flush()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [5, 10, 15]
    writer.close()


def test_a_tensorboard_rewind_to_0_drops_the_config_written_before(tmp_path):
    """A resume that found no checkpoint starts again from 0: the killed run's config text goes too, so
    the Text tab shows the new run's one config, not both (as the TensorBoard server reads the files)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    writer = TensorBoardWriter(tmp_path / "tb")
    writer.write_hparams({"lr": 0.1})
    writer.write_scalars(2, {"loss": 1.0})
    writer.rewind(0)
    writer.write_hparams({"lr": 0.2})
    writer.write_scalars(2, {"loss": 2.0})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    configs = [e.tensor_proto.string_val[0] for e in acc.Tensors("config/text_summary")]
    assert len(configs) == 1 and b"0.2" in configs[0]
    assert [(e.step, float(e.tensor_proto.float_val[0])) for e in acc.Tensors("loss")] == [(2, 2.0)]


def test_tensorboard_rewinds_sort_after_the_files_they_purge_past_nine_files(tmp_path, monkeypatch):
    """Event files of one process and second are told apart by a counter, zero-padded: file 10 sorts
    after file 9, so its purge hides what file 9 wrote after the rewind's step."""
    pytest.importorskip("tensorboard")
    import itertools

    from callbacks import tensorboard

    monkeypatch.setattr(tensorboard, "_FILE_NUMBERS", itertools.count(9))
    writer = TensorBoardWriter(tmp_path / "tb")
    for step in (6, 7, 8):
        writer.write_scalars(step, {"loss": step + 100.0})
    writer.rewind(5)
    for step in (6, 7, 8):
        writer.write_scalars(step, {"loss": float(step)})
    writer.close()
    assert tensorboard_scalars(tmp_path / "tb", "loss") == [(6, 6.0), (7, 7.0), (8, 8.0)]


def test_a_jsonl_line_cut_short_is_left_out_on_reading_and_dropped_by_a_rewind(tmp_path):
    path = tmp_path / "m.jsonl"
    writer = JsonlWriter(path)
    for step, scalars in SCALARS:
        writer.write_scalars(step, scalars)
    writer.close()
    with open(path, "a") as f:
        f.write('{"step": 30, "scal')  # a write cut short (a full disk, a kill)
    assert [r["step"] for r in read_jsonl(path)] == [10, 20]
    with pytest.warns(RuntimeWarning, match=r"m.jsonl: line 3 is not a JSON record \(a write cut short\)"):
        writer.rewind(20)
    assert len(path.read_text().splitlines()) == 2
    assert writer.read_scalars() == SCALARS
    with open(path, "a") as f:
        f.write('{"step": 30\n{"step": 40, "scalars": {}}\n')  # damage before the last line is refused
    with pytest.raises(ValueError, match="line 3 is not a JSON record; the file is damaged"):
        read_jsonl(path)


def test_csv_reads_back_and_writes_its_header_again_into_a_file_removed_while_closed(tmp_path):
    path = tmp_path / "m.csv"
    writer = CsvWriter(path)
    for step, scalars in SCALARS:
        writer.write_scalars(step, scalars)
    assert writer.read_scalars() == SCALARS
    writer.close()
    path.unlink()
    writer.write_scalars(30, {"loss": 0.125})
    writer.close()
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["step", "loss"], ["30", "0.125"]]


def test_a_csv_row_cut_short_is_dropped_by_a_rewind_and_left_out_on_reading(tmp_path):
    """A crash cut the last row to ``30,0.5`` (its accuracy and line end lost): a read leaves it out, a
    rewind drops it, so the next row is not glued onto it (step 40 read as 3040 and so on)."""
    path = tmp_path / "m.csv"
    writer = CsvWriter(path)
    for step, scalars in SCALARS:
        writer.write_scalars(step, scalars)
    writer.close()
    with open(path, "a", newline="") as f:
        f.write("30,0.5")
    with pytest.warns(RuntimeWarning, match=r"m.csv: the last row is cut short \('30,0.5'\)"):
        assert writer.read_scalars() == SCALARS
    with pytest.warns(RuntimeWarning, match=r"m.csv: row 4 is cut short \('30,0.5'\); dropped by the rewind"):
        writer.rewind(100)
    writer.write_scalars(40, SCALARS[0][1])
    assert writer.read_scalars() == [*SCALARS, (40, SCALARS[0][1])]


def test_a_csv_rewind_counts_cells_not_commas(tmp_path):
    """A metric name holding a comma is quoted in the header: every row still has the header's cells."""
    path = tmp_path / "m.csv"
    writer = CsvWriter(path)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": 1.0 / step, "f1[a,b]": 0.5})
    writer.rewind(2)
    assert [s for s, _ in writer.read_scalars()] == [1, 2]


def test_a_jsonl_rewind_drops_a_config_written_for_the_records_it_drops(tmp_path):
    """The config is written just before a fit's first record: rewound to a step before that record
    (a checkpoint older than it), the config goes too (the resumed logger writes it again, once)."""
    path = tmp_path / "m.jsonl"
    writer = JsonlWriter(path)
    writer.write_hparams({"lr": 0.1})
    for step, scalars in SCALARS:
        writer.write_scalars(step, scalars)
    writer.rewind(10)
    assert [sorted(r) for r in read_jsonl(path)] == [["hparams"], ["scalars", "step"]]
    writer.rewind(5)
    assert read_jsonl(path) == []


def test_console_lines_go_above_a_progress_bar_not_onto_it():
    from tqdm import tqdm

    out = io.StringIO()
    bar = tqdm(total=10, file=out, ncols=60)
    bar.update(3)
    ConsoleWriter(out).write_scalars(5, {"loss": 1.0})
    bar.close()
    before, after = out.getvalue().split("step 5  loss 1\n")
    assert before.endswith("\r") and after.startswith("\r")  # the bar cleared before the line, redrawn after


def test_csv_read_back_leaves_out_rows_that_are_not_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("step,loss\n2,0.5\n4,0.2\n6,0.1,0.3\n8,1.5e-\n")  # a glued line, a cut number
    with pytest.warns(RuntimeWarning, match="a row that is not numbers"):
        assert CsvWriter(path).read_scalars() == [(2, {"loss": 0.5}), (4, {"loss": 0.2}), (6, {"loss": 0.1})]
