"""The README's complete example runs as printed (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "trainer.fit(" in b and "class MLP" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "readme" / "metrics.csv").exists()
    assert namespace["trainer"].step > 0


def readme_block(first_line: str) -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.startswith(first_line))


def test_readme_patterns_run():
    for title in ("# Overfit one batch", "# Mixed precision", "# Freeze part of the model", "# Lower the learning rate",
                  "# Accumulate gradients", "# A metric that is no mean over examples"):
        exec(compile(readme_block(title), f"README.md: {title}", "exec"), {})  # each asserts what it shows


def test_readme_more_than_one_device_runs_on_8_host_devices(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "devices.py"
    script.write_text(readme_block("# More than one device"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("8 devices: ") and eval(last.split(": ", 1)[1])["accuracy"] > 0.8, last
