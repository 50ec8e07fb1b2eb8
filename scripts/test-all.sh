#!/usr/bin/env bash
# The one command that runs every test: installs what is needed, builds, and
# runs the whole suite (unit, property, fault-injection, native).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
npx vitest run "$@"

# The native addon under AddressSanitizer/LeakSanitizer: tests/native, then the
# daemon over add/remove cycles (~16 s warm, ~25 s cold; docs/RELIABILITY.md).
bash scripts/asan.sh
