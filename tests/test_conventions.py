"""The conventions a user expects of a command-line tool: completion of its command line in bash and
zsh (driven through the real shells), `--help` with examples, a log file that rotates, and
`config init`. Every `kvmshell` here is a real process, with its config and state in tmp_path."""

from __future__ import annotations

import argparse
import functools
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmshell.cli import build_parser
from kvmshell.cli.common import Exit
from kvmshell.config import load_config, parse_config
from kvmshell.errors import ConfigError

KVMSHELL = Path(sys.executable).parent / "kvmshell"     # the console script, as a user's shell runs it

CONFIG = """\
[hosts.hostA]
ssh = "root@a.example"

[hosts.hostB]
ssh = "root@b.example"

[guests.vm1]
monitor = "qmp:unix:/run/vm1.qmp"

[guests.vmx]
monitor = "qmp:unix:/run/vmx.qmp"

[guests.web]
monitor = "qmp:unix:/run/web.qmp"
"""


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KVMSHELL_CONFIG"}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_STATE_HOME=str(tmp_path / "state"),
               PATH=f"{KVMSHELL.parent}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def kvmshell(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KVMSHELL), *args], capture_output=True, text=True, timeout=60, check=False,
                          env=env_for(tmp_path, **extra))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.toml"
    path.write_text(CONFIG)
    return path


# -- completion ------------------------------------------------------------------------------------

def bash_complete(tmp_path: Path, line: str, **extra: str) -> list[str]:
    """What bash offers at the end of ``line``: the script sourced, the function that `complete -p`
    registered for kvmshell called as readline would call it."""
    script = tmp_path / "kvmshell.bash"
    if not script.exists():
        made = kvmshell(tmp_path, "completion", "bash")
        assert made.returncode == 0, made.stderr
        script.write_text(made.stdout)
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    words[0] = str(KVMSHELL)
    driver = f"""
source {shlex.quote(str(script))}
fn=$(complete -p kvmshell | sed -E 's/.*-F ([^ ]+).*/\\1/')
COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE={shlex.quote(line)}
COMP_POINT=${{#COMP_LINE}}
"$fn" kvmshell "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", driver], capture_output=True, text=True,
                          timeout=60, check=False, env=env_for(tmp_path, **extra))
    assert done.returncode == 0 and not done.stderr, done
    return sorted(w for w in done.stdout.splitlines() if w)


def zsh_complete(tmp_path: Path, line: str, *, load: str = "fpath", **extra: str) -> list[str]:
    """What zsh offers at the end of ``line``: an interactive zsh on a pty with the script in its fpath
    (or, ``load="eval"``, evaluated after compinit), the line typed and TAB pressed; a `compadd`
    wrapper records the matches."""
    fdir = tmp_path / "zfunc"
    if not fdir.exists():
        made = kvmshell(tmp_path, "completion", "zsh")
        assert made.returncode == 0, made.stderr
        fdir.mkdir()
        (fdir / "_kvmshell").write_text(made.stdout)
    matches, done = tmp_path / "matches", tmp_path / "done"
    matches.unlink(missing_ok=True)
    done.unlink(missing_ok=True)
    master, slave = pty.openpty()
    zsh = subprocess.Popen(["zsh", "-f", "-i"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                           env=env_for(tmp_path, TERM="dumb", PS1="", **extra))
    os.close(slave)
    seen = b""

    def read_until(what: str, holds: object) -> None:
        nonlocal seen
        deadline = time.monotonic() + 30
        while not holds():                                   # type: ignore[operator]
            assert time.monotonic() < deadline, f"zsh: {what} not seen within 30 s: {seen[-2000:]!r}"
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 65536)

    try:
        script = shlex.quote(str(fdir / "_kvmshell"))
        setup = (f"fpath=({shlex.quote(str(fdir))} $fpath); autoload -Uz compinit && compinit -u -D; "
                 if load == "fpath" else f"autoload -Uz compinit && compinit -u -D; eval \"$(<{script})\"; ")
        setup += ("compadd() { if (( ${@[(I)-[OAD]*]} )); then builtin compadd \"$@\"; return; fi; "
                  f"local -a m; builtin compadd -O m \"$@\"; print -rl -- $m >> {shlex.quote(str(matches))}; "
                  "builtin compadd \"$@\"; }; PS1='READY%% '\n")
        os.write(master, setup.encode())
        read_until("the prompt", lambda: b"READY% " in seen)   # zle reads the line now, not the tty driver
        os.write(master, f"{line}\t".encode())
        os.write(master, f"\x15print ok > {shlex.quote(str(done))}\n".encode())
        read_until("the completion", done.exists)
        os.write(master, b"exit\n")
        zsh.wait(timeout=30)
    finally:
        if zsh.poll() is None:
            zsh.kill()
            zsh.wait(timeout=30)
        os.close(master)
    return sorted(w for w in (matches.read_text().splitlines() if matches.exists() else []) if w)


Complete = Callable[..., list[str]]
NO_ZSH = pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (make system-deps installs it)")
SHELLS = [pytest.param(bash_complete, id="bash"),
          pytest.param(zsh_complete, id="zsh", marks=NO_ZSH),
          pytest.param(functools.partial(zsh_complete, load="eval"), id="zsh-eval", marks=NO_ZSH)]


@pytest.mark.parametrize("complete", SHELLS)
def test_completion_of_subcommands_options_and_their_values(tmp_path: Path, complete: Complete) -> None:
    assert complete(tmp_path, "kvmshell gu") == ["guests"]
    assert complete(tmp_path, "kvmshell --con") == ["--config", "--connect-timeout"]
    assert complete(tmp_path, "kvmshell completion ") == ["bash", "zsh"]
    assert complete(tmp_path, "kvmshell config ") == ["init"]
    assert complete(tmp_path, "kvmshell demo --") == ["--help", "--no-ui", "--shell"]
    offered = complete(tmp_path, "kvmshell ")
    assert {"guests", "hosts", "shell", "tui", "run", "report", "config", "completion"} <= set(offered)
    assert "_names" not in offered, "the hidden subcommand is offered"


@pytest.mark.parametrize("complete", SHELLS)
def test_completion_of_guest_and_host_names_from_the_config(tmp_path: Path, config: Path, complete: Complete) -> None:
    assert complete(tmp_path, f"kvmshell --config {config} tls-init /tmp/pki h") == ["hostA", "hostB"]
    if complete is bash_complete:          # shtab's zsh script completes the first of nargs="+" only
        assert complete(tmp_path, f"kvmshell --config {config} tls-init /tmp/pki hostA h") == ["hostA", "hostB"]
    assert complete(tmp_path, f"kvmshell --config {config} -c @v") == ["@vm1", "@vmx"]
    assert complete(tmp_path, f"kvmshell --config {config} -c ") == ["@all", "@vm1", "@vmx", "@web"]
    # the config from the environment, as kvmshell itself finds it
    assert complete(tmp_path, "kvmshell -c @w", KVMSHELL_CONFIG=str(config)) == ["@web"]
    # a config that does not load completes no name, and says nothing on the terminal
    assert complete(tmp_path, f"kvmshell --config {tmp_path}/missing.toml -c @") == []


def test_the_hidden_names_command(tmp_path: Path, config: Path) -> None:
    hosts = kvmshell(tmp_path, "--config", str(config), "_names", "hosts")
    assert (hosts.returncode, hosts.stdout) == (0, "hostA\nhostB\n")
    guests = kvmshell(tmp_path, "_names", "guests", KVMSHELL_CONFIG=str(config))
    assert (guests.returncode, guests.stdout) == (0, "vm1\nvmx\nweb\n")
    assert "_names" not in kvmshell(tmp_path, "--help").stdout
    bad = kvmshell(tmp_path, "completion", "fish")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "Traceback" not in bad.stderr, bad


# -- help ------------------------------------------------------------------------------------------

def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The public subcommands (those listed by --help)."""
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    listed = {a.dest for a in sub._get_subactions()}
    return {name: p for name, p in sub.choices.items() if name in listed}


def example_lines(help_text: str) -> list[list[str]]:
    """The `kvmshell ...` command lines of the examples section, each as argv (without the program)."""
    _, found, section = help_text.partition("\nexamples:\n")
    assert found, f"no examples in:\n{help_text}"
    argvs = []
    for line in section.splitlines():
        command = re.split(r"\s{2,}", line.strip())[0]
        if command.startswith("kvmshell "):
            words = shlex.split(command)[1:]
            argvs.append(words[:next((i for i, w in enumerate(words) if w in (">", "|")), len(words))])
    return argvs


def test_every_subcommand_help_has_examples_that_parse() -> None:
    parser = build_parser()
    commands = subcommands(parser)
    assert {"guests", "run", "report", "config", "completion"} <= set(commands)
    for name, sub in [("kvmshell", parser), *commands.items()]:
        argvs = example_lines(sub.format_help())
        assert argvs, f"{name} --help: no `kvmshell ...` example"
        if name != "kvmshell":
            assert any(name in argv for argv in argvs), f"{name} --help: no example runs {name}"
        for argv in argvs:
            try:
                build_parser().parse_args(argv)
            except ConfigError as e:
                pytest.fail(f"{name} --help: the example `kvmshell {shlex.join(argv)}` does not parse: {e}")


def test_help_keeps_the_examples_lines_apart(tmp_path: Path) -> None:
    main_help = " ".join(kvmshell(tmp_path, "--help").stdout.split())
    for status in Exit:
        assert f" {status.value} " in main_help.partition("exit status:")[2], f"exit status {status} not in --help"
    done = kvmshell(tmp_path, "run", "--help")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert "examples:" in lines
    assert any(line.strip().startswith("kvmshell --keep-going run") for line in lines), done.stdout


def test_the_man_page_has_every_option_and_subcommand(tmp_path: Path) -> None:
    page = kvmshell(tmp_path, "man")
    assert page.returncode == 0 and page.stdout.startswith(".TH KVMSHELL 1"), page
    parser = build_parser()
    for name in subcommands(parser):
        assert f'.SS "{name.replace("-", chr(92) + "-")}"' in page.stdout, f"{name} is not in the man page"
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed: the page is not rendered")
    lint = subprocess.run(["groff", "-man", "-ww", "-z"], input=page.stdout, capture_output=True, text=True,
                          timeout=60, check=False)
    assert lint.returncode == 0 and lint.stderr == "", lint.stderr
    shown = subprocess.run(["groff", "-man", "-Tutf8", "-P-c", "-rLL=200n"], input=page.stdout,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    shown = re.sub(".\b", "", shown).replace("\u2010", "-")
    for action in parser._actions:
        for option in [] if isinstance(action, argparse._HelpAction) else action.option_strings:
            assert option in shown, f"{option} is not in the rendered man page"
    assert "EXIT STATUS" in shown and "kvmshell config init" in shown


# -- log -------------------------------------------------------------------------------------------

LOG_SCRIPT = """
import logging, sys
from kvmshell.logsetup import setup_logging
path = setup_logging(max_bytes=int(sys.argv[1]), backups=int(sys.argv[2])) if len(sys.argv) > 1 else setup_logging()
[handler] = logging.getLogger().handlers
print(path, handler.maxBytes, handler.backupCount)
for i in range(int(sys.argv[3]) if len(sys.argv) > 3 else 0):
    logging.getLogger("kvmshell.test").info("record %05d %s", i, "x" * 60)
"""


def test_the_log_file_rotates(tmp_path: Path) -> None:
    default = subprocess.run([sys.executable, "-c", LOG_SCRIPT], capture_output=True, text=True, timeout=60,
                             env=env_for(tmp_path), check=True).stdout.split()
    log = tmp_path / "state" / "kvmshell" / "kvmshell.log"
    assert default == [str(log), str(5 * 1024 * 1024), "3"]
    # 400 records of about 110 bytes through a 4 kB limit with 2 backups: two full old files
    subprocess.run([sys.executable, "-c", LOG_SCRIPT, "4000", "2", "400"], capture_output=True, timeout=60,
                   env=env_for(tmp_path), check=True)
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["kvmshell.log", "kvmshell.log.1", "kvmshell.log.2"]
    for p in log.parent.iterdir():
        assert 0 < p.stat().st_size <= 4000, (p, p.stat().st_size)
    assert "record 00399" in log.read_text()                # the newest in the current file
    assert "record 00398" in log.read_text() + (log.parent / "kvmshell.log.1").read_text()
    assert "record 00000" not in "".join(p.read_text() for p in log.parent.iterdir())   # the oldest dropped


# -- config init -----------------------------------------------------------------------------------

def accepted_keys(section: dict[str, object]) -> list[str]:
    """The keys kvmshell.config accepts in a section, as its error for an unknown key lists them."""
    with pytest.raises(ConfigError) as e:
        parse_config(section)
    match = re.search(r"expected one of: (.*)\)", str(e.value))
    assert match, e.value
    return match.group(1).split(", ")


def uncommented(text: str) -> str:
    """The template with every commented setting (`#key = ...`, `#[table]`) turned on."""
    return "\n".join(re.sub(r"^#(?=[\[a-z])", "", line) for line in text.splitlines())


def test_config_init_writes_a_commented_config_that_loads(tmp_path: Path) -> None:
    done = kvmshell(tmp_path, "config", "init")
    path = tmp_path / "config" / "kvmshell" / "config.toml"
    assert done.returncode == 0 and str(path) in done.stdout, done
    text = path.read_text()
    # as written: everything commented out, so it loads as an empty inventory
    assert all(not line or line.startswith("#") for line in text.splitlines())
    empty = load_config(path)
    assert (dict(empty.guests), dict(empty.hosts)) == ({}, {})
    # each section and every key the config accepts is shown, and turned on it loads
    for section, example in [("defaults", {"defaults": {"zz": 1}}),
                             ("hosts", {"hosts": {"h": {"zz": 1}}}),
                             ("guests", {"guests": {"g": {"zz": 1}}})]:
        assert re.search(rf"^#\[{section}\b", text, re.MULTILINE), f"no commented [{section}] table"
        for key in accepted_keys(example):
            assert re.search(rf"^#{key} = ", text, re.MULTILINE), f"[{section}] {key} is not in the template"
    assert accepted_keys({"zz": 1}) == ["defaults", "hosts", "guests"]
    on = tmp_path / "on.toml"
    on.write_text(uncommented(text))
    tomllib.loads(on.read_text())
    from kvmshell.core.migration.live.strategies import offered
    loaded = load_config(on, strategies=offered())
    assert loaded.guests and loaded.hosts and loaded.defaults.link is not None
    assert any(g.host for g in loaded.guests.values()) and any(g.unplug for g in loaded.guests.values())


def test_config_init_never_writes_over_a_config(tmp_path: Path) -> None:
    path = tmp_path / "config" / "kvmshell" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text(CONFIG)
    again = kvmshell(tmp_path, "config", "init")
    assert again.returncode == 2 and again.stdout == "", again
    assert len(again.stderr.splitlines()) == 1 and str(path) in again.stderr and "Traceback" not in again.stderr
    assert path.read_text() == CONFIG
    # not even over a config that does not load
    path.write_text("[defaults\n")
    assert kvmshell(tmp_path, "config", "init").returncode == 2
    assert path.read_text() == "[defaults\n"


def test_config_init_writes_where_kvmshell_reads(tmp_path: Path) -> None:
    env_path = tmp_path / "from-env" / "k.toml"
    done = kvmshell(tmp_path, "config", "init", KVMSHELL_CONFIG=str(env_path))
    assert done.returncode == 0 and env_path.exists(), done
    opt_path = tmp_path / "lab.toml"
    done = kvmshell(tmp_path, "--config", str(opt_path), "config", "init", KVMSHELL_CONFIG=str(env_path))
    assert done.returncode == 0 and opt_path.exists(), done
    assert not (tmp_path / "config").exists()
    assert load_config(env_path).guests == {} and load_config(opt_path).guests == {}
