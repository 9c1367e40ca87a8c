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


class ConfigError(KvmError):
    """A malformed address, config file or command-line option."""

    title = "bad configuration"


class ConnectFailed(KvmError):
    """A monitor could not be reached or did not speak the expected protocol."""

    title = "cannot connect"


class Disconnected(KvmError):
    """The monitor went away (QEMU exited, socket closed) while we used it."""

    title = "disconnected"


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
