"""Imports flow one way: a module never imports one above it (api -> core -> scheduler, runner,
policies -> sequence, sampling, ...), so there is no import circle to break later."""

import subprocess
import sys

import pytest

ABOVE = {
    "engine.core": ["engine.api"],
    "engine.scheduler": ["engine.api", "engine.core", "engine.policies", "engine.runner"],
    "engine.runner": ["engine.api", "engine.core", "engine.scheduler", "engine.policies"],
    "engine.policies": ["engine.api", "engine.core", "engine.scheduler", "engine.runner"],
    "engine.profiler": ["engine.api", "engine.core", "engine.scheduler", "engine.policies"],
    "engine.step_input": ["engine.api", "engine.core", "engine.scheduler", "engine.runner"],
    "engine.detokenizer": ["engine.api", "engine.core", "engine.scheduler"],
    "engine.outputs": ["engine.api", "engine.core", "engine.runner", "engine.policies"],
    "engine.sequence": ["engine.api", "engine.core", "engine.scheduler", "engine.policies"],
    "engine.config": ["engine.api", "engine.core", "engine.scheduler", "engine.model"],
    "engine.inputs": ["engine.api", "engine.core", "engine.scheduler", "engine.runner", "engine.model"],
}


@pytest.mark.parametrize("module", sorted(ABOVE))
def test_module_imports_nothing_above_it(module):
    code = (f"import sys, {module}; print(','.join(m for m in {ABOVE[module]!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"
