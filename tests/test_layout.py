"""The layout's one rule: each stage of the data flow is a package, and imports only go one way.

``LAYERS`` is the package order, from the bottom, written once (docs/design.md describes it).
A module may import its own package and any package of a lower layer; packages of one layer
never import each other. Every import counts, also the lazy ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, ...]] = [
    ("experts",),  # presets, objectives, frozen encoders: what a model is made of
    ("data",),  # sources, prepare, manifest, streaming, checkpoint, job names: what is stored and hashed
    ("router",),  # router network, combination, routed sampling, audits, the set's folders
    ("training",),  # the loop and the jobs (expert, router, monolith), local training
    ("swarm",),  # DHT, records, claims, blobs, proofs, verification, mirrors, reachability, the relay proxy
    ("diffswarm",),  # the pipeline: the set sampled as one model, its experts here or on the swarm's servers
    ("evaluation", "roles"),  # FID and the eval role | the roles: trainer, preparer, server, client, status
    ("node", "benchmarks"),  # the command line; measurements
]


def rank_of(layers: list[tuple[str, ...]]) -> dict[str, int]:
    return {pkg: i for i, layer in enumerate(layers) for pkg in layer}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def violations(root: Path, layers: list[tuple[str, ...]]) -> list[str]:
    """Every import in ``root`` that runs up the layers or sideways between packages of one layer."""
    rank = rank_of(layers)
    out = []
    for pkg in rank:
        files = [root / f"{pkg}.py"] if (root / f"{pkg}.py").is_file() else sorted((root / pkg).rglob("*.py"))
        for f in files:
            for other in sorted(imported_packages(f) & rank.keys() - {pkg}):
                if rank[other] >= rank[pkg]:
                    where = "same layer" if rank[other] == rank[pkg] else "higher"
                    out.append(f"{f.relative_to(root)} imports {other} ({where})")
    return out


def test_imports_run_one_way() -> None:
    assert violations(ROOT, LAYERS) == []


def test_every_package_has_a_layer() -> None:
    """A new package must be placed in ``LAYERS``, or the rule would not cover it."""
    rank = rank_of(LAYERS)
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bootstrap"}
    assert packages <= rank.keys(), f"packages missing from LAYERS: {sorted(packages - rank.keys())}"


def test_check_catches_upward_and_sideways_imports(tmp_path: Path) -> None:
    """The check itself: a lower package importing a higher one, and two packages of one layer."""
    for pkg, body in {
        "low": "def f():\n    from high.thing import x  # a lazy import counts too\n",
        "high": "import low.thing\n",
        "left": "from right import y\n",
        "right": "",
    }.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "thing.py").write_text(body)
    found = violations(tmp_path, [("low",), ("left", "right"), ("high",)])
    assert found == [
        f"{Path('low/thing.py')} imports high (higher)",
        f"{Path('left/thing.py')} imports right (same layer)",
    ]


@pytest.mark.parametrize("pkg", ["experts", "data", "router", "training", "evaluation", "swarm", "roles"])
def test_every_module_says_what_it_is_for(pkg: str) -> None:
    for f in sorted((ROOT / pkg).glob("*.py")):
        if f.name != "__init__.py":
            assert ast.get_docstring(ast.parse(f.read_text())), f"{f.relative_to(ROOT)} has no module docstring"
