#!/bin/bash
# hack/fuzz.sh [SECONDS] [TARGET...]: build the fuzz targets in fuzz/ (libFuzzer through
# libfuzzer-sys; nightly toolchain, SanitizerCoverage and AddressSanitizer, as cargo-fuzz builds
# them) and run each for SECONDS (default 60) from its checked-in corpus fuzz/corpus/<target>.
# New inputs go to a scratch corpus (target/fuzz-corpus/<target>), so the repository's stays
# small; a crash fails the script and its input is kept in fuzz/artifacts/<target>/ (check it
# in as a regression input under fuzz/corpus/<target>/ once fixed).
#
#   hack/fuzz.sh 10            # the CI smoke: every target, 10 s each
#   hack/fuzz.sh 600 oci_spec  # a longer run of one target
#
# Targets: config_parse (the Janus config), oci_spec (a bundle's spec through validation, the
# namespace plan, the cgroup path, mount options), virtio_mmio_blk (a guest driving virtio-blk
# through the virtio-mmio registers, with its own memory), stdio_header (the stdio channel's
# frame header), agent_request (a request to the in-guest agent: protobuf decode, then the
# agent's checks and plan for create, exec, signal, update, storages, network, port forward),
# virtio_console and virtio_net (a guest driving those devices as virtio_mmio_blk does, with
# host-side events: console peers and input, frames from the tap), vhost_user_frontend (the
# virtio-fs vhost-user frontend against a backend whose replies are the input), shim_options
# (the runtime options of a task's Create). fuzz/seeds.py writes the last five's seed corpora.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
cd "$REPO_ROOT"

SECONDS_EACH="${1:-60}"
shift || true
ALL=(config_parse oci_spec virtio_mmio_blk stdio_header agent_request virtio_console virtio_net
	vhost_user_frontend shim_options)
[ "$#" -gt 0 ] && TARGETS=("$@") || TARGETS=("${ALL[@]}")

cargo +nightly --version >/dev/null 2>&1 || die "the nightly toolchain is needed (cargo +nightly)"
ensure_apt libseccomp-dev

# What cargo-fuzz passes (SanitizerCoverage for libFuzzer's feedback, ASan for memory errors);
# an explicit --target keeps build scripts and proc macros uninstrumented.
TRIPLE=x86_64-unknown-linux-gnu
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions \
-Coverflow-checks -Zsanitizer=address -Cforce-frame-pointers"
export CARGO_TARGET_DIR="$REPO_ROOT/target/fuzz"
log "building fuzz targets: ${TARGETS[*]}"
(cd fuzz && cargo +nightly build --release --target "$TRIPLE" $(printf -- '--bin %s ' "${TARGETS[@]}"))

FAILED=()
for t in "${TARGETS[@]}"; do
	scratch="$REPO_ROOT/target/fuzz-corpus/$t"
	artifacts="$REPO_ROOT/fuzz/artifacts/$t"
	mkdir -p "$scratch" "$artifacts"
	log "fuzzing $t for ${SECONDS_EACH}s"
	if "$CARGO_TARGET_DIR/$TRIPLE/release/$t" -max_total_time="$SECONDS_EACH" -print_final_stats=1 \
		-artifact_prefix="$artifacts/" -rss_limit_mb=2048 "$scratch" "fuzz/corpus/$t" \
		2>"$REPO_ROOT/target/fuzz-$t.log"; then
		runs="$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$REPO_ROOT/target/fuzz-$t.log" | grep -o '[0-9]*$' || echo '?')"
		cov="$(grep -ao 'cov: [0-9]*' "$REPO_ROOT/target/fuzz-$t.log" | tail -1 || true)"
		echo "fuzz $t: ok, $runs executions, $cov, ${SECONDS_EACH}s"
	else
		echo "fuzz $t: FAILED (log: target/fuzz-$t.log; input in fuzz/artifacts/$t/)"
		tail -30 "$REPO_ROOT/target/fuzz-$t.log"
		FAILED+=("$t")
	fi
done
[ "${#FAILED[@]}" -eq 0 ] || die "fuzz targets failed: ${FAILED[*]}"
