"""Open a text in the user's editor ($VISUAL, $EDITOR, Debian's `editor`, vi) and read it back.
The shell and the TUI use it for `--edit` (a derived QEMU command line before it runs)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile

from kvmshell.errors import KvmError


class EditorFailed(KvmError):
    title = "editor"


def editor_command() -> list[str]:
    for var in ("VISUAL", "EDITOR"):
        if os.environ.get(var, "").strip():
            return shlex.split(os.environ[var])
    for name in ("editor", "vi", "nano"):
        if shutil.which(name):
            return [name]
    raise EditorFailed("no editor found: set $EDITOR (e.g. export EDITOR=nano)")


def edit_text(text: str, suffix: str = ".sh") -> str:
    """Blocking: the terminal belongs to the editor until it exits. The file is private (0600) and
    removed afterwards; a non-zero exit of the editor cancels (the text comes back empty)."""
    command = editor_command()
    with tempfile.TemporaryDirectory(prefix="kvmshell-edit-") as tmp:
        path = os.path.join(tmp, f"command{suffix}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            code = subprocess.call([*command, path])
        except OSError as e:
            raise EditorFailed(f"cannot run the editor {command[0]!r}: {e.strerror}; set $EDITOR") from None
        if code != 0:
            return ""
        with open(path) as f:
            return f.read()
