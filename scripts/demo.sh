#!/usr/bin/env bash
# The demo command: set up (apt + pip + build), then show dvs on real containers and VMs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${PYTHON:-python3}" examples/demo.py "$@"
