"""Times a convolution's kernel gradient three ways, the measurements behind ``trainer.conv_grads.plan``.

    python -m benchmarks.kernel_grads            # the shapes of HISTORY.md's table ("Sitting 13")
    python -m benchmarks.kernel_grads --shape 128 14 14 32 64 3

For each shape (batch, height, width, input channels, output channels, kernel size; stride 1,
"SAME" padding): XLA's own gradient (the transpose of ``lax.conv_general_dilated``), one matrix
product per kernel tap ("shifted") and one product of the stacked windows ("stacked", im2col), each
jitted alone, median ms of 5 x 10 calls, with the plan ``trainer.conv_grads`` picks. On another
machine, rerun it before trusting the plan's thresholds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from trainer.conv_grads import kernel_grad, plan

SHAPES = ((128, 28, 28, 1, 32, 3), (128, 14, 14, 32, 64, 3), (32, 32, 32, 3, 64, 3), (128, 28, 28, 1, 32, 5),
          (64, 14, 14, 16, 32, 3), (16, 64, 64, 32, 32, 3), (32, 32, 32, 64, 64, 3), (32, 16, 16, 64, 128, 1),
          (32, 16, 16, 128, 128, 3), (32, 8, 8, 256, 256, 3))


def median_ms(fn, *args, calls: int = 10, rounds: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls * 1000)
    return statistics.median(times)


def measure(shape: tuple[int, ...]) -> dict:
    n, h, w, ci, co, k = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((n, h, w, ci), np.float32))
    kernel = jnp.asarray(rng.random((k, k, ci, co), np.float32))
    padding = tuple(jax.lax.padtype_to_pads((h, w), (k, k), (1, 1), "SAME"))

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = jnp.asarray(rng.standard_normal(conv(x, kernel).shape, np.float32))
    xla = jax.jit(lambda x, kernel, g: jax.vjp(lambda kernel: conv(x, kernel), kernel)[1](g)[0])
    row = {"shape": shape, "plan": plan((k, k, ci, co)), "xla": median_ms(xla, x, kernel, g)}
    for how in ("shifted", "stacked"):
        row[how] = median_ms(jax.jit(lambda x, g, how=how: kernel_grad(x, g, (k, k, ci, co), padding, how)), x, g)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=6, type=int, action="append", metavar=("N", "H", "W", "CI", "CO", "K"),
                        help="a shape to time (repeatable); default: the HISTORY.md table's")
    args = parser.parse_args(argv)
    rows = [measure(tuple(shape)) for shape in (args.shape or SHAPES)]
    print("| batch, size, in -> out, kernel | XLA ms | shifted ms | stacked ms | plan |\n|---|---|---|---|---|")
    for r in rows:
        n, h, w, ci, co, k = r["shape"]
        print(f"| {n}, {h}x{w}, {ci} -> {co}, {k}x{k} | {r['xla']:.2f} | {r['shifted']:.2f} | {r['stacked']:.2f} | "
              f"{r['plan'] or 'XLA'} |")
    return rows


if __name__ == "__main__":
    main()
