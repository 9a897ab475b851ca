"""The project installs as a package: built from a copy of its tracked files into a fresh virtual
environment (no network: --no-deps, with this environment's site-packages on its path for the
dependencies), it gives ``import diffswarm`` and the ``diffswarm`` command outside the checkout,
and the README's Python snippet runs there on an export of a small trained run."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import node

ROOT = Path(__file__).resolve().parent.parent


def readme_snippet() -> str:
    """The README's Python block that uses the pipeline."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    uses = [b for b in blocks if "from diffswarm import DiffswarmPipeline" in b]
    assert uses, "the README shows no Python snippet using DiffswarmPipeline"
    return uses[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the project installed (not editable) from a copy of its tracked files."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    fresh = venv / "bin" / "python"
    purelib = subprocess.run(
        [fresh, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # The dependencies (and pip, setuptools) come from this environment, appended after the venv's own.
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [fresh, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
        check=True, timeout=300, env=env, cwd=tmp,
    )  # fmt: skip
    return venv


def _outside(venv: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_and_command_work_outside_the_checkout(installed, tmp_path):
    python = installed / "bin" / "python"
    where = _outside(installed, str(python), "-c", "import diffswarm, router; print(diffswarm.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-800:]
    assert where.stdout.strip().startswith(str(installed)), where.stdout  # the installed copy, not the checkout's
    cmd = _outside(installed, str(installed / "bin" / "diffswarm"), "--role", "client", "--help", cwd=tmp_path)
    assert cmd.returncode == 0 and "--from-export" in cmd.stdout, cmd.stderr[-800:]


def test_the_readme_snippet_runs_on_an_export(installed, small_run, tmp_path):
    export = tmp_path / "exports" / "demo"
    node("--role", "export", "--workdir", str(small_run), "--out", str(export))
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "exports").symlink_to(export.parent)  # the snippet's own path, relative to where it runs
    (work / "snippet.py").write_text(readme_snippet())
    run = _outside(installed, str(installed / "bin" / "python"), "snippet.py", cwd=work)
    assert run.returncode == 0, run.stderr[-1500:]
    saved = [p for p in work.iterdir() if p.suffix == ".png"]
    assert saved, f"the snippet saved no image: {sorted(p.name for p in work.iterdir())}"
