#!/bin/bash
# Full check of the workspace, as CI runs it (root, Debian 12):
#   deps -> release build -> fmt -> clippy -> unit tests -> images -> integration tests
#   (ctr suite, CRI suite, deploy/ checks: all of `cargo test -p janus-tests`), against the
#   system's containerd 1.6, then Debian sid's 2.1 (all suites) and trixie's 1.7 (a set)
#   -> soak (short: hack/soak.sh --short).
# Every step runs (unless what it needs failed); the script ends with a summary and exits
# non-zero if any step failed.
#
# Knobs: JANUS_TEST_THREADS (integration test threads, default 2), JANUS_TEST_FILTER (a cargo
# test filter for the integration tests, e.g. "runc"), JANUS_IT_TIMEOUT (seconds, default 2400).
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
cd "$REPO_ROOT" || exit 1

need_root
set -e
ensure_base_deps
ensure_build_deps
ensure_rust
set +e

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
THREADS="${JANUS_TEST_THREADS:-2}"
IT_TIMEOUT="${JANUS_IT_TIMEOUT:-2400}"

declare -a NAMES=() RESULTS=() TIMES=()
# Everything the steps print also goes here, to count the tests at the end.
TEST_LOG="$(mktemp /tmp/janus-test-log.XXXXXX)"
# Tests that cannot run here write one line each ("NOT RUN: test: reason (needs X)", or
# "PART NOT RUN: ..." for a part of a test that ran): counted apart in the summary.
# JANUS_REQUIRE=vmx,systemd,... (or all) makes those prerequisites failures instead.
export JANUS_NOT_RUN_LOG="$(mktemp /tmp/janus-not-run.XXXXXX)"
trap 'rm -f "$TEST_LOG" "$JANUS_NOT_RUN_LOG"' EXIT
FAILED=0

# step NAME CMD...: run, record PASS/FAIL and duration.
step() {
	local name="$1" start rc
	shift
	echo
	echo "=== $name: $*"
	start=$(date +%s)
	"$@" 2>&1 | tee -a "$TEST_LOG"
	rc=${PIPESTATUS[0]}
	NAMES+=("$name")
	TIMES+=("$(($(date +%s) - start))s")
	if [ "$rc" -eq 0 ]; then
		RESULTS+=("PASS")
	else
		RESULTS+=("FAIL (exit $rc)")
		FAILED=1
	fi
	return "$rc"
}

skip() {
	NAMES+=("$1")
	RESULTS+=("SKIPPED: $2")
	TIMES+=("-")
	FAILED=1
}

BUILD_OK=0
step "release build" release_build && BUILD_OK=1
step "rustfmt" cargo fmt --all -- --check
step "clippy" cargo clippy --workspace --all-targets -- -D warnings
# runtime::vm sits behind a feature (the in-guest agent must not link it): lint it too.
step "clippy (vm)" cargo clippy -p runtime --features vm --all-targets -- -D warnings
# --lib --bins: the VM integration tests need the guest image (run below); the cli crate turns
# runtime's vm feature on for the whole workspace build.
step "unit tests" cargo test --workspace --exclude janus-tests --lib --bins
# Our KVM microVM monitor: hand-written test guests (assembled here with gcc) booted on this
# machine's /dev/kvm, and the ACPI tables through ACPICA's disassembler.
# --nocapture: a test that cannot run here says so by name (e.g. the full Linux boot, which
# needs vmx/svm).
step "vmm tests" cargo test -p vmm --tests -- --nocapture

IMAGE_OK=0
build_test_images() {
	"$HERE/build-image.sh" "$(janus_image_tar)" busybox &&
		"$HERE/build-image.sh" "$(janus_pause_tar)" pause
}
step "test images" build_test_images && IMAGE_OK=1

# The VM guest (our own kernel, everything built in, and an initramfs with the static
# vm-agent): the VM tests and `janus check`'s test boot (in the integration tests) use it.
# The kernel comes from /var/cache/janus/guest-kernel (built there on the first run: minutes).
GUEST_OK=0
step "guest image" "$HERE/build-guest.sh" && GUEST_OK=1
# Debian's cloud kernel with its modules stays supported (vm.kernel/vm.initrd): built beside it,
# and run by a smaller set of VM tests below.
GUEST_DEBIAN_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/guest-debian"
GUEST_DEBIAN_OK=0
step "guest image (debian)" env JANUS_GUEST_KERNEL=debian "$HERE/build-guest.sh" "$GUEST_DEBIAN_DIR" &&
	GUEST_DEBIAN_OK=1

# The containerd versions nodes run today, from Debian's later suites (downloaded with apt and
# a sources list of our own, extracted under /var/cache/janus, never installed): 2.1 (sid) and
# 1.7 (trixie). The system's 1.6 (Debian 12) runs the main integration step.
CTD21="" CTD17=""
CTD21="$(ensure_containerd sid)" || CTD21=""
CTD17="$(ensure_containerd trixie)" || CTD17=""
[ -n "$CTD21" ] && export JANUS_CONTAINERD2_ROOT="$CTD21"

if [ "$BUILD_OK" = 1 ] && [ "$IMAGE_OK" = 1 ]; then
	export JANUS_SHIM="${JANUS_SHIM:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/containerd-shim-janus-v2}"
	export JANUS_TEST_IMAGE_TAR="$(janus_image_tar)"
	export JANUS_TEST_PAUSE_TAR="$(janus_pause_tar)"
	# shellcheck disable=SC2086
	step "integration tests" timeout --kill-after=30 "$IT_TIMEOUT" \
		cargo test -p janus-tests --no-fail-fast -- --test-threads="$THREADS" --skip janus_vm_builtin ${JANUS_TEST_FILTER:-}
	# The builtin driver through containerd, with its output shown: its full run needs vmx/svm
	# and says NOT RUN (and why) where the CPU has neither.
	step "builtin driver (ctr)" timeout --kill-after=30 "$IT_TIMEOUT" \
		cargo test -p janus-tests --test ctr janus_vm_builtin -- --nocapture --test-threads=1
	# Debian's kernel through containerd: the VM-mode ctr basics, the guest's kernel release,
	# and the modules NET_ADMIN containers load on demand (its module helper is the agent).
	if [ "$GUEST_DEBIAN_OK" = 1 ]; then
		step "vm ctr+cri (debian)" env JANUS_GUEST_DIR="$GUEST_DEBIAN_DIR" \
			timeout --kill-after=30 "$IT_TIMEOUT" \
			cargo test -p janus-tests --test ctr --test cri -- --test-threads="$THREADS" \
			janus_vm::run_ janus_vm::exec uname_is_the_guest_kernel vm_net_modules_on_demand
	else
		skip "vm ctr+cri (debian)" "guest image (debian) failed"
	fi
	# containerd 2.1: every suite (ctr, CRI, OCI, deploy, cli), both modes, runc beside. The
	# fault matrix (tests/tests/faults.rs, `fault_matrix::*`: containerd restarts, killed
	# virtiofsd, guest panics...) runs once, in "integration tests", against the system's 1.6.
	if [ -n "$CTD21" ]; then
		# shellcheck disable=SC2086
		step "containerd 2.1" env JANUS_CONTAINERD_ROOT="$CTD21" timeout --kill-after=30 "$IT_TIMEOUT" \
			cargo test -p janus-tests --no-fail-fast -- --test-threads="$THREADS" --skip janus_vm_builtin \
			--skip fault_matrix:: ${JANUS_TEST_FILTER:-}
	else
		skip "containerd 2.1" "could not fetch Debian sid's containerd (see the log above)"
	fi
	# containerd 1.7: a smaller set (each mode's ctr basics, CRI pod lifecycle, exec, logs, the
	# version 2 drop-in of deploy/ driving both handlers).
	if [ -n "$CTD17" ]; then
		step "containerd 1.7" env JANUS_CONTAINERD_ROOT="$CTD17" timeout --kill-after=30 "$IT_TIMEOUT" \
			cargo test -p janus-tests --test ctr --test cri -- --test-threads="$THREADS" \
			--skip janus_vm_builtin janus::run_ janus_vm::run_ pod_lifecycle exec_sync container_logs \
			deploy_dropin_runs_both_handlers installer_round_trip
	else
		skip "containerd 1.7" "could not fetch Debian trixie's containerd (see the log above)"
	fi
else
	skip "integration tests" "release build or test images failed"
	skip "builtin driver (ctr)" "release build or test images failed"
	skip "vm ctr+cri (debian)" "release build or test images failed"
	skip "containerd 2.1" "release build or test images failed"
	skip "containerd 1.7" "release build or test images failed"
fi

# Soak (short): 50 namespace-mode and 3 VM-mode create/run/delete cycles through a private
# containerd, 4 at once, then an inventory (processes, mounts, cgroups, netns, taps, /run/janus,
# containerd's fds) that must not have changed, and a long-lived shim's PSS (hack/soak.sh; the
# full run is `hack/soak.sh` without --short).
if [ "$BUILD_OK" = 1 ] && [ "$IMAGE_OK" = 1 ] && [ "$GUEST_OK" = 1 ]; then
	step "soak (short)" timeout --kill-after=30 900 "$HERE/soak.sh" --short
else
	skip "soak (short)" "release build, test images or guest image failed"
fi

# Our VMM against QEMU on our guest kernel (slow: two boots of a few minutes each under this
# machine's software KVM; see vmm/tests/linux_parity.rs).
if [ "$GUEST_OK" = 1 ]; then
	step "vmm linux parity" cargo test -p vmm --test linux_parity -- --ignored --nocapture
else
	skip "vmm linux parity" "guest image build failed"
fi

# Fuzzing smoke: every target in fuzz/ for a few seconds from its checked-in corpus (a crash
# fails the step; hack/fuzz.sh SECONDS runs them longer).
# Without a nightly toolchain it does not run: said by name and counted as not run (a failure
# with JANUS_REQUIRE=nightly or all).
if cargo +nightly --version >/dev/null 2>&1; then
	step "fuzz (smoke)" bash hack/fuzz.sh "${JANUS_FUZZ_SECONDS:-10}"
elif [[ ",${JANUS_REQUIRE:-}," == *,nightly,* || ",${JANUS_REQUIRE:-}," == *,all,* ]]; then
	skip "fuzz (smoke)" "JANUS_REQUIRE: no nightly toolchain (cargo +nightly)"
else
	# "step": not a cargo test, so not among cargo's passes (see the summary).
	echo "NOT RUN: step fuzz (smoke): no nightly toolchain (cargo +nightly) (needs nightly)" |
		tee -a "$JANUS_NOT_RUN_LOG"
fi

# VM mode: the QEMU driver tests, booting the guest for real (TCG here, KVM where the CPU has
# vmx/svm).
if [ "$GUEST_OK" = 1 ]; then
	step "vm tests" timeout --kill-after=30 "$IT_TIMEOUT" \
		cargo test -p runtime --features vm -- --test-threads=1
else
	skip "vm tests" "guest image build failed"
fi
# The same driver on Debian's kernel, a smaller set: the test init (its 19 boot modules), the
# agent's boot, and a container's life in the guest.
if [ "$GUEST_DEBIAN_OK" = 1 ]; then
	step "vm tests (debian)" env JANUS_GUEST_DIR="$GUEST_DEBIAN_DIR" timeout --kill-after=30 "$IT_TIMEOUT" \
		cargo test -p runtime --features vm --test vm_qemu --test vm_container -- --test-threads=1 \
		testinit_boots_and_powers_off agent_boot_health_details_shutdown \
		vm_container_exec_signals_stats_pause_update_oom
else
	skip "vm tests (debian)" "guest image (debian) failed"
fi

echo
echo "==================== summary ===================="
for i in "${!NAMES[@]}"; do
	printf '  %-20s %-8s %s\n' "${NAMES[$i]}" "${TIMES[$i]}" "${RESULTS[$i]}"
done
echo "================================================="
PASSED_N="$(grep -ao 'test result: [A-Za-z]*\. [0-9]* passed' "$TEST_LOG" | awk '{s += $4} END {print s + 0}')"
FAILED_N="$(grep -ao 'passed; [0-9]* failed' "$TEST_LOG" | awk '{s += $2} END {print s + 0}')"
# cargo counts a test that returned early as passed: those are not run, and not passes. A
# whole step not run ("NOT RUN: step ...") was never among cargo's counts.
NOT_RUN_N="$(grep -c '^NOT RUN: ' "$JANUS_NOT_RUN_LOG" || true)"
NOT_RUN_STEPS="$(grep -c '^NOT RUN: step ' "$JANUS_NOT_RUN_LOG" || true)"
PASSED_N=$((PASSED_N - (NOT_RUN_N - NOT_RUN_STEPS)))
if [ -s "$JANUS_NOT_RUN_LOG" ]; then
	echo "not run here (by name; each step that ran it adds a line):"
	sed 's/^/  /' "$JANUS_NOT_RUN_LOG"
fi
if [ "$FAILED" -ne 0 ]; then
	echo "hack/test.sh: FAILED"
	echo "tests: $PASSED_N passed, $FAILED_N failed, $NOT_RUN_N not run"
	exit 1
fi
echo "hack/test.sh: all steps passed"
echo "tests: $PASSED_N passed, $FAILED_N failed, $NOT_RUN_N not run"
