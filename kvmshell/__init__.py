"""kvmshell: a shell and a dashboard over the monitors of many QEMU/KVM guests."""

__version__ = "0.1.0"
