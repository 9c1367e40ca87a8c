"""The prompt_toolkit face: `kvmshell shell`."""
