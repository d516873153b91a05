#!/bin/bash
# Build a busybox OCI image archive from Debian's busybox-static, without network or registry.
#
#   hack/build-image.sh OUT_TAR [busybox|pause]
#
# KIND busybox (default): janus.test/busybox:latest ($JANUS_TEST_IMAGE), Cmd ["/bin/sh"].
# KIND pause: janus.test/pause:latest ($JANUS_TEST_PAUSE_IMAGE), the CRI sandbox ("pause") image
#   of the CRI tests: the same rootfs, with an entrypoint that sleeps until SIGTERM/SIGINT and then
#   exits 0 (its one child, the sleep, is killed first, so nothing outlives it even with hostPID).
#
# The result is an OCI image layout packed as a tar (oci-layout, index.json, blobs/sha256/...).
# Its only manifest is annotated org.opencontainers.image.ref.name=latest (the tag). With
# containerd 1.6.20 either of these imports it as janus.test/busybox:latest:
#   ctr -n NS images import --base-name janus.test/busybox OUT_TAR   (pause: janus.test/pause)
#       -> one image, target = the manifest (what the test harness uses)
#   ctr -n NS images import --index-name janus.test/busybox:latest OUT_TAR
#       -> image janus.test/busybox:latest with target = a new index, plus an extra image
#          "import-<date>:latest" (ctr's default base name) for the manifest
# Do NOT add an io.containerd.image.name annotation equal to the --index-name: containerd then
# creates two records with the same name, the index one is overwritten and its content
# garbage-collected, and the import fails with "content digest ...: not found".
#
# Rootfs: /bin/busybox plus every applet as a HARD link at the path `busybox --list-full` gives
# (/bin, /sbin, /usr/bin, /usr/sbin), /etc/passwd and /etc/group (root, user 1000, nobody 65534),
# /tmp (1777), /root, /home/user. Config: Cmd ["/bin/sh"], Env PATH, linux/amd64.
#
# Cached: nothing is done when OUT_TAR exists and is newer than this script, hack/lib.sh (which
# has the rootfs and the packing: busybox_rootfs, oci_image_tar) and busybox.
# Concurrent callers are serialised with flock on OUT_TAR.lock.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"

[ $# -eq 1 ] || [ $# -eq 2 ] || die "usage: $0 OUT_TAR [busybox|pause]"
OUT="$1"
KIND="${2:-busybox}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
SCRIPT="$HERE/build-image.sh"
LIB="$HERE/lib.sh"
# The pause entrypoint: PID 1 of the sandbox. `wait` returns when a trapped signal arrives.
PAUSE_SCRIPT='trap "kill \$c 2>/dev/null; exit 0" TERM INT; sleep 2147483647 & c=$!; wait $c'
case "$KIND" in
busybox)
	IMAGE_NAME="${JANUS_TEST_IMAGE:-janus.test/busybox:latest}"
	;;
pause)
	IMAGE_NAME="${JANUS_TEST_PAUSE_IMAGE:-janus.test/pause:latest}"
	;;
*) die "unknown image kind $KIND (busybox or pause)" ;;
esac

mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9

BUSYBOX=/bin/busybox
up_to_date() {
	[ -s "$OUT" ] && [ "$OUT" -nt "$SCRIPT" ] && [ "$OUT" -nt "$LIB" ] && { [ ! -e "$BUSYBOX" ] || [ "$OUT" -nt "$BUSYBOX" ]; }
}
if up_to_date; then
	log "up to date: $OUT"
	exit 0
fi

ensure_apt busybox-static jq tar coreutils gzip

WORK="$(mktemp -d "$(dirname "$OUT")/.build-image.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/rootfs"
mkdir -p "$ROOT"
busybox_rootfs "$ROOT"

# --- config ---------------------------------------------------------------------------------
IMAGE_PATH_ENV='["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]'
if [ "$KIND" = pause ]; then
	CONFIG_JSON="$(jq -n -c --argjson env "$IMAGE_PATH_ENV" --arg s "$PAUSE_SCRIPT" \
		'{Env: $env, Entrypoint: ["/bin/sh", "-c", $s], WorkingDir: "/"}')"
else
	CONFIG_JSON="$(jq -n -c --argjson env "$IMAGE_PATH_ENV" '{Env: $env, Cmd: ["/bin/sh"], WorkingDir: "/"}')"
fi
oci_image_tar "$WORK" "$ROOT" "$CONFIG_JSON" "$IMAGE_NAME" \
	"janus hack/build-image.sh (Debian busybox-static)" "$OUT"
