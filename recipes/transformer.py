"""The language-model recipe: a small decoder-only transformer on characters.

Token and learned position embeddings, pre-LayerNorm blocks of causal multi-head self-attention
and a GELU MLP, dropout, and an output head tied to the token embedding (fewer parameters, and
it trains better at this size). AdamW with linear warmup then cosine decay, global-norm clipping,
evaluation on the held-out 10% of the text (loss, bits per character, perplexity), and text
samples. ``nnx-train transformer --help`` lists every option.

Example::

    from recipes.transformer import TransformerConfig, run
    bpc = run(TransformerConfig(steps=200))
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from callbacks import Checkpoint, Evaluator, TextSamples
from recipes.common import DefaultWorkdir, build_optimizer, run_config, standard_callbacks
from recipes.config_cli import UsageError, parse_config, reading_options, usage_errors
from recipes.runs import fitting, prepare_workdir, saved_config
from recipes.text import CharVocab, TextWindows, default_corpus, eval_windows, load_text
from trainer import DefaultInterval, Trainer
from trainer.data import SEED_LIMIT
from trainer.optim import OptimConfig
from trainer.settings import setting


@dataclasses.dataclass
class TransformerOptim(OptimConfig):
    """AdamW (decaying the weight matrices only), linear warmup then cosine decay, global-norm clipping."""

    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    schedule: str = "warmup_cosine"
    warmup_steps: int = 100
    end_learning_rate: float = 1e-4
    weight_decay: float = 0.1
    weight_decay_mask: str = "matrices"  # GPT-2's practice: no decay of biases and norm scales
    clip_norm: float | None = 1.0


@dataclasses.dataclass
class TransformerConfig:
    """Every setting of the recipe; each is a command-line option."""

    text: str | None = None
    context: int = setting(128, at_least=1)
    layers: int = setting(2, at_least=0)
    width: int = setting(128, at_least=1)
    heads: int = setting(4, at_least=1)
    dropout: float = setting(0.05, at_least=0, below=1, why="the share of activations zeroed while training")
    batch_size: int = setting(32, at_least=1)
    steps: int = setting(1200, at_least=1)
    eval_every: int = setting(DefaultInterval(300), at_least=1)
    eval_batches: int | None = setting(50, at_least=1)
    seed: int = setting(0, at_least=0, below=SEED_LIMIT)
    workdir: str = DefaultWorkdir("runs/transformer")
    prompt: str = "The "
    sample_every: int = setting(DefaultInterval(600), at_least=1)
    sample_length: int = setting(200, at_least=1)
    temperature: float = setting(0.8, above=0, why="small is greedier")
    top_k: int = setting(10, at_least=1)
    log_every: int = setting(DefaultInterval(50), at_least=1)
    steps_per_execution: int = setting(1, at_least=1)
    progress: bool = True
    checkpoint: bool = True
    checkpoint_min_seconds: float | None = setting(30.0, at_least=0)
    resume: bool = False
    export: str | None = None
    optim: TransformerOptim = dataclasses.field(default_factory=TransformerOptim)


CONFIG = TransformerConfig  # the recipe's config class: recipes.runs.recipe_of names the recipe of a saved config by it
RESUME_KEEPS = ("context", "layers", "width", "heads", "batch_size", "seed")
"""Options a resume must keep as saved: they fix the model's shapes, and the windows each step draws."""

HELP = {
    "text": "train on this UTF-8 file (None: the standard library's pydoc topics, ~465 kB of English)",
    "context": "characters per window (the model's longest input)",
    "layers": "transformer blocks", "width": "model width", "heads": "attention heads",
    "dropout": "dropout after attention, in the MLP and on embeddings",
    "batch_size": "windows per step", "steps": "optimizer steps", "eval_every": "steps between evaluations",
    "eval_batches": "batches of held-out windows per evaluation, spread over the held-out text (None: all of it)",
    "seed": "seed of the model, the windows and dropout", "workdir": "where logs, checkpoints go ('' none)",
    "prompt": "text the samples continue", "sample_every": "steps between generated samples",
    "sample_length": "characters per sample", "temperature": "sampling temperature", "top_k": "sample among the k likeliest",
    "log_every": "steps per logged window", "progress": "progress bar",
    "steps_per_execution": "batches per compiled call (K > 1: one lax.scan of K steps; step intervals left at "
                           "their defaults round up to multiples of K, ones given must be multiples)",
    "checkpoint": "checkpoint at every evaluation into <workdir>/checkpoints",
    "checkpoint_min_seconds": "skip a periodic checkpoint due sooner than this after the last (none: never skip); the last is always saved",
    "resume": "continue from the newest checkpoint", "export": "write the trained model to this folder",
}


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP, each residual."""

    def __init__(self, width: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=heads, in_features=width, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attention(self.ln1(x), mask=mask))
        return x + self.dropout(self.down(nnx.gelu(self.up(self.ln2(x)))))


class CharTransformer(nnx.Module):
    """Decoder-only transformer: ``tokens [B, T] -> logits [B, T, vocab]``, causal, tied head."""

    def __init__(self, vocab: int, *, context: int = 128, layers: int = 3, width: int = 192, heads: int = 4,
                 dropout: float = 0.1, rngs: nnx.Rngs):
        self.context = context
        self.tokens = nnx.Embed(vocab, width, rngs=rngs)
        self.positions = nnx.Embed(context, width, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, dropout, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(width, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[-1]
        if length > self.context:
            raise ValueError(f"a sequence of {length} tokens is longer than the context ({self.context}).")
        x = self.dropout(self.tokens(tokens) + self.positions(jnp.arange(length)))
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.tokens.attend(self.ln(x))


class LanguageModelTrainer(Trainer):
    """Adds bits per character and perplexity, both exact functions of the mean loss."""

    def finish_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Adds ``bpc`` (bits per character, ``loss / ln 2``) and ``perplexity`` beside the mean ``loss``."""
        metrics = dict(metrics)
        if "loss" in metrics:
            metrics["bpc"] = metrics["loss"] / math.log(2)
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        return metrics


def load_corpus(config: TransformerConfig) -> str:
    """The text to train on (``--text`` or the default corpus), long enough for a window of ``--context``
    in each split; a ``ValueError`` naming the flags otherwise."""
    min_chars = 10 * (config.context + 1)  # each split needs at least one window plus its target
    if config.text:
        return load_text(config.text, min_chars=min_chars)
    text = default_corpus()
    if len(text) < min_chars:
        raise ValueError(f"--context {config.context} needs at least {min_chars} characters of text (a window "
                         f"plus one in the held-out 10%), but the default text has {len(text)}; use a smaller "
                         "--context or a longer --text.")
    return text


def vocab_problem(config: TransformerConfig, text: str) -> str | None:
    """A resume must see the characters its checkpoint was trained on: the model has a token for each."""
    saved = saved_config(Path(config.workdir), logged=False) if config.resume and config.workdir else None
    chars = CharVocab.from_text(text[:int(0.9 * len(text))]).chars
    if saved is None or "vocab" not in saved or saved["vocab"] == chars:
        return None
    return (f"the checkpoint in --workdir {config.workdir} was trained on a text of other characters "
            f"({len(saved['vocab'])} distinct; this one, --text {config.text or 'None'}, has {len(chars)}): its tokens would mean other "
            f"characters. Resume with the text it was saved with (--text {saved.get('text') or 'None'}).")


def build(config: TransformerConfig, text: str, callbacks: Sequence | None = None):
    """The trainer, the training windows and the validation windows; the vocabulary is in ``config``."""
    split = int(0.9 * len(text))
    vocab = CharVocab.from_text(text[:split])
    train = TextWindows(vocab.encode(text[:split]), context=config.context, batch_size=config.batch_size,
                        seed=config.seed)
    valid = eval_windows(vocab.encode(text[split:]), context=config.context, batch_size=config.batch_size,
                         max_windows=None if config.eval_batches is None else config.eval_batches * config.batch_size)
    model = CharTransformer(len(vocab), context=config.context, layers=config.layers, width=config.width,
                            heads=config.heads, dropout=config.dropout, rngs=nnx.Rngs(config.seed))
    tx = build_optimizer(config.optim, config.steps)
    if callbacks is None:
        callbacks = default_callbacks(config, vocab, valid)
    trainer = LanguageModelTrainer(model, tx, max_steps=config.steps, seed=config.seed, workdir=config.workdir or None,
                                   config={**run_config(config), "vocab": vocab.chars}, callbacks=callbacks,
                                   steps_per_execution=config.steps_per_execution)
    return trainer, train, valid, vocab


def sample_prompt(config: TransformerConfig, vocab: CharVocab, valid) -> str:
    """``--prompt``, checked against the vocabulary. The default one (``The ``) on a text without those
    characters gives way to the validation text's first characters, said on stderr; a prompt given
    that is empty or holds characters the training text never uses is a ``UsageError``."""
    prompt = config.prompt
    unknown = sorted(set(prompt) - set(vocab.chars))
    default = TransformerConfig.prompt
    if unknown and prompt == default:  # id 0 (a character the training text lacks) decodes to no character of it
        tokens = [t for t in valid.arrays["tokens"][0][:len(default)].tolist() if t != CharVocab.UNKNOWN]
        prompt = vocab.decode(tokens) or vocab.chars[0]
        print(f"the default --prompt {default!r} uses characters the text does not; the samples continue "
              f"{prompt!r} (the validation text's start) instead", file=sys.stderr, flush=True)
        return prompt
    if not prompt:
        raise UsageError("--prompt '' is empty: the samples continue it; give at least one character of the text.")
    if unknown:
        raise UsageError(f"--prompt {prompt!r} has characters the training text never uses ({''.join(unknown)!r}): "
                         "the model has no token for them. Write the prompt with characters of the text.")
    return prompt


def default_callbacks(config: TransformerConfig, vocab: CharVocab, valid) -> list:
    """The recipe's callbacks as ``config`` chooses them: progress, logging, NaN checks, grad norm, an
    evaluation on ``valid`` every ``eval_every`` steps, text samples, and checkpoints with the evaluations."""
    prompt = sample_prompt(config, vocab, valid)
    callbacks = [*standard_callbacks(config.workdir or None, log_every=config.log_every, progress=config.progress),
                 Evaluator(valid, every_n_steps=config.eval_every, every_n_epochs=None),
                 TextSamples(prompt, encode=vocab.encode, decode=vocab.decode, context=config.context,
                             every_n_steps=config.sample_every, length=config.sample_length,
                             temperature=config.temperature, top_k=config.top_k, seed=config.seed)]
    if config.checkpoint and config.workdir:
        callbacks.append(Checkpoint(every_n_steps=config.eval_every, every_n_epochs=None, max_to_keep=2,
                                    min_interval_seconds=config.checkpoint_min_seconds))
    return callbacks


def run(config: TransformerConfig) -> float:
    """Trains; prints and returns the validation bits per character."""
    started = time.perf_counter()
    config = prepare_workdir(config, "transformer", fixed=RESUME_KEEPS)
    with reading_options():
        text = load_corpus(config)
    problem = vocab_problem(config, text)
    if problem:
        raise UsageError(problem)
    trainer, train, valid, _ = build(config, text)
    with fitting(config, "transformer"):
        trainer.fit(train, resume=config.resume)
    evaluated_now = any(ev.last_step == trainer.step for ev in trainer.evaluators) and "eval/bpc" in trainer.eval_metrics
    metrics = trainer.eval_metrics if evaluated_now else {  # a finished run resumed: evaluated again, unprefixed,
        f"eval/{name}": value for name, value in trainer.evaluate(valid).items()}  # so no log repeats a step
    if config.export:
        print(f"exported the model to {trainer.save_model(config.export)}")
    print(f"trained to step {trainer.step} in {time.perf_counter() - started:.1f}s")
    print(f"validation bits per character: {metrics['eval/bpc']:.4f}")
    return metrics["eval/bpc"]


def heads_problem(config: TransformerConfig) -> str | None:
    """``--heads`` must divide ``--width``: each attention head gets ``width / heads`` dimensions."""
    if config.width % config.heads:
        return (f"--heads {config.heads} must divide --width {config.width}: each head gets width / heads "
                "dimensions (try --heads 4 with --width 128).")
    return None


def main(argv: Sequence[str] | None = None) -> float:
    """``nnx-train transformer [options]``: parses ``argv`` (``--help`` lists them), runs; the validation bits/char."""
    config = parse_config(TransformerConfig, argv, prog="nnx-train transformer", help_texts=HELP,
                          description="Train a small character-level transformer language model.",
                          checks=[heads_problem])
    with usage_errors("nnx-train transformer"):
        return run(config)


if __name__ == "__main__":
    main(sys.argv[1:])
