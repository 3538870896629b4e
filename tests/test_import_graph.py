"""The package's imports run one way: the flow of README's file tree, foundations first.

Read from the source (``ast``), function-level imports included: a lazy import that only exists
to dodge a cycle is still a dependency. Every module belongs to exactly one layer; a module may
import modules of its own layer or of earlier ones, never of a later one, and the graph has no
cycle. The two halves of ``data/`` (offline ingest, online streaming) never import each other.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stunet_scale"

# (layer name, module prefixes); the most specific prefix decides a module's layer.
LAYERS = [
    ("foundations", ["version", "config", "faults", "atomic_files", "parent_watch", "models.model_config",
                     "data.class_maps", "surface_metrics", "label_mapping", "inference", "tracking"]),
    ("model", ["models"]),
    ("data format", ["data.store", "data"]),
    ("data ingest and streaming", ["data.ingest", "data.stream"]),
    ("training parts", ["parallel", "checkpointing", "train.loss", "train.schedule"]),
    ("export", ["export"]),
    ("trainer", ["train"]),
    ("downstream tools", ["predict", "evaluate", "planning", "info", "bench", "transfer_study"]),
    ("entry points", ["cli", "__main__", ""]),  # "" is the package facade stunet_scale/__init__.py
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports} ("" is the package itself; names relative to it)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if name else []
                    if not is_package:
                        base = base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and (node.module == "stunet_scale" or node.module.startswith("stunet_scale.")):
                    target = node.module.removeprefix("stunet_scale").lstrip(".")
                else:
                    continue
                for alias in node.names:  # `from . import store` imports the module store
                    sub = f"{target}.{alias.name}" if target else alias.name
                    deps.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "stunet_scale" or alias.name.startswith("stunet_scale."):
                        deps.add(alias.name.removeprefix("stunet_scale").lstrip("."))
        deps.discard(name)
        graph[name] = {d for d in deps if d in modules}
    return graph


def layer_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    if best is None:
        raise AssertionError(f"stunet_scale.{module} is in no layer of tests/test_import_graph.py: add it where it belongs")
    return best[1]


GRAPH = import_graph()


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


def test_no_upward_import():
    upward = []
    for module, deps in sorted(GRAPH.items()):
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(module):
                upward.append(f"stunet_scale.{module} ({LAYERS[layer_of(module)][0]}) imports stunet_scale.{dep} "
                              f"({LAYERS[layer_of(dep)][0]})")
    assert not upward, "imports against the flow:\n" + "\n".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(f"stunet_scale.{m}" for m in cycle)


@pytest.mark.parametrize("half, other", [("data.ingest", "data.stream"), ("data.stream", "data.ingest")])
def test_the_two_halves_of_data_do_not_import_each_other(half, other):
    crossing = [f"stunet_scale.{m} -> stunet_scale.{d}" for m, deps in GRAPH.items() if m.startswith(half + ".")
                for d in deps if d.startswith(other + ".")]
    assert not crossing, crossing


def test_data_code_takes_its_own_config_not_the_trainers():
    offenders = [f"stunet_scale/data/{p.relative_to(PACKAGE / 'data')}" for p in (PACKAGE / "data").rglob("*.py")
                 if "TrainConfig" in p.read_text()]
    assert not offenders, f"data code must take StreamConfig (config.py), not TrainConfig: {offenders}"


def test_the_graph_reader_sees_lazy_imports():
    # a control: transforms.py imports its noise from counter_noise at module level, and the
    # trainer imports the data source; the checks above would pass vacuously on an empty graph
    assert "data.stream.counter_noise" in GRAPH["data.stream.transforms"]
    assert "data.stream.loader" in GRAPH["train.loop"]
    assert sum(len(d) for d in GRAPH.values()) > 150


def test_version_is_pyprojects():
    from stunet_scale.version import __version__

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"] == __version__


def test_readme_file_tree_lists_every_module_and_nothing_else():
    import fnmatch
    import subprocess

    block = (REPO / "README.md").read_text().split("```\nREADME.md", 1)[1].split("```", 1)[0]
    listed = [line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith("#")]
    listed = [p for p in listed if p.startswith(("stunet_scale/", "tests/"))]
    try:
        tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "stunet_scale", "tests"],
                                 cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [f for f in tracked if f.endswith((".py", ".json")) and not f.startswith(("tests/slurm/", "tests/contracts/"))
             or f in ("tests/contracts/stunet_released_state_dicts.json",) or f.startswith("tests/slurm/") and f.endswith(".py")]
    unlisted = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in listed)]
    stale = [p for p in listed if not any(fnmatch.fnmatch(f, p) for f in tracked)]
    assert not unlisted, f"add these to README.md's file tree: {unlisted}"
    assert not stale, f"README.md's file tree lists files that do not exist: {stale}"
