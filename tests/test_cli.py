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


# ------------------------------------------------------------------ README's command lines
DOCS = ["README.md", "bootstrap/README.md"]


def readme_commands() -> list[tuple[str, str]]:
    """(file, command) for every ``python node.py`` line in the docs' code blocks, continuation
    lines joined."""
    out = []
    for doc in DOCS:
        lines = (ROOT / doc).read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            if lines[i].startswith("    ") and line.startswith("python node.py"):
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                out.append((doc, line))
            i += 1
    return out


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


def test_the_docs_show_command_lines() -> None:
    roles = {shlex_split(cmd)[3] for _, cmd in COMMANDS}
    assert roles >= set(node.ROLES) - {"eval"}, f"README shows no command for {set(node.ROLES) - roles}"


def shlex_split(command: str) -> list[str]:
    import shlex

    return shlex.split(command, comments=True)


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[c[:60] for _, c in COMMANDS])
def test_every_command_line_the_docs_show_parses_as_printed(doc: str, command: str) -> None:
    for spelled in spellings(command):
        argv = shlex_split(spelled)
        assert argv[:2] == ["python", "node.py"], spelled
        args = node.parse_args(argv[2:])  # a usage error would exit 2 here
        quoted = [w for w in argv if " " in w]  # what the docs quote is a prompt
        assert quoted == [w for w in getattr(args, "prompts", []) if " " in w], f"{doc}: {spelled}"
        assert all(p.startswith("/") for p in getattr(args, "initial_peers", None) or []), f"{doc}: {spelled}"
