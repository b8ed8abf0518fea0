"""The PyTorch peers on CPU: a plain training loop (``torch``) and PyTorch Lightning (``lightning``).

``run_plain(workload, pacer)`` and ``run_lightning(workload, pacer)`` are what ``benchmarks/worker.py``
calls; neither returns (the pacer exits the process). Needs ``pip install -e ".[bench]"``.

The models mirror ``recipes/mnist.py`` (``CNN``, ``RandomShift``), ``recipes/transformer.py``
(``CharTransformer``, ``Block``) and the MLP of ``benchmarks/workloads.py`` in float32: the same layer
shapes, activations and dropout rates, images as NCHW (converted once, before training), Flax's
initialisers (truncated LeCun normal kernels, zero biases, normal embeddings with std 1/sqrt(width)),
LayerNorm epsilon 1e-6 and the tanh-approximated GELU (``nnx.gelu``). Attention is one fused q/k/v
projection and ``F.scaled_dot_product_attention(is_causal=True)`` (what a PyTorch user writes today;
Flax uses three projections, the same FLOPs). The optimisers mirror ``MnistOptim`` / ``TransformerOptim``
(AdamW + ``LambdaLR`` linear warmup from 0 then cosine decay, as ``optax.warmup_cosine_decay_schedule``;
global-norm clipping 1.0 for the transformer) and ``optax.adam(1e-3)`` for the MLP.

Each step computes the batch accuracy as well as the loss (the JAX variants' ``default_loss`` does);
CPU tensors need no device sync, so the pacer gets ``sync=None``.
"""

from __future__ import annotations

import itertools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import workloads
from benchmarks.protocol import Pacer

# The recipes' optimizer settings (recipes/mnist.py MnistOptim, recipes/transformer.py
# TransformerOptim), copied so that the torch workers need not import the recipes (and so flax).
OPTIM = {
    "mnist_cnn": dict(learning_rate=3e-3, warmup_steps=31, end_learning_rate=0.0, weight_decay=1e-4, clip_norm=None),
    "transformer": dict(learning_rate=3e-3, warmup_steps=100, end_learning_rate=1e-4, weight_decay=0.1, clip_norm=1.0),
}
MLP_LEARNING_RATE = 1e-3
LN_EPSILON = 1e-6  # flax's LayerNorm epsilon


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translates each image [N, C, H, W] by up to ``max_shift`` pixels (zero fill): pad, then crop at a random offset."""
    n, c, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s))
    offsets = torch.randint(0, 2 * s + 1, (n, 2), device=images.device)
    rows = (offsets[:, :1] + torch.arange(h, device=images.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * s)
    cols = (offsets[:, 1:] + torch.arange(w, device=images.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


class CNN(nn.Module):
    """Two 3x3 convolutions (32, 64) with ReLU and 2x2 average pooling, dense 256, dropout, dense 10."""

    def __init__(self, dropout: float = 0.25, max_shift: int = 2):
        super().__init__()
        self.max_shift = max_shift
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.dense1 = nn.Linear(7 * 7 * 64, 256)
        self.dropout = nn.Dropout(dropout)
        self.dense2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.max_shift:
            x = random_shift(x, self.max_shift)
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.dense1(x.flatten(1)))
        return self.dense2(self.dropout(x))


class MLP(nn.Module):
    """64 -> 128 -> 128 -> 10 with ReLU."""

    def __init__(self):
        super().__init__()
        a, b, c, d = workloads.MLP_SIZES
        self.layers = nn.ModuleList([nn.Linear(a, b), nn.Linear(b, c), nn.Linear(c, d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class Block(nn.Module):
    """Pre-LayerNorm block: causal multi-head self-attention, then a GELU MLP (4x), each residual."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width, eps=LN_EPSILON)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width, eps=LN_EPSILON)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.dropout = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, T, head width]
        return self.out(y.transpose(1, 2).reshape(b, t, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.ln1(x)))
        return x + self.dropout(self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh")))


class CharTransformer(nn.Module):
    """Decoder-only transformer: ``tokens [B, T] -> logits [B, T, vocab]``, causal, head tied to the token embedding."""

    def __init__(self, vocab: int, *, context: int, layers: int, width: int, heads: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(width, heads, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(width, eps=LN_EPSILON)
        self.register_buffer("arange", torch.arange(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.tokens(tokens) + self.positions(self.arange[: tokens.shape[-1]]))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln(x), self.tokens.weight)  # tied head: h @ E^T


def flax_like_init(model: nn.Module) -> nn.Module:
    """Flax's defaults: truncated LeCun-normal kernels, zero biases, embeddings N(0, 1/width)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            std = (1.0 / module.weight[0].numel()) ** 0.5 / 0.87962566103423978  # std of the truncated normal
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.embedding_dim ** -0.5)
    return model


def build_model(workload: str) -> nn.Module:
    if workload == "mnist_cnn":
        model = CNN()
    elif workload == "transformer":
        model = CharTransformer(workloads.vocab_size(), **workloads.TRANSFORMER)
    elif workload == "mlp":
        model = MLP()
    else:
        raise ValueError(f"unknown workload {workload!r}; choose from {workloads.WORKLOADS}.")
    return flax_like_init(model)


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end: float):
    """``LambdaLR`` factor of ``optax.warmup_cosine_decay_schedule(0, peak, warmup_steps, total_steps, end)``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        t = min(step - warmup_steps, total_steps - warmup_steps) / (total_steps - warmup_steps)
        return (end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))) / peak
    return factor


def build_optimizer(workload: str, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """AdamW + warmup-cosine ``LambdaLR`` (stepped every step), or Adam for the MLP (no schedule)."""
    if workload == "mlp":
        return torch.optim.Adam(params, lr=MLP_LEARNING_RATE), None
    o = OPTIM[workload]
    optimizer = torch.optim.AdamW(params, lr=o["learning_rate"], weight_decay=o["weight_decay"], eps=1e-8)
    factor = warmup_cosine(o["learning_rate"], o["warmup_steps"], workloads.TOTAL_STEPS, o["end_learning_rate"])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_norm(workload: str) -> float | None:
    return OPTIM.get(workload, {}).get("clip_norm")


def tensor_batches(workload: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The workload's 30 batches as ``(inputs, labels)`` CPU tensors: NCHW images, int64 labels and tokens."""
    out = []
    for batch in workloads.batches(workload):
        if workload == "transformer":
            x, y = torch.from_numpy(batch["tokens"]).long(), torch.from_numpy(batch["targets"]).long()
        else:
            x, y = torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"]).long()
            if x.ndim == 4:
                x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        out.append((x, y))
    return out


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax cross-entropy on integer labels (over all positions) and the accuracy."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss, accuracy


def _setup() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)


def run_plain(workload: str, pacer: Pacer) -> None:
    """A plain PyTorch training loop over the workload's batches, replayed forever."""
    _setup()
    model = build_model(workload)
    optimizer, scheduler = build_optimizer(workload, model.parameters())
    clip = clip_norm(workload)
    batches = tensor_batches(workload)
    model.train()
    pacer.start()
    for x, y in itertools.cycle(batches):
        optimizer.zero_grad(set_to_none=True)
        loss, _accuracy = loss_and_accuracy(model(x), y)  # the accuracy is computed, as in the other variants
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        pacer.step_done(1, None)


def run_lightning(workload: str, pacer: Pacer) -> None:
    """The same training with a ``LightningModule`` and ``Trainer.fit`` on CPU; the pacer ends the process."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    class Batches(Dataset):
        """The pre-made batches; a DataLoader with ``batch_size=None`` yields them as they are."""

        def __init__(self, batches):
            self.batches = batches

        def __len__(self):
            return len(self.batches)

        def __getitem__(self, i):
            return self.batches[i]

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model(workload)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss, accuracy = loss_and_accuracy(self.model(x), y)
            self.log("loss", loss)
            self.log("accuracy", accuracy)
            return loss

        def configure_optimizers(self):
            optimizer, scheduler = build_optimizer(workload, self.parameters())
            if scheduler is None:
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class Pacing(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pacer.step_done(1, None)

    _setup()
    module = Module()
    loader = DataLoader(Batches(tensor_batches(workload)), batch_size=None, shuffle=False, num_workers=0)
    clip = clip_norm(workload)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Pacing()],
                        gradient_clip_val=clip, gradient_clip_algorithm="norm" if clip is not None else None)
    pacer.start()
    trainer.fit(module, loader)
