"""The language-model recipe: causality, generation, overfitting, the text loader, bpc."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from callbacks.text_samples import sample_tokens
from recipes.text import CharVocab, TextWindows, eval_windows, load_text
from recipes.transformer import CharTransformer, LanguageModelTrainer


def tiny(vocab=12, context=16, dropout=0.0):
    return CharTransformer(vocab, context=context, layers=2, width=32, heads=2, dropout=dropout, rngs=nnx.Rngs(0))


def test_changing_token_t_never_changes_earlier_logits():
    model = tiny()
    model.eval()
    tokens = np.random.default_rng(0).integers(0, 12, (2, 16)).astype(np.int32)
    base = np.asarray(model(tokens))
    for t in (0, 5, 15):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % 12
        out = np.asarray(model(changed))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t:], base[:, t:])


def test_generation_logits_equal_a_full_forward_pass():
    model = tiny()
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    prompt = np.array([3, 1, 4, 1, 5], np.int32)
    tokens, logits = sample_tokens(graphdef, (params, rest), prompt, length=8, context=16, key=jax.random.key(0),
                                   temperature=1.0, top_k=None, with_logits=True)
    full = np.concatenate([prompt, tokens])
    reference = np.asarray(model(full[None]))[0]
    np.testing.assert_allclose(logits, reference[len(prompt) - 1:len(full) - 1], rtol=1e-5, atol=1e-5)


def test_generation_slides_past_the_context():
    model = tiny(context=8)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = sample_tokens(graphdef, (params, rest), np.array([1, 2, 3]), length=20, context=8,
                           key=jax.random.key(1), top_k=3)
    assert tokens.shape == (20,) and tokens.min() >= 0 and tokens.max() < 12


def test_top_k_beyond_the_vocabulary_keeps_it_all_and_bad_sample_settings_are_refused_when_built():
    from callbacks import TextSamples

    model = tiny(context=8)  # 12 tokens
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    kwargs = dict(length=6, context=8, key=jax.random.key(1), temperature=1.0)
    all_of_it = sample_tokens(graphdef, (params, rest), np.array([1, 2]), top_k=1000, **kwargs)
    np.testing.assert_array_equal(all_of_it, sample_tokens(graphdef, (params, rest), np.array([1, 2]), top_k=None,
                                                           **kwargs))
    vocab = CharVocab.from_text("abc")
    good = dict(encode=vocab.encode, decode=vocab.decode, context=8)
    for bad, message in ((dict(prompt=""), "prompt='' must be text of at least one token"),
                         (dict(prompt="a", top_k=-3), "top_k=-3 must be a positive integer"),
                         (dict(prompt="a", context=0), "context=0 must be a positive integer")):
        with pytest.raises(ValueError, match=message):
            TextSamples(**{**good, **bad})


def test_loss_on_a_repeated_pattern_falls_near_zero():
    text = "abcdefg" * 200
    vocab = CharVocab.from_text(text)
    windows = TextWindows(vocab.encode(text), context=16, batch_size=16, seed=0)
    trainer = LanguageModelTrainer(tiny(vocab=len(vocab)), optax.adam(3e-3), max_steps=150)
    history = []
    trainer.fit(windows)
    history = trainer.evaluate(eval_windows(vocab.encode(text), context=16, batch_size=32))
    assert history["loss"] < 0.05, history


def test_bits_per_character_is_loss_over_ln2(tmp_path):
    text = "hello world, " * 60
    vocab = CharVocab.from_text(text)
    trainer = LanguageModelTrainer(tiny(vocab=len(vocab)), optax.adam(1e-3), max_steps=3)
    trainer.fit(TextWindows(vocab.encode(text), context=16, batch_size=8))
    metrics = trainer.evaluate(eval_windows(vocab.encode(text), context=16, batch_size=8))
    assert metrics["bpc"] == pytest.approx(metrics["loss"] / math.log(2), rel=1e-12)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-12)


def test_text_loader_rejects_bad_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="has 9 characters, fewer than the 129 needed"):
        load_text(tmp_path / "short.txt", min_chars=129)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text: undecodable byte 0xe9 at byte offset 3"):
        load_text(tmp_path / "latin1.txt")
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    assert load_text(tmp_path / "short.txt") == "too short"


def test_text_windows_are_shifted_targets_and_resume_exactly():
    tokens = np.arange(1000, dtype=np.int32)
    windows = TextWindows(tokens, context=10, batch_size=4, seed=3)
    batch = next(iter(windows))
    np.testing.assert_array_equal(batch["targets"], batch["tokens"] + 1)
    it = windows.iterator(epoch=1)
    next(it)
    state = it.get_state()
    rest = [b["tokens"] for b in it]
    again = windows.iterator()
    again.set_state(state)
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in again]), np.concatenate(rest))


def test_windows_need_one_full_window():
    with pytest.raises(ValueError, match="fewer than one window"):
        TextWindows(np.arange(10), context=10, batch_size=2)
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(np.arange(5), context=10, batch_size=2)


def test_eval_windows_can_be_capped_to_windows_spread_over_the_text():
    tokens = np.arange(1001)  # 100 windows of 10 plus the last target
    every = eval_windows(tokens, context=10, batch_size=4)
    capped = eval_windows(tokens, context=10, batch_size=4, max_windows=5)
    assert every.num_examples == 100 and capped.num_examples == 5
    starts = capped.arrays["tokens"][:, 0].tolist()
    assert starts == [0, 250, 500, 740, 990]  # first and last window kept, evenly between
    np.testing.assert_array_equal(capped.arrays["targets"], capped.arrays["tokens"] + 1)
    assert eval_windows(tokens, context=10, batch_size=4, max_windows=500).num_examples == 100
    with pytest.raises(ValueError, match="max_windows=0"):
        eval_windows(tokens, context=10, batch_size=4, max_windows=0)


def test_eval_batches_caps_the_recipes_held_out_windows():
    from recipes.config_cli import parse_config
    from recipes.transformer import TransformerConfig, build

    text = "abcdefgh " * 2000  # the held-out 10%: 1,800 characters, 224 windows of 8
    argv = ["--context", "8", "--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "4", "--workdir", ""]
    for flag, windows in (("3", 12), ("None", 224)):
        config = parse_config(TransformerConfig, [*argv, "--eval-batches", flag], prog="nnx-train transformer",
                              description="")
        _, _, valid, _ = build(config, text, callbacks=[])
        assert valid.num_examples == windows, flag


def test_predict_gives_per_position_logits():
    text = "the cat sat on the mat. " * 20
    vocab = CharVocab.from_text(text)
    trainer = LanguageModelTrainer(tiny(vocab=len(vocab)), optax.adam(1e-3), max_steps=1)
    windows = eval_windows(vocab.encode(text), context=16, batch_size=8)
    out = trainer.predict(windows)
    assert out.shape == (windows.num_examples, 16, len(vocab))


def test_cli_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "recipes.cli", "transformer", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--text", "--context", "--layers", "--width", "--heads", "--dropout", "--steps", "--temperature",
                 "--top-k", "--prompt", "--clip-norm", "--warmup-steps", "--learning-rate", "--resume", "--export",
                 "--steps-per-execution", "--eval-batches"):
        assert flag in out.stdout, flag


def test_cli_refuses_a_bad_model_shape_prompt_or_text_naming_the_flag(tmp_path, capsys):
    from recipes.config_cli import parse_config
    from recipes.transformer import TransformerConfig, heads_problem, main

    for argv, message in {("--width", "-4"): "--width -4 must be >= 1", ("--heads", "0"): "--heads 0 must be >= 1",
                          ("--heads", "3"): "--heads 3 must divide --width 128",
                          ("--temperature", "0"): "--temperature 0.0 must be > 0",
                          ("--temperature", "inf"): "--temperature inf is not finite; it must be > 0",
                          ("--seed", "-1"): "--seed -1 must be in [0, 9223372036854775808)"}.items():
        with pytest.raises(SystemExit) as exit_:
            parse_config(TransformerConfig, list(argv), prog="nnx-train transformer", description="",
                         checks=[heads_problem])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
    (tmp_path / "corpus.txt").write_text("abc abc " * 400)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    small = ["--context", "8", "--layers", "1", "--width", "16", "--heads", "2", "--steps", "2", "--no-progress",
             "--no-checkpoint", "--workdir", ""]
    for argv, message in {("--text", str(tmp_path / "corpus.txt"), "--prompt", "Zab"):
                          "--prompt 'Zab' has characters the training text never uses ('Z')",
                          ("--text", str(tmp_path / "corpus.txt"), "--prompt", ""): "--prompt '' is empty",
                          ("--text", str(tmp_path / "latin1.txt")): "is not UTF-8 text",
                          ("--text", str(tmp_path / "missing.txt")): "missing.txt: no such file",
                          ("--text", str(tmp_path)): "is not a regular file (a folder or a device)",
                          ("--context", "60000"): "--context 60000 needs at least 600010 characters of text (a window "
                                                  "plus one in the held-out 10%), but the default text has"}.items():
        with pytest.raises(SystemExit) as exit_:
            main([*small, *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "nnx-train transformer: error: " in err and message in err, (argv, err)


def test_a_workdir_that_is_a_file_or_cannot_be_made_is_a_usage_error_before_anything_is_built(tmp_path, capsys):
    from recipes.config_cli import parse_config
    from recipes.transformer import TransformerConfig

    (tmp_path / "afile").write_text("x")
    for workdir, message in {str(tmp_path / "afile"): "afile is not a writable folder (it is a file)",
                             str(tmp_path / "afile" / "run"): "afile is not a writable folder (it is a file)",
                             "/proc/nnx-run": "/proc is not a writable folder"}.items():
        if workdir.startswith("/proc") and not os.path.isdir("/proc/self"):
            continue
        with pytest.raises(SystemExit) as exit_:
            parse_config(TransformerConfig, ["--workdir", workdir, "--no-checkpoint"], prog="nnx-train transformer",
                         description="")
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"--workdir {workdir}: " in err and message in err, err


def test_an_unreadable_text_is_a_usage_error_naming_it(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from recipes.transformer import main

    (tmp_path / "corpus.txt").write_text("abc abc " * 400)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads a chmod 000 file: the error as another user gets it
    with pytest.raises(SystemExit) as exit_:
        main(["--text", str(tmp_path / "corpus.txt"), "--workdir", "", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--text {tmp_path / 'corpus.txt'} cannot be read: permission denied" in err


@pytest.mark.slow
def test_a_resume_with_another_model_shape_or_text_names_what_the_checkpoint_was_saved_with(tmp_path, capsys):
    from recipes.transformer import main

    (tmp_path / "corpus.txt").write_text("abc abd " * 400)
    (tmp_path / "other.txt").write_text("xyz xyw " * 400)
    run = tmp_path / "run"
    argv = ["--text", str(tmp_path / "corpus.txt"), "--context", "8", "--layers", "1", "--width", "16", "--heads", "2",
            "--batch-size", "4", "--eval-every", "2", "--sample-every", "2", "--sample-length", "2", "--no-progress",
            "--workdir", str(run)]
    main([*argv, "--steps", "2"])
    capsys.readouterr()
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    for changed, message in {("--width", "8"): f"the checkpoint in --workdir {run} was saved with --width 16 (this "
                                               "run: --width 8)",
                             ("--text", str(tmp_path / "other.txt")): "was trained on a text of other characters"
                             }.items():
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--steps", "4", "--resume", *changed])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == saved


@pytest.mark.slow
def test_recipe_end_to_end_on_a_small_text_file(tmp_path):
    (tmp_path / "corpus.txt").write_text("It was the best of times, it was the worst of times. " * 120)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "recipes.cli", "transformer", "--text", str(tmp_path / "corpus.txt"),
               "--steps", "40", "--eval-every", "20", "--sample-every", "20", "--context", "32",
               "--layers", "1", "--width", "32", "--heads", "2", "--batch-size", "8", "--no-progress",
               "--warmup-steps", "5", "--steps-per-execution", "4", "--workdir", str(tmp_path / "run")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("validation bits per character: ") and float(last.split(": ")[1]) < 4.0
    assert "samples/text:" in out.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_40").is_dir()
    # the text has no 'T': the default prompt "The " gives way to the validation text's start, said on stderr
    assert "the default --prompt 'The ' uses characters the text does not; the samples continue" in out.stderr
    # --steps-per-execution 4: the default --log-every 50 rounds up to 52, said on stderr
    assert "MetricsLogger(log_every=50, a default) runs every 52 steps" in out.stderr
    # the finished run resumed: the same validation number, evaluated again without logging anything
    from callbacks import read_jsonl

    before = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == last
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == before
