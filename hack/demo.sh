#!/bin/bash
# Demo: run a busybox container with Janus in namespace mode under a private containerd.
#
#   hack/demo.sh [COMMAND...]      default: sh -c 'echo hello from Janus namespace mode; uname -a; id'
#
# Installs missing deps, builds the workspace (release), builds the image (cached), starts a
# private containerd in $JANUS_DEMO_DIR (default /var/lib/janus-demo; own socket, root, state),
# imports the image when missing, runs the container with `ctr run --rm --runtime
# io.containerd.janus.v2`, and stops containerd again. Idempotent; fast the second time.
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
	cargo build --release --workspace --bins
	SHIM="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/containerd-shim-janus-v2"
fi
[ -x "$SHIM" ] || die "$SHIM is not an executable"

TAR="$(janus_image_tar)"
"$HERE/build-image.sh" "$TAR"

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

# Leftovers of an interrupted earlier run.
ctr_private "$DIR" -n "$NS" task kill -s SIGKILL "$ID" >/dev/null 2>&1 || true
ctr_private "$DIR" -n "$NS" task rm -f "$ID" >/dev/null 2>&1 || true
ctr_private "$DIR" -n "$NS" containers rm "$ID" >/dev/null 2>&1 || true

if [ $# -eq 0 ]; then
	set -- sh -c 'echo hello from Janus namespace mode; uname -a; id'
fi
echo "\$ ctr run --rm --runtime $(quote_args "$RUNTIME" "$JANUS_TEST_IMAGE" "$ID" "$@")"
rc=0
ctr_private "$DIR" -n "$NS" run --rm --runtime "$RUNTIME" "$JANUS_TEST_IMAGE" "$ID" "$@" || rc=$?
echo "[exit status $rc]"
if [ "$rc" -ne 0 ]; then
	log "the container failed; containerd log (shim logs included): $DIR/containerd.log"
	grep -v 'loading plugin' "$DIR/containerd.log" | tail -n 20 >&2
fi
exit "$rc"
