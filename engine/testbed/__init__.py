"""The testbed: a verifiable task, a tiny Llama-architecture model trained on it by our own code,
and its self-evaluation adapter, bundled as the default model of `selfeval demo`.

Four tasks, each a module with the same names (NAME, LEVELS, DEMO_LEVELS, DATA_LEVELS, CHECKPOINTS,
DATA_CHECKPOINTS, MAX_TOKENS, SPLIT_LETTERS, Problem, make_problem, problems, verify, corrupt):
`arith` (engine.testbed.task, chained addition with written steps), `paths` (engine.testbed.paths,
a path in a small graph), `edges` (engine.testbed.edges, the same with one token per edge,
EDGE_TOKENS; the bundled model's) and `avoid` (engine.testbed.avoid, a path that must not pass one
node). A built model names its task in RECIPE.json."""

import importlib
import json
from pathlib import Path
from types import ModuleType

BUNDLED = Path(__file__).resolve().parent / "model"  # base checkpoint; adapter in BUNDLED/adapter
TASKS = {"arith": "engine.testbed.task", "paths": "engine.testbed.paths", "edges": "engine.testbed.edges",
         "avoid": "engine.testbed.avoid"}


def load_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown testbed task {name!r}: one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[name])


def task_of(model_dir: str | Path) -> ModuleType:
    """The task a testbed model was built for (its RECIPE.json; arith when it has none)."""
    recipe = Path(model_dir) / "RECIPE.json"
    name = json.loads(recipe.read_text()).get("task", "arith") if recipe.exists() else "arith"
    return load_task(name)
