#!/usr/bin/env bash
# Grows the committed fuzz corpora by running every bolero fuzz target coverage-guided
# (libFuzzer, linked by the bolero crate) for SECONDS each (default 60). `cargo test`
# replays each corpus (`<source dir>/__fuzz__/<target>/corpus/`) before its random
# inputs, so what coverage found stays in the suite; crashes land in `crashes/` beside
# it, which `cargo test` replays too (commit them as regression inputs once fixed).
#
#   ops/scripts/fuzz-corpus.sh [SECONDS] [PACKAGE...]
#
# Only library tests are built (the integration tests do not link libFuzzer).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
shift || true
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=(ca-identity ca-raft ca-node ca-agent)

flags="--cfg fuzzing -Cpasses=sancov-module --cfg fuzzing_libfuzzer"
for f in inline-8bit-counters level=4 pc-table trace-compares stack-depth; do
  flags+=" -Cllvm-args=-sanitizer-coverage-$f"
done
target=$(rustc -vV | sed -n 's/^host: //p')
for pkg in "${packages[@]}"; do
  exe=$(RUSTFLAGS="$flags" RUSTDOCFLAGS="$flags" cargo test --locked --lib -p "$pkg" \
    --profile fuzz --target "$target" --target-dir target/fuzz --no-run \
    --message-format json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])' | tail -1)
  [ -n "$exe" ] || { echo "$pkg: no library test binary built" >&2; exit 1; }
  manifest=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json,sys; print([p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]==sys.argv[1]][0])' "$pkg")
  crate_dir=$(dirname "$manifest")
  for test in $("$exe" --list 2>/dev/null | sed -n 's/^\(.*fuzz_[a-z0-9_]*\): test$/\1/p'); do
    # Where bolero's test engine looks for the corpus: beside the source file of the
    # target, under __fuzz__/<module path>__<name without fuzz_>.
    module=${test%::*}
    name=${test##*::}
    name=${name#fuzz_}
    src=$(grep -rl "fn fuzz_${name}\b" "$crate_dir/src" | head -1)
    work="$(dirname "$src")/__fuzz__/${module//::/__}__${name}"
    mkdir -p "$work/corpus" "$work/crashes"
    echo "== $pkg $test ($secs s) -> ${work#"$PWD"/}"
    BOLERO_TEST_NAME="$test" BOLERO_LIBTEST_HARNESS=1 \
      BOLERO_LIBFUZZER_ARGS="$work/corpus $work/crashes -artifact_prefix=$work/crashes/ -timeout=10 -max_total_time=$secs -max_len=4096 -reduce_inputs=1" \
      "$exe" "$test" --exact --nocapture --quiet --test-threads 1
    # Keep the corpus small: merge it down to the inputs that add coverage.
    tmp=$(mktemp -d)
    BOLERO_TEST_NAME="$test" BOLERO_LIBTEST_HARNESS=1 \
      BOLERO_LIBFUZZER_ARGS="-merge=1 $tmp $work/corpus" \
      "$exe" "$test" --exact --nocapture --quiet --test-threads 1 >/dev/null 2>&1
    rm -rf "$work/corpus" && mv "$tmp" "$work/corpus"
    rmdir "$work/crashes" 2>/dev/null || true
    echo "   $(ls "$work/corpus" | wc -l) inputs, $(du -sh "$work/corpus" | cut -f1)"
  done
done
