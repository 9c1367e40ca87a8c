"""The textual face: `kvmshell tui`."""
