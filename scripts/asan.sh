#!/usr/bin/env bash
# Builds the native addon with AddressSanitizer + LeakSanitizer into
# build-asan/ (the normal build/Release addon is left alone), runs the native
# tests (tests/native) against it, then the daemon with it over add/remove
# cycles (tests/leaks/cycles.test.ts, DMR_LEAK_ASAN=1). docs/RELIABILITY.md.
#
#   bash scripts/asan.sh            # build (incremental), tests/native, then the daemon
#                                   # under LSan over add/remove cycles (tests/leaks)
#   bash scripts/asan.sh --build    # build only
#   bash scripts/asan.sh --native   # tests/native only
#   bash scripts/asan.sh -- ARGS    # extra vitest arguments (e.g. a file)
#   DMR_ASAN_REV=HEAD bash scripts/asan.sh   # native code of a commit, not the work tree
#
# How it works:
#  - node-gyp always builds into <module dir>/build, so build-asan/ is a
#    staging module: a copy of binding.gyp and a symlink to native/; the
#    addon lands in build-asan/build/Release/dm_remapd.node.
#  - CFLAGS/CXXFLAGS/LDFLAGS are picked up by gyp's make generator.
#  - node itself is not instrumented, so the ASan runtime is preloaded
#    (LD_PRELOAD=$(gcc -print-file-name=libasan.so)); it intercepts every
#    malloc/free of the process, so LeakSanitizer checks the whole process
#    (node, V8, libuv and the addon) when it exits.
#  - src/native/binding.ts loads the addon named by DM_REMAPD_ADDON.
#  - Suppressions: tests/leaks/lsan.supp (never our addon's frames; each
#    entry is explained there). With print_suppressions=1 every matched
#    suppression is printed with its count, so they can be audited.
#  - vitest runs with --pool=threads --maxWorkers=1: every test file runs in a
#    worker_thread of the one vitest process, and LeakSanitizer runs when that
#    process exits, after vitest has terminated the workers (which tears their
#    environments down, finalizers included). With the default forks pool the
#    workers are ended by SIGTERM, so LSan never runs in them: a deliberate
#    leak went unnoticed that way. One file at a time, because the tests
#    count the fds and threads of the whole process.
#  - Any ASan error or leak makes the process exit with code 23, and this
#    script with it.
#  - Deselected: "an open device with nothing in flight does not keep the
#    process alive". Its child process exits with a device still open, and
#    the env cleanup hook deliberately leaves the device's two napi_refs and
#    its async context (144 bytes) undestroyed on a dying env
#    (native/backing.cc CloseNative(envTeardown)); LSan reports that, in our
#    frames, and we do not suppress our frames. It runs in the normal suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

build_only=0
native_only=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build_only=1; shift ;;
    --native) native_only=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done

NODE_GYP="$(dirname "$(readlink -f "$(command -v npm)")")/../node_modules/node-gyp/bin/node-gyp.js"
[ -f "$NODE_GYP" ] || { echo "asan: npm's bundled node-gyp not found at $NODE_GYP" >&2; exit 1; }
NODEDIR="$(node -p 'require("path").resolve(process.execPath, "../..")')"
LIBASAN="$(gcc -print-file-name=libasan.so)"
[ -e "$LIBASAN" ] || { echo "asan: gcc has no libasan.so (apt-get install libasan8 / gcc)" >&2; exit 1; }

STAGE="$ROOT/build-asan"
mkdir -p "$STAGE"
if [ -n "${DMR_ASAN_REV:-}" ]; then
  # Build a committed revision's native code instead of the work tree's
  # (e.g. DMR_ASAN_REV=HEAD while native/ has uncommitted work in progress).
  rm -rf "$STAGE/native"
  git archive "$DMR_ASAN_REV" binding.gyp native | tar -x -C "$STAGE"
  echo "asan: native code of $(git rev-parse --short "$DMR_ASAN_REV")"
else
  [ -L "$STAGE/native" ] || rm -rf "$STAGE/native"
  cp -p binding.gyp "$STAGE/binding.gyp"
  ln -sfn ../native "$STAGE/native"
fi

SAN_FLAGS="-fsanitize=address -fno-omit-frame-pointer -fno-common -g -O1"
t0=$(date +%s)
(
  cd "$STAGE"
  export CFLAGS="$SAN_FLAGS" CXXFLAGS="$SAN_FLAGS" LDFLAGS="-fsanitize=address"
  if [ ! -f build/Makefile ] || ! cmp -s binding.gyp build/binding.gyp.configured; then
    node "$NODE_GYP" configure --nodedir="$NODEDIR" >/dev/null 2>build.log || { cat build.log >&2; exit 1; }
    cp binding.gyp build/binding.gyp.configured
  fi
  node "$NODE_GYP" build --nodedir="$NODEDIR" -j 2 >/dev/null 2>build.log || { cat build.log >&2; exit 1; }
)
ADDON="$STAGE/build/Release/dm_remapd.node"
# Sanity: the addon really is instrumented.
if [ "$(nm -D --undefined-only "$ADDON" | grep -c '__asan_init')" = 0 ]; then
  echo "asan: $ADDON is not ASan-instrumented" >&2; exit 1
fi
echo "asan: built $ADDON in $(( $(date +%s) - t0 )) s"
[ "$build_only" = 1 ] && exit 0

# Only the vitest command gets the sanitizer environment (the shell tools this
# script runs would otherwise run under the preloaded runtime too).
# detect_leaks: LeakSanitizer at exit. exitcode=23: any ASan/LSan report makes
# the process exit 23. allocator_may_return_null: V8 probes large
# reservations; a failed one must be a null, not a report.
# detect_odr_violation=0: node's statically linked copies vs system libraries.
t1=$(date +%s)
set +e
env DM_REMAPD_ADDON="$ADDON" LD_PRELOAD="$LIBASAN" \
  ASAN_OPTIONS="detect_leaks=1:exitcode=23:abort_on_error=0:allocator_may_return_null=1:detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
  LSAN_OPTIONS="suppressions=$ROOT/tests/leaks/lsan.supp:print_suppressions=1${LSAN_OPTIONS:+:$LSAN_OPTIONS}" \
  node node_modules/vitest/vitest.mjs run tests/native --pool=threads --maxWorkers=1 \
    -t '^(?!.*does not keep the process alive)' "${extra[@]}"
rc=$?
set -e
echo "asan: tests/native under ASan/LSan: exit $rc in $(( $(date +%s) - t1 )) s"
[ "$rc" = 0 ] || exit $rc
[ "$native_only" = 1 ] && exit 0

# The daemon (dist/, built here) with this addon and libasan preloaded, over
# add/remove cycles with NBD I/O; its LSan report files must be absent and its
# exit code 0 (tests/leaks/cycles.test.ts, DMR_LEAK_ASAN=1; suppressions in
# tests/leaks/lsan-daemon.supp). Only the daemon runs under ASan here.
t2=$(date +%s)
npm run build --silent
set +e
DMR_LEAK_ASAN=1 node node_modules/vitest/vitest.mjs run tests/leaks/cycles.test.ts
rc=$?
set -e
echo "asan: daemon under ASan/LSan over add/remove cycles: exit $rc in $(( $(date +%s) - t2 )) s"
exit $rc
