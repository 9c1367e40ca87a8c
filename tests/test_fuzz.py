"""Hostile input (issue 16, point 4): the address and URI parsers, the command grammar and completion, the
HMP text parsers (on mutations of real QEMU 7.2 replies in tests/data/hmp/), the config loader and
`kvmshell run FILE` refuse what they cannot take with one line of their own error, never a traceback.

KVMSHELL_FUZZ_EXAMPLES sets the examples per property (200 by default; bench/fuzz.sh runs 10,000).
No QEMU: the guests of the command grammar are never connected, and `run FILE` runs with none.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from kvmshell.config import load_config
from kvmshell.core.commands.completion import CompletionEngine
from kvmshell.core.commands.migrate_request import MigrateRequest
from kvmshell.core.commands.registry import default_registry
from kvmshell.core.commands.session import Session
from kvmshell.core.commands.spec import split_words
from kvmshell.core.monitor.fleet import Fleet
from kvmshell.core.values import hmptext
from kvmshell.core.values.address import Address, Kind, Protocol, SshTarget, parse_address, parse_guest_option
from kvmshell.core.values.uri import MigrationUri
from kvmshell.errors import ConfigError, KvmError

EXAMPLES = int(os.environ.get("KVMSHELL_FUZZ_EXAMPLES", "200"))
CLI_EXAMPLES = int(os.environ.get("KVMSHELL_FUZZ_CLI_EXAMPLES", "5"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REGISTRY = default_registry()
HMP_DIR = Path(__file__).parent / "data" / "hmp"
REPLIES = {p.name: p.read_text() for p in sorted(HMP_DIR.glob("*.txt"))}


def one_line(e: BaseException) -> None:
    assert "\n" not in str(e), repr(str(e))


# ---- addresses and migration URIs -----------------------------------------------------------------------

# text near the grammar: pieces of real addresses glued together, with junk
PIECES = st.sampled_from(["qmp", "hmp", "libvirt", "ssh://", "unix", "tcp", "pty", ":", "/", "@", "#", "[", "]",
                          "::1", "127.0.0.1", "4444", "0", "65536", "²", "٣", "/run/vm1.qmp", "/dev/pts/3",
                          "root", "host2", "qemu+ssh://", "system", "\0", "\n", " ", "exec", "fd", "rdma", "file"])
NEAR = st.lists(st.one_of(PIECES, st.text(max_size=4)), max_size=10).map("".join)
ANY_TEXT = st.one_of(st.text(max_size=120), NEAR)


@fuzz
@given(ANY_TEXT)
@example("qmp:tcp:host:\u00b2")                       # a digit to str.isdigit(), not to int()
@example("ssh://h:\u00b2/qmp:unix:/x")
def test_address_parser_gives_one_config_error_line(text: str) -> None:
    try:
        parse_address(text)
    except ConfigError as e:
        one_line(e)
    try:
        parse_guest_option(text)
    except ConfigError as e:
        one_line(e)


HOSTS = st.one_of(st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,4})?", fullmatch=True), st.ip_addresses().map(str))
PATHS = st.from_regex(r"/[A-Za-z0-9_./ -]{0,30}[A-Za-z0-9_.-]", fullmatch=True)
PORTS = st.integers(1, 65535)
SSH = st.one_of(st.none(), st.builds(SshTarget, host=HOSTS, user=st.one_of(st.none(), st.from_regex(
    r"[a-z][a-z0-9]{0,7}", fullmatch=True)), port=st.one_of(st.none(), PORTS)))
ADDRESSES = st.one_of(
    st.builds(lambda p, path, ssh: Address(Protocol(p), Kind.UNIX, path=path, ssh=ssh),
              st.sampled_from(["qmp", "hmp"]), PATHS, SSH),
    st.builds(lambda p, h, port, ssh: Address(Protocol(p), Kind.TCP, host=h, port=port, ssh=ssh),
              st.sampled_from(["qmp", "hmp"]), HOSTS, PORTS, SSH),
    st.builds(Address.pty, st.from_regex(r"/dev/pts/[0-9]{1,3}", fullmatch=True)),
    st.builds(Address.libvirt, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
              st.one_of(st.none(), st.sampled_from(["qemu:///system", "qemu+ssh://root@host2/system"]))),
)


@fuzz
@given(ADDRESSES)
def test_valid_addresses_round_trip(addr: Address) -> None:
    assert parse_address(str(addr)) == addr


@fuzz
@given(st.one_of(ANY_TEXT, st.sampled_from(["tcp:", "unix:", "exec:", "rdma:", "fd:", "file:"]).flatmap(
    lambda s: ANY_TEXT.map(lambda t: s + t))))
def test_migration_uri_parser_gives_one_value_error_line(text: str) -> None:
    try:
        uri = MigrationUri.parse(text)
    except ValueError as e:
        one_line(e)
    else:
        assert str(uri) == text and uri.scheme == text.partition(":")[0]


@fuzz
@given(st.sampled_from(["tcp", "rdma"]), HOSTS, PORTS)
def test_network_uris_round_trip(scheme: str, host: str, port: int) -> None:
    text = f"{scheme}:{f'[{host}]' if ':' in host else host}:{port}"
    uri = MigrationUri.parse(text)
    assert (uri.scheme, uri.host, uri.port, str(uri)) == (scheme, host, port, text)


# ---- the command grammar and completion ---------------------------------------------------------------

@pytest.fixture(scope="module")
def offline_session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    """Guests that are never connected: a line that got as far as sending would fail with their name."""
    d: Path = tmp_path_factory.mktemp("fuzz")
    fleet = Fleet()
    fleet.add("vm1", parse_address(f"qmp:unix:{d}/vm1.qmp"))
    fleet.add("vm2", parse_address(f"hmp:unix:{d}/vm2.hmp"))
    return Session(fleet, default_registry(), current="vm1")


WORDS = st.sampled_from([
    "migrate", "--to", "vm2", "--to-host", "b", "--strategy", "auto", "postcopy", "none", "--bandwidth", "4M",
    "--link", "1gbit", "--downtime", "300", "--tls", "/tmp/x", "--tls-authz", "--tunnel", "--copy-storage",
    "all", "inc", "--insecure-storage", "--detach", "--follow", "--watch", "--estimate", "--probe", "--no-probe",
    "--unplug", "--replug", "-d", "-b", "-i", "-r", "tcp:127.0.0.1:4444", "unix:/x", "exec:cat", "@vm1", "@all",
    "@", "@nope", "info", "status", "migrate_parameters", "savevm", "loadvm", "delvm", "use", "watch", "help",
    "qmp", "hmp", "{", "}", '{"execute": "query-status"}', "'", '"', "\\", "migrate_set_parameter",
    "max-bandwidth", "migrate_set_capability", "postcopy-ram", "on", "off", "migrate_set_speed", "1G", "-1",
    "exit", "#", "--edit", "-y", "=", "--", "\t", "\x1b[A"])
LINES = st.one_of(st.text(max_size=80), st.lists(st.one_of(WORDS, st.text(max_size=6)), max_size=8).map(" ".join))


@fuzz
@given(line=LINES)
def test_grammar_and_completion_never_raise_past_kvm_errors(offline_session: Session, line: str) -> None:
    engine = CompletionEngine(offline_session)
    for cut in {0, len(line) // 3, len(line) // 2, len(line)}:
        for c in engine.complete(line[:cut]):
            assert isinstance(c.text, str)
    try:
        offline_session.plan(line)
    except KvmError as e:
        one_line(e)


MIGRATE_ARGS = st.lists(st.one_of(WORDS, st.text(max_size=6)), max_size=8).map(" ".join)
MIGRATE_ARGS = st.one_of(MIGRATE_ARGS, MIGRATE_ARGS.map("--to vm2 {}".format))


@fuzz
@given(rest=MIGRATE_ARGS)
def test_migrate_lines_become_checked_requests_or_one_usage_line(rest: str) -> None:
    """`migrate ARGS` -> the typed request and its checks; a request that passes prints a line that
    parses back into the same request."""
    try:
        words = split_words(f"migrate {rest}")
    except KvmError as e:                # an unbalanced quote
        one_line(e)
        return
    spec, used = REGISTRY.lookup(words)
    assert spec is not None and spec.name == "migrate"
    try:
        parsed = REGISTRY.parse(spec, words[used:], rest)
        req = MigrateRequest.from_parsed("vm1", parsed.values, parsed.flags)
        req.check()
    except KvmError as e:
        one_line(e)
        return
    event("a request that passes its checks")
    again = split_words(req.line())
    spec2, used2 = REGISTRY.lookup(again[1:])
    assert spec2 is spec
    parsed2 = REGISTRY.parse(spec, again[1 + used2:], req.line().split(None, 2)[2] if len(again) > 2 else "")
    assert MigrateRequest.from_parsed("vm1", parsed2.values, parsed2.flags) == req, req.line()


# ---- HMP text parsers on mutated real replies --------------------------------------------------------

def mutate(text: str, data: st.DataObject) -> str:
    lines = text.splitlines(keepends=True)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        op = data.draw(st.sampled_from(["drop", "dup", "cut", "insert", "swap", "replace"]), label="op")
        if not lines:
            lines = [""]
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "cut":
            lines[i] = lines[i][:data.draw(st.integers(0, len(lines[i])), label="at")]
        elif op == "insert":
            at = data.draw(st.integers(0, len(lines[i])), label="at")
            junk = data.draw(st.one_of(st.text(max_size=12), st.sampled_from(
                [":", " kbytes", " ms", "(", ")", "\n", "\r", "\x1b[D", "-1", "99999999999999999999", "nan",
                 "1e308", "inf", "²", "''", "Migration status: "])), label="junk")
            lines[i] = lines[i][:at] + junk + lines[i][at:]
        elif op == "swap":
            j = data.draw(st.integers(0, len(lines) - 1), label="other")
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = data.draw(st.text(max_size=40), label="new line") + "\n"
    return "".join(lines)


PARSERS = [hmptext.parse_status, hmptext.parse_migrate, hmptext.parse_migrate_parameters,
           hmptext.parse_migrate_capabilities, hmptext.parse_snapshots, hmptext.parse_version,
           hmptext.parse_dirty_rate, hmptext.parse_cpu_count, hmptext.parse_memory_size, hmptext.parse_qom_list,
           hmptext.parse_help, hmptext.error_in]


def test_recorded_replies_parse() -> None:
    """The recordings are what the parsers expect (a mutation of junk would prove nothing)."""
    assert len(REPLIES) >= 6, sorted(REPLIES)
    assert hmptext.parse_status(REPLIES["info-status-running.txt"]).running
    assert hmptext.parse_status(REPLIES["info-status-postmigrate.txt"]).state.value == "postmigrate"
    done = hmptext.parse_migrate(REPLIES["info-migrate-completed.txt"])
    assert done.status.value == "completed" and done.ram is not None and done.ram.total > 0
    assert hmptext.parse_migrate(REPLIES["info-migrate-idle.txt"]).status.value == "none"
    assert hmptext.parse_migrate(REPLIES["info-migrate-failed.txt"]).error
    assert hmptext.parse_migrate_parameters(REPLIES["info-migrate-parameters.txt"]).values["max-bandwidth"] == 134217728
    assert [s.tag for s in hmptext.parse_snapshots(REPLIES["info-snapshots.txt"])] == ["fuzz-one"]


@fuzz
@given(name=st.sampled_from(sorted(REPLIES)), data=st.data())
def test_hmp_parsers_take_mutated_replies(name: str, data: st.DataObject) -> None:
    text = mutate(REPLIES[name], data)
    for parse in PARSERS:
        try:
            parse(text)
        except ValueError as e:          # the parsers' declared error, one line
            one_line(e)


# ---- the config loader ----------------------------------------------------------------------------------

TOML_PIECES = st.sampled_from([
    "[defaults]\n", "[hosts.b]\n", "[guests.vm1]\n", "[guests.all]\n", "[guests]\n", "address = ", "host = ",
    "ssh = ", "jump = ", "link = ", "strategy = ", "downtime_ms = ", "timeout = ", "allow_postcopy = ",
    "copy_storage = ", "unplug = ", "libvirt = ", '"qmp:unix:/run/vm1.qmp"', '"hmp:tcp:127.0.0.1:²"', '"b"',
    '"root@h:22"', '"1gbit"', '"fast"', "300", "-1", "1e400", "nan", "true", "[]", '["net0"]', "{}",
    '{a = 1}', "\n", "=", "[", "]", '"', "'", "#", "\\u0000", "[[guests]]\n", "x = 1\n"])
TOML = st.one_of(st.text(max_size=200), st.lists(TOML_PIECES, max_size=20).map("".join))


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config") / "config.toml"


@fuzz
@given(TOML)
@example('[hosts.b]\nssh = "root@h:\u00b2"\n')                # a digit to str.isdigit(), not to int()
@example('[guests.vm1]\naddress = "hmp:tcp:127.0.0.1:\u00b2"\n')
def test_config_loader_gives_a_config_or_one_error_line(config_path: Path, text: str) -> None:
    path = config_path
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path)
    except ConfigError as e:
        one_line(e)


# ---- `kvmshell run FILE` with arbitrary bytes -----------------------------------------------------------

SCRIPT_LINES = st.lists(st.one_of(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b" ")),
                                  LINES.map(lambda s: s.replace("\n", " ").encode("utf-8", "surrogatepass"))),
                        min_size=1, max_size=4)


@settings(max_examples=CLI_EXAMPLES, deadline=None)
@given(SCRIPT_LINES)
@example([b"info status", b"\xff\xfe junk", b"# comment"])        # not UTF-8: refused whole, nothing run
def test_run_file_with_arbitrary_bytes(lines: list[bytes]) -> None:
    """No guest attached: every line that is not blank or a comment fails, with one line each; none runs.
    A file that is not UTF-8 is refused whole, in one line naming the line, from a file or from stdin."""
    data = b"\n".join(lines) + b"\n"
    try:
        text: list[str] | None = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        text = None
    with tempfile.TemporaryDirectory(prefix="kvmshell-fuzz-") as d:
        script = Path(d) / "script"
        script.write_bytes(data)
        (Path(d) / "empty.toml").write_text("")                # no guests (an explicit config: not the user's)
        env = {**os.environ, "KVMSHELL_CONFIG": str(Path(d) / "empty.toml"), "XDG_STATE_HOME": d}
        runs = [subprocess.run([sys.executable, "-m", "kvmshell", "run", arg], capture_output=True, timeout=60,
                               env=env, input=data if arg == "-" else b"") for arg in (str(script), "-")]
    for proc in runs:
        err = proc.stderr.decode("utf-8", "replace")
        assert "Traceback" not in err and "config file" not in err, err
        if text is None:
            assert proc.returncode != 0 and len(err.splitlines()) == 1 and "not UTF-8" in err, err
            continue
        commands = [ln for ln in text if ln.strip() and not ln.strip().startswith("#")]
        if commands:
            assert proc.returncode != 0, (lines, err)
            assert 1 <= len(err.splitlines()) <= len(commands), (lines, err)
        else:
            assert proc.returncode == 0, (lines, err)
