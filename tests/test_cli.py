"""node.py's command line: one parser per role, help per role, and one error line for a flag the
chosen role does not take."""

from __future__ import annotations

import subprocess
import sys

import pytest

import node
from tests.conftest import ROOT


def run_node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "node.py"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def flags_of(role: str) -> set[str]:
    return {opt for action in node._parser(role)._actions for opt in action.option_strings}


def test_top_help_lists_the_roles_one_line_each() -> None:
    proc = run_node("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for role, what in node.ROLES.items():
        assert sum(line.split()[:1] == [role] for line in lines) == 1, f"{role} not listed once"
        assert any(line.split()[:1] == [role] and what in line for line in lines)
    assert "--max-queue" not in proc.stdout  # no flag of any one role


def test_role_help_lists_only_what_the_role_takes() -> None:
    proc = run_node("--role", "trainer", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--local", "--expert", "--steps", "--batch-size", "--heartbeat", "--initial-peers", "--identity"):
        assert flag in proc.stdout
    for flag in ("--max-queue", "--holdout-fraction", "--mode", "--eval-n", "--follow", "--once"):
        assert flag not in proc.stdout


@pytest.mark.parametrize("role", list(node.ROLES))
def test_every_role_has_help(role: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        node.parse_args(["--role", role, "--help"])
    assert e.value.code == 0
    assert node.ROLES[role] in " ".join(capsys.readouterr().out.split())


def test_each_flag_belongs_to_the_roles_that_use_it() -> None:
    swarm = {"--initial-peers", "--identity", "--host-maddrs", "--announce-maddrs", "--join-timeout"}
    for role in ("bootstrap", "prepare", "trainer", "server", "client", "status"):
        assert swarm <= flags_of(role), role
    for role in ("eval", "export"):
        assert not swarm & flags_of(role), role
    assert "--holdout-fraction" in flags_of("prepare") and "--holdout-fraction" not in flags_of("trainer")
    assert "--max-queue" in flags_of("server") and "--max-queue" not in flags_of("client")
    assert "--out" in flags_of("export") and "--out" not in flags_of("client")
    for role in ("prepare", "trainer", "server", "client", "status"):
        assert "--run" in flags_of(role), role
    assert "--run" not in flags_of("bootstrap")
    assert "--allow" in flags_of("prepare") and "--allow" not in flags_of("trainer")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "trainer", "--max-queue", "3"], "node.py --role trainer: does not take --max-queue"),
        (["--role", "server", "--expert", "0", "--holdout-fraction", "0.1"], "does not take --holdout-fraction"),
        (["--role", "status", "stray", "--once"], "takes no argument 'stray'"),
        (["--role", "client", "--out", "x.png", "a cat"], "does not take --out"),  # no prefix of --output
        (["--role", "bootstrap", "--initial-peers", "localhost:31337"], "--initial-peers takes multiaddrs"),
        (["--role", "nope"], "invalid choice: 'nope'"),
        (["--expert", "0"], "give a role: --role"),
    ],
)
def test_a_flag_the_role_does_not_take_is_one_line_and_exit_2(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        node.parse_args(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_the_same_error_from_a_real_process() -> None:
    proc = run_node("--role", "trainer", "--local", "--max-queue", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: node.py --role trainer: does not take --max-queue (see python node.py --role trainer --help)"
    ]


def test_a_prompt_after_initial_peers_stays_a_prompt() -> None:
    peer = "/ip4/127.0.0.1/tcp/31337/p2p/QmPeer"
    args = node.parse_args(["--role", "client", "--initial-peers", peer, "red apple", "--steps", "4"])
    assert args.prompts == ["red apple"] and args.initial_peers == [peer] and args.steps == 4
    args = node.parse_args(["--role", "client", "sun", "--initial-peers", peer, "moon"])
    assert args.prompts == ["sun", "moon"] and args.initial_peers == [peer]


def test_role_defaults() -> None:
    args = node.parse_args(["--role", "trainer", "--local", "--expert", "1"])
    assert (args.steps, args.minutes, args.job, args.expert) == (0, 0.0, "expert", "1")
    args = node.parse_args(["--role=server", "--expert", "0,3"])
    assert args.role == "server" and args.run_timeout == 60.0 and args.device == "cpu"
    args = node.parse_args(["--role", "eval"])
    assert args.eval_rows.split(",") == ["top-1", "top-2", "threshold", "full", "oracle", "monolith", "monolith@S"]
    assert args.steps == 30


# ------------------------------------------------------------------ the docs' command lines
def doc_files() -> list[str]:
    """The documents whose command lines are checked: the README, the bootstrap guide, docs/*.md."""
    return ["README.md", "bootstrap/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def code_lines(text: str) -> list[str]:
    """The lines of a markdown text's code blocks (fenced, or indented by four spaces), continuation
    lines (ending in a backslash) joined."""
    out, fenced, lines, i = [], False, text.splitlines(), 0
    while i < len(lines):
        raw = lines[i]
        if raw.strip().startswith("```"):
            fenced = not fenced
        elif fenced or raw.startswith("    "):
            line = raw.strip()
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
            out.append(line)
        i += 1
    return out


def node_args(argv: list[str]) -> list[str] | None:
    """What node.py's parser gets from a printed command line: ``python node.py ARGS``,
    ``diffswarm ARGS`` (the installed command) or ``torchrun ... -- node.py ARGS``; None for
    any other line."""
    if argv[:2] == ["python", "node.py"]:
        return argv[2:]
    if argv[:1] == ["diffswarm"]:
        return argv[1:]
    if argv[:1] == ["torchrun"] and "--" in argv and argv[argv.index("--") + 1 : argv.index("--") + 2] == ["node.py"]:
        return argv[argv.index("--") + 2 :]
    return None


def readme_commands() -> list[tuple[str, str]]:
    """(file, command) for every node.py command line in the docs' code blocks."""
    return [
        (doc, line)
        for doc in doc_files()
        for line in code_lines((ROOT / doc).read_text())
        if line.startswith(("python node.py", "diffswarm ", "torchrun "))
    ]


def spellings(command: str) -> list[str]:
    """The command with every ``[optional]`` part left out, and with each one put in (its first
    alternative where it lists ``a | b`` or ``a|b``): both must work as printed."""
    import re

    group = re.compile(r"\[([^\[\]]*)\]")

    def first(m: re.Match) -> str:
        words = m.group(1).split(" | ")[0].split()
        return " ".join(w.split("|")[0] for w in words if w != "...")

    return [re.sub(r"\s+", " ", group.sub("", command)).strip(), group.sub(first, command)]


COMMANDS = readme_commands()


def role_of(command: str) -> str:
    args = node_args(shlex_split(command)) or []
    return args[args.index("--role") + 1] if "--role" in args[:-1] else ""


def test_the_docs_show_command_lines() -> None:
    roles = {role_of(cmd) for _, cmd in COMMANDS}
    assert roles >= set(node.ROLES) - {"eval"}, f"the docs show no command for {set(node.ROLES) - roles}"
    assert {doc for doc, _ in COMMANDS} >= {"README.md", "docs/swarm.md", "docs/training.md"}


def test_code_lines_and_node_args() -> None:
    text = "x\n    python node.py --role status \\\n        --once\n```bash\ndiffswarm --role export\n```\nnot code"
    assert code_lines(text) == ["python node.py --role status --once", "diffswarm --role export"]
    torchrun = ["torchrun", "--nproc-per-node", "2", "--", "node.py", "--role", "trainer"]
    assert node_args(torchrun) == ["--role", "trainer"]
    assert node_args(["make", "demo"]) is None


def shlex_split(command: str) -> list[str]:
    import shlex

    return shlex.split(command, comments=True)


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[c[:60] for _, c in COMMANDS])
def test_every_command_line_the_docs_show_parses_as_printed(doc: str, command: str) -> None:
    for spelled in spellings(command):
        argv = shlex_split(spelled)
        args_in = node_args(argv)
        assert args_in is not None, f"{doc}: {spelled}"
        args = node.parse_args(args_in)  # a usage error would exit 2 here
        quoted = [w for w in argv if " " in w]  # what the docs quote is a prompt
        assert quoted == [w for w in getattr(args, "prompts", []) if " " in w], f"{doc}: {spelled}"
        assert all(p.startswith("/") for p in getattr(args, "initial_peers", None) or []), f"{doc}: {spelled}"


# ------------------------------------------------------------------ documents named in the repository
# Documents a tool writes when it runs, which the repository therefore does not hold: path → writer.
WRITTEN_BY_TOOLS = {"benchmarks/RESULTS_GPU.md": "benchmarks/train_gpu.py"}


def repository_files() -> list[str]:
    """Tracked files and new ones not ignored, as git lists them."""
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    return sorted({f for f in proc.stdout.splitlines() if (ROOT / f).is_file()})


def named_documents(path: str, text: str) -> set[str]:
    """The document paths a file names: a markdown file whose name is in capitals (``README.md``)
    or that lies under docs/ or results/, anywhere in the text; in markdown, every relative link."""
    import re

    found = set()
    for m in re.finditer(r"(?<![\w./-])((?:[\w.-]+/)*([\w.-]+)\.md)\b", text):
        name, stem = m.group(1), m.group(2)
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", stem) or name.startswith(("docs/", "results/")):
            found.add(name)
    if path.endswith(".md"):
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            target = m.group(1).split("#")[0]
            if target and not re.match(r"[a-z][a-z0-9+.-]*:", target):  # not a URL or mailto:
                found.add(target)
    return found


def missing_documents_in(path: str, text: str) -> list[str]:
    """The documents ``text`` (the file ``path``) names that are neither in the repository, from
    its root or from the file's folder, nor written by a tool."""
    here, out = (ROOT / path).parent, []
    for name in sorted(named_documents(path, text)):
        candidates = [(ROOT / name).resolve(), (here / name).resolve()]
        if any(c.exists() for c in candidates):
            continue
        if any(c.is_relative_to(ROOT) and str(c.relative_to(ROOT)) in WRITTEN_BY_TOOLS for c in candidates):
            continue
        out.append(f"{path} names {name}, which is not in the repository")
    return out


def missing_documents(files: list[str]) -> list[str]:
    return [
        line
        for f in files
        if f.endswith((".md", ".py"))
        for line in missing_documents_in(f, (ROOT / f).read_text(errors="replace"))
    ]


def test_named_documents_are_found() -> None:
    old = "DESIGN" + ".md"  # spelled apart: this file must not name a missing document itself
    text = f"docs/design.md §4, the {old} of old, outputs/eval/eval.md, [x](../guide.md#top), [w](https://a.b/C.md)"
    assert named_documents("notes/a.md", text) == {"docs/design.md", old, "../guide.md"}
    assert named_documents("a.py", text) == {"docs/design.md", old}
    assert missing_documents_in("notes/a.md", text) == [
        f"notes/a.md names {name}, which is not in the repository" for name in ("../guide.md", old)
    ]


def test_every_document_the_repository_names_exists() -> None:
    files = repository_files()
    assert "README.md" in files
    for doc, writer in WRITTEN_BY_TOOLS.items():
        assert doc.rsplit("/", 1)[-1] in (ROOT / writer).read_text(), f"{writer} no longer writes {doc}"
    assert missing_documents(files) == []
