#!/bin/sh
# The fuzzing properties of tests/test_fuzz.py at bench strength: 10,000 examples each (make test runs
# 200), `run FILE` with 20 generated scripts (5 in make test); prints each property's example counts.
#   bench/fuzz.sh [EXAMPLES [CLI_EXAMPLES]]
set -eu
cd "$(dirname "$0")/.."
export KVMSHELL_FUZZ_EXAMPLES="${1:-10000}" KVMSHELL_FUZZ_CLI_EXAMPLES="${2:-20}"
echo "fuzz: $KVMSHELL_FUZZ_EXAMPLES examples per property, $KVMSHELL_FUZZ_CLI_EXAMPLES for run FILE"
nice -n 10 .venv/bin/python -m pytest -q -p no:cacheprovider -p no:xdist --hypothesis-show-statistics \
    tests/test_fuzz.py 2>&1 | grep -E "^tests/test_fuzz.py::|phase|passing,|Stopped because|passed|failed|Error|Falsifying" \
    | sed -e 's/^  *- /    /'
