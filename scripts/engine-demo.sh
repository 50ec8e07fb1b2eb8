#!/usr/bin/env bash
# The main job on an embedded default: installs what is needed, builds, and
# runs the engine demo on file-backed main and spare images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec node dist/demo/engine-demo.js "$@"
