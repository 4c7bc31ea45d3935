"""Smoke tests: the teaching-tool examples and the `radixkv` console script run and print their
key results (each as a subprocess with this interpreter, the project's .venv python)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PNG_SIGNATURE

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], timeout: float = 120) -> str:
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def test_calculator_example() -> None:
    out = run([sys.executable, "examples/calculator.py"])
    assert "320.0 KiB (327,680 B = 2 x 80 x 8 x 128 x 2 B)" in out
    assert "tp=8" in out and "fp8" in out
    assert "llama-3-70b" in out


def test_fragmentation_example(tmp_path: Path) -> None:
    out = run([sys.executable, "examples/fragmentation.py", "--out", str(tmp_path),
               "--requests", "60"])
    assert "[0,40) free, [40,80) B, [80,100) free" in out
    assert "60 blocks free, but the largest hole is 40 < 50 that C must reserve" in out
    assert "Random trace: 60 requests" in out
    for name in ("fragmentation_seed.png", "fragmentation_random.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE


def test_visualize_tree_example(tmp_path: Path) -> None:
    out = run([sys.executable, "examples/visualize_tree.py", "--out", str(tmp_path),
               "--tokenizer", "word"])
    assert "evicted" in out and "RadixCache:" in out and "KV pool:" in out
    assert "system: You are a helpful assistant." in out
    for name in ("tree.png", "memory_map.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "tree.dot").read_text().startswith("digraph")


def test_console_script_calc() -> None:
    script = shutil.which("radixkv", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the radixkv console script is not installed next to this python")
    out = run([script, "calc", "llama-3-70b", "--context", "4096"])
    assert "320.0 KiB" in out and "1.25 GiB (4,096 tokens)" in out
