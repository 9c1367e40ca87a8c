"""`python -m kvmshell`: the same as the `kvmshell` command."""

from kvmshell.cli import main

raise SystemExit(main())
