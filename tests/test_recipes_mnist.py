"""The MNIST recipe: data loaders (IDX and bundled), the CNN's overfit check, the command line."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import optax
import pytest
from flax import nnx

from recipes.datasets import load_mnist_bundled, load_mnist_idx, read_idx
from recipes.mnist import CNN
from trainer import ArrayLoader, Trainer


def write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(header + body)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", 20, True), ("t10k", 8, False)):
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n).astype(np.uint8), gz)
    return tmp_path


def test_idx_loader_reads_small_files_gzipped_or_not(idx_dir):
    train, test = load_mnist_idx(idx_dir)
    raw = read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    assert train["image"].shape == (20, 28, 28, 1) and test["image"].shape == (8, 28, 28, 1)
    np.testing.assert_allclose(train["image"][..., 0], raw / 255.0)
    np.testing.assert_array_equal(test["label"], read_idx(idx_dir / "t10k-labels-idx1-ubyte"))
    assert train["label"].dtype == np.int32


def test_idx_loader_rejects_damaged_and_missing_files(tmp_path, idx_dir):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="truncated or damaged"):
        read_idx(tmp_path / "bad")
    (tmp_path / "nonidx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "nonidx")
    with pytest.raises(FileNotFoundError, match="four MNIST IDX files"):
        load_mnist_idx((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_bundled_digits_split_4000_1000_stratified():
    train, test = load_mnist_bundled()
    assert train["image"].shape == (4000, 28, 28, 1) and test["image"].shape == (1000, 28, 28, 1)
    assert np.bincount(test["label"]).tolist() == [100] * 10
    assert 0.0 <= train["image"].min() and train["image"].max() <= 1.0 and train["image"].max() > 0.99
    seen = {image.tobytes() for image in train["image"]}
    assert not any(image.tobytes() in seen for image in test["image"])  # no digit in both splits


@pytest.mark.slow
def test_overfit_one_batch_of_32_digits():
    """The guide's sanity check: the CNN drives the loss on one batch of 32 digits below 0.01."""
    train, _ = load_mnist_bundled()
    batch = {k: v[:32] for k, v in train.items()}
    model = CNN(dropout=0.0, max_shift=0, rngs=nnx.Rngs(0))
    losses = []
    from callbacks import Callback

    class Track(Callback):
        def on_step_end(self, trainer, step, metrics):
            losses.append(metrics["loss"])

    trainer = Trainer(model, optax.adam(1e-3), max_steps=200, callbacks=[Track()])
    trainer.fit(ArrayLoader(batch, 32, shuffle=False))
    final = [float(l) for l in losses[-5:]]
    assert trainer.step == 200 and max(final) < 0.01, final


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "recipes.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_help_lists_every_option_with_default():
    top = run_cli("--help")
    assert top.returncode == 0 and "mnist" in top.stdout
    out = run_cli("mnist", "--help")
    assert out.returncode == 0
    for flag in ("--epochs", "--batch-size", "--learning-rate", "--schedule", "--optimizer", "--warmup-steps",
                 "--weight-decay", "--momentum", "--nesterov", "--clip-norm", "--decay-rate", "--data-dir",
                 "--workdir", "--seed", "--dropout", "--max-shift", "--steps-per-execution"):
        assert flag in out.stdout, flag
    assert "(default: 0.003)" in out.stdout


def test_cli_refuses_an_interval_that_is_not_a_multiple_of_k_or_a_bad_export_before_loading_anything(
        capsys, tmp_path):
    from recipes.config_cli import parse_config
    from recipes.mnist import MnistConfig

    with pytest.raises(SystemExit) as exit_:
        parse_config(MnistConfig, ["--log-every", "7", "--steps-per-execution", "5"], prog="nnx-train mnist",
                     description="")
    assert exit_.value.code == 2
    assert "--log-every 7 is not a multiple of --steps-per-execution 5" in capsys.readouterr().err
    given = parse_config(MnistConfig, ["--log-every", "10", "--steps-per-execution", "5"], prog="p", description="")
    default = parse_config(MnistConfig, ["--steps-per-execution", "7"], prog="p", description="")
    assert (given.log_every, default.log_every) == (10, 50)  # a default is left for the trainer to round up
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        parse_config(MnistConfig, ["--export", str(tmp_path / "afile" / "model")], prog="nnx-train mnist",
                     description="")
    assert "afile is not a writable folder" in capsys.readouterr().err  # before training, not after it
    if os.path.isdir("/proc/self"):  # a folder whose permission bits pass (for root) but that takes no folder
        with pytest.raises(SystemExit):
            parse_config(MnistConfig, ["--export", "/proc/nnx-export"], prog="nnx-train mnist", description="")
        assert "/proc is not a writable folder" in capsys.readouterr().err
    assert not list(tmp_path.glob(".nnx-train-probe-*"))
    parse_config(MnistConfig, ["--export", str(tmp_path / "out" / "model")], prog="p", description="")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe folder is gone again
    for rate in ("1.0", "-0.5"):
        with pytest.raises(SystemExit):
            parse_config(MnistConfig, ["--dropout", rate], prog="nnx-train mnist", description="")
        assert f"--dropout {float(rate)} must be in [0, 1)" in capsys.readouterr().err


def test_cli_unknown_recipe_fails_clearly():
    out = run_cli("cifar")
    assert out.returncode == 2 and "unknown recipe 'cifar'" in out.stderr


@pytest.mark.slow
def test_recipe_end_to_end_on_idx_files_through_the_command_line(idx_dir, tmp_path):
    out = run_cli("mnist", "--data-dir", str(idx_dir), "--batch-size", "8", "--epochs", "2", "--log-every", "1",
                  "--optimizer", "sgd", "--schedule", "exponential", "--clip-norm", "1.0",
                  "--workdir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    summaries = [line for line in lines if line.startswith("epoch 1/2  ")]
    assert summaries and "eval/accuracy" in summaries[0]
    assert lines[-1].startswith("test accuracy: ")
    accuracy = float(lines[-1].split(": ")[1])
    assert 0.0 <= accuracy <= 1.0 and accuracy * 8 == pytest.approx(round(accuracy * 8))
    run = tmp_path / "run"
    from callbacks import read_jsonl
    records = read_jsonl(run / "metrics.jsonl")
    assert records[0]["hparams"]["optim"]["optimizer"] == "sgd"
    scalars = [r for r in records if "scalars" in r]
    assert scalars and "eval/accuracy" in scalars[-1]["scalars"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"curves.png", "predictions.png", "learning_rate.png"}


@pytest.mark.slow
def test_recipe_smoke_on_bundled_digits_through_python_m(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "recipes.mnist", "--max-steps", "6", "--epochs", "1", "--steps-per-execution", "3"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "trained to step 6" in out.stdout and out.stdout.strip().splitlines()[-1].startswith("test accuracy: ")
    # the default --log-every 50 rounds up to a multiple of 3
    assert "MetricsLogger(log_every=50, a default) runs every 51 steps" in out.stderr
    # the same command again: a second run in a fresh sibling of the default workdir, the first left as it was
    first = sorted(p.name for p in (tmp_path / "runs" / "mnist" / "checkpoints").iterdir())
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "runs/mnist holds an earlier run: this one writes to runs/mnist-2" in again.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "mnist" / "checkpoints").iterdir()) == first
    assert (tmp_path / "runs" / "mnist-2" / "checkpoints").is_dir()
    # an explicit --workdir that holds a run is refused as a usage error, not a traceback
    used = subprocess.run([*command, "--workdir", "runs/mnist-2"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert used.returncode == 2 and "nnx-train mnist: error: --workdir runs/mnist-2 holds an earlier run" in used.stderr
    assert "Traceback" not in used.stderr


def test_recipe_reports_bad_data_dir(tmp_path):
    out = run_cli("mnist", "--data-dir", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "run"))
    assert out.returncode == 2 and "nnx-train mnist: error: --data-dir" in out.stderr
    assert "is not a directory" in out.stderr and "Traceback" not in out.stderr


def test_cli_refuses_a_used_workdir_without_checkpoints_a_resume_without_one_and_a_batch_above_the_data(
        tmp_path, capsys):
    from recipes.mnist import main

    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")  # an earlier run's logs, no checkpoints
    for argv, message in {("--workdir", str(used), "--no-checkpoint"): f"--workdir {used} holds an earlier run "
                                                                       "(metrics.jsonl)",
                          ("--workdir", "", "--resume"): "--resume continues the run in --workdir, but --workdir is empty",
                          ("--workdir", str(tmp_path / "new"), "--batch-size", "4001"):
                              "--batch-size 4001 is larger than the 4000 training examples"}.items():
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--max-steps", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err, (argv, err)
    assert (used / "metrics.jsonl").read_text() == "{}\n"  # the earlier run's logs untouched
    from recipes.common import holds_a_run

    failed_early = tmp_path / "failed"
    (failed_early / "checkpoints").mkdir(parents=True)
    (failed_early / "tb").mkdir()  # what a run that failed before its first save leaves: nothing to mix with
    assert not holds_a_run(failed_early) and holds_a_run(used)


def test_cli_refuses_values_outside_their_range_naming_the_flag(capsys):
    from recipes.config_cli import parse_config
    from recipes.mnist import MnistConfig

    refused = {("--max-shift", "-1"): "--max-shift -1 must be >= 0",
               ("--epochs", "0"): "--epochs 0 must be >= 1",
               ("--learning-rate", "0"): "--learning-rate 0.0 must be > 0",
               ("--momentum", "1.5"): "--momentum 1.5 must be in [0, 1)",
               ("--clip-norm", "-1"): "--clip-norm -1.0 must be > 0",
               ("--checkpoint-min-seconds", "-5"): "--checkpoint-min-seconds -5.0 must be >= 0",
               ("--nan-policy", "foo"): "argument --nan-policy: invalid choice: 'foo'",
               ("--learning-rate", "inf"): "--learning-rate inf is not finite; it must be > 0",
               ("--weight-decay", "inf"): "--weight-decay inf is not finite; it must be >= 0",
               ("--end-learning-rate", "nan"): "--end-learning-rate nan is not finite; it must be >= 0",
               ("--seed", "-1"): "--seed -1 must be in [0, 9223372036854775808)",
               ("--seed", "99999999999999999999"): "--seed 99999999999999999999 must be in [0, ",
               ("--nan-policy", "rollback", "--no-checkpoint"): "--nan-policy rollback restores the last checkpoint "
                                                               "after a non-finite step, but --no-checkpoint saves none",
               ("--nan-policy", "rollback", "--workdir", ""): "but --workdir '' (nothing written) saves none",
               ("--optimizer", "lion"): "argument --optimizer: invalid choice: 'lion'"}
    for argv, message in refused.items():
        with pytest.raises(SystemExit) as exit_:
            parse_config(MnistConfig, list(argv), prog="nnx-train mnist", description="")
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err, argv
    # the ends of each range and an optional left out are accepted
    config = parse_config(MnistConfig, ["--max-shift", "0", "--momentum", "0", "--clip-norm", "none",
                                        "--checkpoint-min-seconds", "0", "--optimizer", "sgd"], prog="p", description="")
    assert (config.max_shift, config.optim.momentum, config.optim.clip_norm, config.optim.optimizer) == (0, 0.0, None, "sgd")


@pytest.mark.slow
def test_default_recipe_reaches_97_percent_on_the_held_out_digits():
    """The issue's bar, with default options (about 2-3 minutes on 2 cores)."""
    from recipes.mnist import MnistConfig, run
    assert run(MnistConfig(workdir="", progress=False)) >= 0.97


@pytest.mark.slow
def test_recipe_resume_and_export_through_the_command_line(idx_dir, tmp_path):
    run = tmp_path / "run"
    common = ("mnist", "--data-dir", str(idx_dir), "--batch-size", "8", "--workdir", str(run), "--no-progress")
    first = run_cli(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    assert (run / "checkpoints" / "step_2").is_dir()
    second = run_cli(*common, "--epochs", "2", "--resume", "--export", str(tmp_path / "export"))
    assert second.returncode == 0, second.stderr
    assert "resumed from checkpoint step 2" in second.stderr and "trained to step 4" in second.stdout
    from recipes.mnist import load_exported
    from recipes.datasets import load_mnist_idx
    model = load_exported(str(tmp_path / "export"))
    _, test = load_mnist_idx(idx_dir)
    accuracy = (np.asarray(model(test["image"])).argmax(1) == test["label"]).mean()
    assert f"test accuracy: {accuracy:.4f}" == second.stdout.strip().splitlines()[-1]
    # the finished run resumed again: the same accuracy, and no logged step written twice
    from callbacks import read_jsonl

    before = read_jsonl(run / "metrics.jsonl")
    third = run_cli(*common, "--epochs", "2", "--resume")
    assert third.returncode == 0, third.stderr
    assert third.stdout.strip().splitlines()[-1] == f"test accuracy: {accuracy:.4f}"
    scalars = [r for r in read_jsonl(run / "metrics.jsonl") if "scalars" in r]
    assert len(scalars) == len([r for r in before if "scalars" in r])
    # nothing at all written again: no plots or prediction grid redrawn, no second config record
    assert read_jsonl(run / "metrics.jsonl") == before
    configs = [r["hparams"] for r in before if "hparams" in r]  # the resume with --epochs 2 wrote its own
    assert len(configs) == 2 and (configs[0]["epochs"], configs[1]["epochs"]) == (1, 2)


def fake_run(folder):
    """What an earlier run leaves, as far as the workdir checks look: a logged config."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(json.dumps({"hparams": {"epochs": 1}}) + "\n")


def test_a_second_default_run_says_how_to_continue_it_and_resume_must_then_name_its_workdir(
        tmp_path, monkeypatch, capsys, idx_dir):
    from recipes.mnist import MnistConfig, main
    from recipes.runs import fitting, prepare_workdir

    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "runs" / "mnist")
    moved = prepare_workdir(MnistConfig(epochs=2), "mnist")
    assert moved.workdir == "runs/mnist-2"
    assert "Continue this run after an interruption with: nnx-train mnist --epochs 2 --resume --workdir runs/mnist-2" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit, match="130"), fitting(moved, "mnist"):  # the preemption's save and exit
        raise SystemExit(130)
    hint = capsys.readouterr().err
    assert "continue this run with: nnx-train mnist --epochs 2 --resume --workdir runs/mnist-2" in hint
    fake_run(tmp_path / "runs" / "mnist-2")
    small = ["--data-dir", str(idx_dir), "--batch-size", "8", "--max-steps", "1", "--no-progress", "--no-plots"]
    for argv, message in {("--resume",): "--resume without --workdir continues runs/mnist, but other runs are beside "
                                         "it (runs/mnist-2): pass --workdir",
                          ("--workdir", "runs/mnist"): "--workdir runs/mnist holds an earlier run (metrics.jsonl)"
                          }.items():
        with pytest.raises(SystemExit) as exit_:
            main([*small, *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mnist", "mnist-2"]  # nothing trained


def test_unreadable_or_damaged_idx_files_are_usage_errors_naming_the_file(idx_dir, tmp_path, capsys, monkeypatch):
    from recipes.mnist import main

    labels = idx_dir / "train-labels-idx1-ubyte.gz"
    good = labels.read_bytes()
    damages = {lambda: labels.write_bytes(b"not gzip"): "is not valid gzip data",
               lambda: labels.write_bytes(good[:len(good) // 2]): "is a truncated .gz file",
               lambda: labels.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00")): "its header is cut short",
               lambda: labels.unlink() or labels.mkdir(): "is a folder, not an IDX file"}
    for damage, message in damages.items():
        damage()
        with pytest.raises(SystemExit) as exit_:
            main(["--data-dir", str(idx_dir), "--workdir", "", "--no-progress"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"nnx-train mnist: error: {labels}" in err and message in err, err
        assert "Traceback" not in err
        labels.rmdir() if labels.is_dir() else None
    write_idx(labels, np.zeros(20, np.uint8), gz=True)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(gzip, "open", denied)  # root reads a chmod 000 file: the error as another user gets it
    with pytest.raises(SystemExit):
        main(["--data-dir", str(idx_dir), "--workdir", "", "--no-progress"])
    assert f"{idx_dir / 'train-images-idx3-ubyte.gz'} cannot be read: permission denied" in capsys.readouterr().err


def test_idx_splits_labels_and_pixels_are_checked_when_read(idx_dir):
    test_images, test_labels = idx_dir / "t10k-images-idx3-ubyte", idx_dir / "t10k-labels-idx1-ubyte"
    cases = [(test_images, np.zeros((0, 28, 28), np.uint8), "t10k-images-idx3-ubyte holds no images: the test split "
                                                           "is empty"),
             (test_labels, np.zeros(7, np.uint8), "the test split does not pair up: t10k-images-idx3-ubyte holds 8 "
                                                  "images but t10k-labels-idx1-ubyte 7 labels"),
             (test_labels, np.full(8, 10, np.uint8), "label 10 at index 0 (8 such) is not a digit 0..9"),
             (test_labels, np.full(8, 3.7, np.float32), "label 3.7 at index 0 (8 such) is not a digit 0..9"),
             (test_labels, np.zeros((8, 1), np.uint8), "labels of shape (8, 1); an MNIST labels file holds one digit "
                                                       "per image"),
             (test_images, np.full((8, 28, 28), 300, np.int32), "pixel values span [300.0, 300.0]")]
    for path, array, message in cases:
        kept = path.read_bytes()
        write_idx(path, array)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_mnist_idx(idx_dir)
        path.write_bytes(kept)
    scaled = np.random.default_rng(0).random((8, 28, 28)).astype(np.float32)  # floats already in [0, 1]: kept
    write_idx(test_images, scaled)
    write_idx(test_labels, np.arange(8).astype(np.float32))  # whole-number float labels are digits
    _, test = load_mnist_idx(idx_dir)
    np.testing.assert_array_equal(test["image"][..., 0], scaled)
    assert test["label"].tolist() == list(range(8)) and test["label"].dtype == np.int32
    write_idx(test_images, scaled * 255)  # floats in [0, 255] are scaled
    np.testing.assert_allclose(load_mnist_idx(idx_dir)[1]["image"][..., 0], scaled, rtol=1e-6)


@pytest.mark.slow
def test_a_resume_keeps_the_saved_batch_size_seed_optimizer_and_recipe_and_the_checkpoint_stays_good(
        idx_dir, tmp_path, capsys):
    from recipes import mnist, transformer

    run = tmp_path / "run"
    common = ["--data-dir", str(idx_dir), "--batch-size", "8", "--workdir", str(run), "--no-progress", "--no-plots",
              "--no-tensorboard"]
    mnist.main([*common, "--max-steps", "2"])
    capsys.readouterr()
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    refusals = {
        (mnist, "--batch-size", "4"): f"the checkpoint in --workdir {run} was saved with --batch-size 8 (this run: "
                                      "--batch-size 4)",
        (mnist, "--seed", "1"): "was saved with --seed 0 (this run: --seed 1)",
        (mnist, "--optimizer", "sgd"): "was saved with --optimizer adamw (this run: --optimizer sgd): its optimizer "
                                       "state does not fit",
        (mnist, "--workdir", str(run / "checkpoints")): f"is a checkpoints folder (it holds step_2), not a run's "
                                                        f"workdir; pass the run's folder, its parent: --workdir {run}",
        (transformer, "--workdir", str(run)): f"--workdir {run} holds an mnist run, not a transformer one",
    }
    for (recipe, *argv), message in refusals.items():
        with pytest.raises(SystemExit) as exit_:
            recipe.main([*(["--workdir", str(run)] if recipe is transformer else common), "--resume", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit):  # a fresh transformer run there: no advice to --resume across recipes
        transformer.main(["--workdir", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert f"--workdir {run} holds an earlier mnist run" in err and "--resume" not in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == saved
    mnist.main([*common, "--max-steps", "4", "--resume"])  # the checkpoint still resumes
    out = capsys.readouterr()
    assert "resumed from checkpoint step 2" in out.err and "trained to step 4" in out.out


def test_cli_refuses_an_end_learning_rate_above_the_peak_by_its_flags(capsys):
    """It failed after the data was read, with a traceback naming neither flag (the transformer's
    default --end-learning-rate 1e-4 under any --learning-rate below it)."""
    from recipes.config_cli import parse_config
    from recipes.transformer import TransformerConfig

    with pytest.raises(SystemExit) as exit_:
        parse_config(TransformerConfig, ["--learning-rate", "5e-5"], prog="nnx-train transformer", description="")
    assert exit_.value.code == 2
    assert ("--end-learning-rate 0.0001 is above --learning-rate 5e-05, but --schedule warmup_cosine decays"
            in capsys.readouterr().err)
    growing = parse_config(TransformerConfig, ["--learning-rate", "5e-5", "--schedule", "exponential",
                                               "--decay-rate", "2"], prog="p", description="")
    assert growing.optim.end_learning_rate == 1e-4  # no floor of a growing rate: warned about when built


def test_a_run_shorter_than_its_warmup_is_warned_about():
    """A 20-step run of the MNIST recipe (31 warmup steps) never reached the peak rate, silently."""
    from recipes.common import build_optimizer
    from recipes.mnist import MnistOptim

    with pytest.warns(UserWarning, match=r"the run's 20 steps end inside the --warmup-steps 31 warmup"):
        build_optimizer(MnistOptim(), 20)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_optimizer(MnistOptim(), 100)
