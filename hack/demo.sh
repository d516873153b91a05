#!/bin/bash
# Demo: run a busybox container with Janus in namespace mode, then in VM mode, under a private
# containerd.
#
#   hack/demo.sh [COMMAND...]      default: sh -c 'echo hello from Janus <mode> mode; uname -r; id'
#
# Installs missing deps, builds the workspace (release), the image and the VM guest (cached),
# starts a private containerd in $JANUS_DEMO_DIR (default /var/lib/janus-demo; own socket,
# root, state), imports the image when missing, runs the container with `ctr run --rm --runtime
# io.containerd.janus.v2` (namespace mode) and `--runtime io.containerd.janus-vm.v2` (VM mode:
# QEMU, Debian's kernel, our agent; `uname -r` shows the guest kernel), and stops containerd
# again. Idempotent; fast the second time.
# JANUS_SHIM=/path/to/containerd-shim-janus-v2 skips the build and uses that binary.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
cd "$REPO_ROOT"

need_root
ensure_base_deps
ensure_build_deps
ensure_rust

DIR="${JANUS_DEMO_DIR:-/var/lib/janus-demo}"
NS=janus-demo
ID=demo-ns
RUNTIME=io.containerd.janus.v2

if [ -n "${JANUS_SHIM:-}" ]; then
	SHIM="$JANUS_SHIM" # prebuilt shim given: no build
	log "using JANUS_SHIM=$SHIM (not building)"
else
	log "building the workspace (release)"
	release_build
	SHIM="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/containerd-shim-janus-v2"
fi
[ -x "$SHIM" ] || die "$SHIM is not an executable"

TAR="$(janus_image_tar)"
"$HERE/build-image.sh" "$TAR"
log "VM guest (kernel + initramfs with the agent)"
"$HERE/build-guest.sh"

mkdir -p "$DIR"
trap 'containerd_stop "$DIR"; containerd_rm_ns_cgroups "$NS"' EXIT
log "starting containerd in $DIR"
containerd_start "$DIR" "$SHIM"

if ! ctr_private "$DIR" -n "$NS" images ls -q | grep -qx "$JANUS_TEST_IMAGE" ||
	[ "$TAR" -nt "$DIR/image.stamp" ]; then
	log "importing $JANUS_TEST_IMAGE"
	ctr_private "$DIR" -n "$NS" images import --base-name "${JANUS_TEST_IMAGE%:*}" "$TAR" >&2
	touch "$DIR/image.stamp"
fi

run_demo() {
	local runtime="$1" id="$2" mode="$3"
	shift 3
	# Leftovers of an interrupted earlier run.
	ctr_private "$DIR" -n "$NS" task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
	ctr_private "$DIR" -n "$NS" task rm -f "$id" >/dev/null 2>&1 || true
	ctr_private "$DIR" -n "$NS" containers rm "$id" >/dev/null 2>&1 || true
	if [ $# -eq 0 ]; then
		set -- sh -c "echo hello from Janus $mode mode; uname -r; id"
	fi
	echo "\$ ctr run --rm --runtime $(quote_args "$runtime" "$JANUS_TEST_IMAGE" "$id" "$@")"
	local rc=0
	ctr_private "$DIR" -n "$NS" run --rm --runtime "$runtime" "$JANUS_TEST_IMAGE" "$id" "$@" || rc=$?
	echo "[exit status $rc]"
	if [ "$rc" -ne 0 ]; then
		log "the container failed; containerd log (shim logs included): $DIR/containerd.log"
		grep -v 'loading plugin' "$DIR/containerd.log" | tail -n 20 >&2
	fi
	return "$rc"
}

echo "host kernel: $(uname -r)"
rc=0
run_demo "$RUNTIME" "$ID" namespace "$@" || rc=$?
echo
run_demo io.containerd.janus-vm.v2 demo-vm VM "$@" || rc=$?
exit "$rc"
