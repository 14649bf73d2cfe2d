"""The testbed: a verifiable arithmetic task, a tiny Llama-architecture model trained on it by
our own code, and its self-evaluation adapter, bundled as the default model of `selfeval demo`."""

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "model"  # base checkpoint; adapter in BUNDLED/adapter
