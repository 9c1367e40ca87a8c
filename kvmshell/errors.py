"""One error tree for kvmshell. Standard library only.

Every error a user can cause or meet carries a one-line message that says what happened, to which
guest, and what to do. Library exceptions are translated into these where the library is called;
the faces (CLI, shell, TUI) catch ``KvmError`` and nothing else.
"""

from __future__ import annotations


class KvmError(Exception):
    """Base of every error kvmshell reports to a user."""

    title = "error"

    def __init__(self, message: str, *, guest: str | None = None, title: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.guest = guest
        if title is not None:
            self.title = title

    def __str__(self) -> str:
        if self.guest:
            return f"{self.guest}: {self.message}"
        return self.message

    def for_guest(self, guest: str) -> KvmError:
        """The same error (same class, message and title) attributed to ``guest``."""
        err = type(self)(self.message, guest=guest)
        err.title = self.title
        return err


class ConfigError(KvmError):
    """A malformed address, config file or command-line option."""

    title = "bad configuration"


class ConnectFailed(KvmError):
    """A monitor could not be reached or did not speak the expected protocol."""

    title = "cannot connect"


class Disconnected(KvmError):
    """The monitor went away (QEMU exited, socket closed) while we used it."""

    title = "disconnected"


# -- SSH: each message is one line that names the host (user@host:port, and its [hosts.NAME]) ------

class HostUnreachable(ConnectFailed):
    """No SSH connection to a host: refused, no route, name unknown, timed out, not an SSH server."""

    title = "host unreachable"


class HostKeyUnknown(ConnectFailed):
    """The host's key is in no known_hosts file: refused; the message has its fingerprint and how to accept it."""

    title = "unknown host key"


class HostKeyChanged(ConnectFailed):
    """known_hosts has a different key for this host: refused (possibly an attack)."""

    title = "host key changed"


class AuthFailed(ConnectFailed):
    """The SSH server refused every key (or password) offered for the user."""

    title = "authentication failed"


class HostDisconnected(Disconnected):
    """An established SSH connection to a host dropped."""

    title = "connection lost"


class UsageError(KvmError):
    """The line does not fit the command's grammar, or its options do not go together (nothing was sent)."""

    title = "usage"


class CommandFailed(KvmError):
    """QEMU answered a command with an error."""

    title = "command failed"


class Unsupported(KvmError):
    """The guest's QEMU lacks a command or feature that the operation needs."""

    title = "not supported"


class MonitorTimeout(KvmError):
    """QEMU did not answer within the time allowed."""

    title = "timeout"


class Refused(KvmError):
    """kvmshell refused an operation that would put a guest at risk."""

    title = "refused"


class LabError(KvmError):
    """Starting a local test or demo guest failed."""

    title = "lab"
