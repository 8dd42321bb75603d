#!/usr/bin/env bash
# ASan+UBSan build of the data path and the guest driver, then the data-path tests on it.
#
# Builds into a scratch copy of the package so the optimised in-place modules of the
# work tree stay as they are; the sanitizer runtimes are preloaded into every process
# (pytest, the ring host, the guest driver), which also get xensim's sanitized build.
# Usage: blktap3/datapath/sanitize.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
work="$(mktemp -d /tmp/blktap3-sanitize.XXXXXX)"
case "$work" in /tmp/blktap3-sanitize.*) ;; *) echo "bad scratch dir" >&2; exit 1 ;; esac
trap 'rm -rf -- "$work"' EXIT

cp -r "$root/blktap3" "$root/tests" "$root/setup.py" "$root/pyproject.toml" "$work/"
find "$work" -name '*.so' -delete
(cd "$work" && BLKTAP3_SANITIZE=1 "$py" setup.py -q build_ext --inplace >/dev/null 2>&1)
for so in "$work"/blktap3/datapath/_datapath*.so "$work"/blktap3/sim/guestdrv/_guestdrv*.so; do
    # grep without -q: an early exit would SIGPIPE nm and fail the pipeline.
    nm -D "$so" | grep __asan_ >/dev/null || { echo "$so: not instrumented" >&2; exit 1; }
done

runtimes="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export BLKTAP3_SANITIZE=1
export PYTHONPATH="$work"
# CPython keeps memory until exit by design: leak checks off, every other report fatal.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
cd "$work"
LD_PRELOAD="$runtimes" "$py" -m pytest -q -p no:cacheprovider \
    tests/unit/datapath tests/integration/datapath "$@"
