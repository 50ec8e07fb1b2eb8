#!/usr/bin/env bash
# The one command that runs every test: installs what is needed, builds, and
# runs the whole suite (unit, property, fault-injection, native).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
npx vitest run --exclude 'tests/vm/**' "$@"

# The native addon under AddressSanitizer/LeakSanitizer: tests/native, then the
# daemon over add/remove cycles (~16 s warm, ~25 s cold; docs/RELIABILITY.md).
bash scripts/asan.sh

# The real-kernel guest tests (tests/vm, docs/VM.md): QEMU TCG guests with
# /dev/ublkbN and /dev/nbdN, run last and alone (each guest takes both cores).
# They skip loudly only where QEMU cannot run at all; DMR_VM=0 skips them.
# Not run when the command was given test filters.
if [ $# -eq 0 ]; then
  npx vitest run tests/vm
fi
