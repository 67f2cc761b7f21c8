#!/usr/bin/env bash
# Native memory safety: build the C++ CPU kernels (csrc/cpu) with AddressSanitizer and
# UndefinedBehaviorSanitizer into a temporary directory and run the backend tests against that
# build. Never touches the repository's own fair_pruner/_C*.so: the package and tests are copied
# into the temporary directory, which comes first on sys.path there.
#
#   benchmarks/asan_check.sh                      # the kernels in csrc/cpu
#   SRC=/path/to/old/csrc/cpu benchmarks/asan_check.sh   # another copy of the kernels
#   KEEP=1 benchmarks/asan_check.sh               # keep the temporary directory
#   ASAN_TESTS="tests/test_ops_backends.py" benchmarks/asan_check.sh   # other tests
#
# Needs g++ (gcc's libasan / libubsan) and the installed torch's headers. Exit status: 0 when
# the build loads and the tests pass with no sanitizer report; non-zero otherwise (a sanitizer
# report aborts the test process).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
SRC=${SRC:-$ROOT/csrc/cpu}
TESTS=${ASAN_TESTS:-"tests/test_ops_backends.py tests/test_reliability.py::test_cpp_tod_select_clamps_cap_to_the_curve tests/test_reliability.py::test_native_op_arguments_are_checked_in_python"}
CXX=${CXX:-g++}
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fair_pruner_asan.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
echo "asan_check: building $SRC with -fsanitize=address,undefined in $WORK"

# A copy of the package and tests; the sanitized extension replaces the copy's _C.
cp -r "$ROOT/fair_pruner" "$ROOT/tests" "$WORK/"
[ -d "$ROOT/kernels" ] && cp -r "$ROOT/kernels" "$WORK/kernels"
rm -f "$WORK"/fair_pruner/_C*.so "$WORK"/fair_pruner/_cuda*.so
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +

# Compile flags from torch's own extension helpers (include dirs, ABI, library dirs).
FLAGS="$("$PY" - <<'EOF'
import sysconfig, torch
from torch.utils import cpp_extension as ce
inc = ce.include_paths() + [sysconfig.get_paths()["include"]]
lib = ce.library_paths()
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
print(" ".join([f"-I{p}" for p in inc] + [f"-L{p}" for p in lib] + [f"-Wl,-rpath,{p}" for p in lib]
               + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C",
                  "-DTORCH_API_INCLUDE_EXTENSION_H"]))
EOF
)"
SUFFIX="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
OUT="$WORK/fair_pruner/_C$SUFFIX"
t0=$(date +%s)
# shellcheck disable=SC2086
"$CXX" -std=c++20 -shared -fPIC -O1 -g -fno-omit-frame-pointer -fopenmp \
    -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    "$SRC"/*.cpp -o "$OUT" $FLAGS -lc10 -ltorch -ltorch_cpu -ltorch_python
echo "asan_check: built $(basename "$OUT") in $(( $(date +%s) - t0 )) s"

LIBASAN="$("$CXX" -print-file-name=libasan.so)"
LIBUBSAN="$("$CXX" -print-file-name=libubsan.so)"
for l in "$LIBASAN" "$LIBUBSAN"; do
    [ -e "$l" ] || { echo "asan_check: $l not found (install gcc's sanitizer runtimes)" >&2; exit 2; }
done

cd "$WORK"
export LD_PRELOAD="$LIBASAN:$LIBUBSAN"
# Python and torch are not instrumented: leak checking would report their allocations.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
export FAIR_PRUNER_REQUIRE_CPP=1 FAIR_PRUNER_BACKEND=
# The sanitized build must be the one that loads (not the repository's).
"$PY" -c "
import torch, fair_pruner._C as c, sys
assert c.__file__.startswith('$WORK'), c.__file__
print('asan_check: loaded', c.__file__)
"
t0=$(date +%s)
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider --capture=sys $TESTS   # fd 2 uncaptured: reports show
echo "asan_check: tests passed under ASan/UBSan in $(( $(date +%s) - t0 )) s"
