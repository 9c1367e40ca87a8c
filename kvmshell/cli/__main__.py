"""`python -m kvmshell.cli`, as the tests and older scripts run it."""

import sys

from kvmshell.cli import main

sys.exit(main())
