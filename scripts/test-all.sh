#!/usr/bin/env bash
# The one command that runs every test: installs what is needed, builds, and
# runs the whole suite (unit, property, fault-injection, native).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
npx vitest run "$@"
