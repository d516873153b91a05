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
# Cached: nothing is done when OUT_TAR exists and is newer than this script and than busybox.
# Concurrent callers are serialised with flock on OUT_TAR.lock.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"

[ $# -eq 1 ] || [ $# -eq 2 ] || die "usage: $0 OUT_TAR [busybox|pause]"
OUT="$1"
KIND="${2:-busybox}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
SCRIPT="$HERE/build-image.sh"
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
	[ -s "$OUT" ] && [ "$OUT" -nt "$SCRIPT" ] && { [ ! -e "$BUSYBOX" ] || [ "$OUT" -nt "$BUSYBOX" ]; }
}
if up_to_date; then
	log "up to date: $OUT"
	exit 0
fi

ensure_apt busybox-static jq tar coreutils gzip
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing after installing busybox-static"
"$BUSYBOX" --list-full >/dev/null || die "$BUSYBOX --list-full failed"

WORK="$(mktemp -d "$(dirname "$OUT")/.build-image.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/rootfs"
LAYOUT="$WORK/layout"
mkdir -p "$ROOT" "$LAYOUT/blobs/sha256"

# --- rootfs -------------------------------------------------------------------------------
for d in bin sbin usr/bin usr/sbin etc dev proc sys run var var/tmp home; do
	install -d -m 0755 "$ROOT/$d"
done
install -d -m 1777 "$ROOT/tmp"
chmod 1777 "$ROOT/var/tmp"
install -d -m 0700 "$ROOT/root"
install -d -m 0755 -o 1000 -g 1000 "$ROOT/home/user"

install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
while read -r applet; do
	case "$applet" in
	bin/busybox | "") continue ;;
	*/*) ;;
	*) continue ;; # e.g. "linuxrc" at the top level: not wanted
	esac
	mkdir -p "$ROOT/$(dirname "$applet")"
	ln -f "$ROOT/bin/busybox" "$ROOT/$applet"
done < <("$BUSYBOX" --list-full)
# Sanity: hard links, not symlinks.
[ "$(stat -c %h "$ROOT/bin/busybox")" -gt 100 ] || die "applet hard links were not created"
[ -z "$(find "$ROOT" -type l)" ] || die "unexpected symlinks in rootfs"
for a in sh cat echo sleep head tr kill tty id uname dd ls; do
	found=0
	for d in bin sbin usr/bin usr/sbin; do [ -e "$ROOT/$d/$a" ] && found=1; done
	[ "$found" = 1 ] || die "applet $a missing from busybox --list-full"
done

cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
user:x:1000:
nogroup:x:65534:
EOF
chmod 0644 "$ROOT/etc/passwd" "$ROOT/etc/group"

# --- layer ----------------------------------------------------------------------------------
# Deterministic tar: sorted, fixed mtime, numeric owners; GNU tar keeps hard links as links.
tar --sort=name --mtime=@0 --numeric-owner --format=posix \
	--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
	-C "$ROOT" -cf "$WORK/layer.tar" .
DIFF_ID="sha256:$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1)"
gzip -n -9 -c "$WORK/layer.tar" >"$WORK/layer.tar.gz"

# blob FILE -> prints "sha256:<hex> <size>" and stores the blob in the layout
blob() {
	local f="$1" h s
	h="$(sha256sum "$f" | cut -d' ' -f1)"
	s="$(stat -c %s "$f")"
	cp "$f" "$LAYOUT/blobs/sha256/$h"
	echo "sha256:$h $s"
}
read -r LAYER_DIGEST LAYER_SIZE < <(blob "$WORK/layer.tar.gz")

# --- config ---------------------------------------------------------------------------------
IMAGE_PATH_ENV='["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]'
if [ "$KIND" = pause ]; then
	CONFIG_JSON="$(jq -n -c --argjson env "$IMAGE_PATH_ENV" --arg s "$PAUSE_SCRIPT" \
		'{Env: $env, Entrypoint: ["/bin/sh", "-c", $s], WorkingDir: "/"}')"
else
	CONFIG_JSON="$(jq -n -c --argjson env "$IMAGE_PATH_ENV" '{Env: $env, Cmd: ["/bin/sh"], WorkingDir: "/"}')"
fi
jq -n -c --arg diff "$DIFF_ID" --argjson cfg "$CONFIG_JSON" '{
	created: "1970-01-01T00:00:00Z",
	architecture: "amd64",
	os: "linux",
	config: $cfg,
	rootfs: { type: "layers", diff_ids: [$diff] },
	history: [{ created: "1970-01-01T00:00:00Z", created_by: "janus hack/build-image.sh (Debian busybox-static)" }]
}' >"$WORK/config.json"
read -r CONFIG_DIGEST CONFIG_SIZE < <(blob "$WORK/config.json")

# --- manifest, index --------------------------------------------------------------------------
jq -n -c \
	--arg cd "$CONFIG_DIGEST" --argjson cs "$CONFIG_SIZE" \
	--arg ld "$LAYER_DIGEST" --argjson ls "$LAYER_SIZE" '{
	schemaVersion: 2,
	mediaType: "application/vnd.oci.image.manifest.v1+json",
	config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs },
	layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $ld, size: $ls }]
}' >"$WORK/manifest.json"
read -r MANIFEST_DIGEST MANIFEST_SIZE < <(blob "$WORK/manifest.json")

jq -n -c --arg md "$MANIFEST_DIGEST" --argjson ms "$MANIFEST_SIZE" --arg name "$IMAGE_NAME" '{
	schemaVersion: 2,
	manifests: [{
		mediaType: "application/vnd.oci.image.manifest.v1+json",
		digest: $md,
		size: $ms,
		platform: { architecture: "amd64", os: "linux" },
		annotations: { "org.opencontainers.image.ref.name": ($name | sub("^.*:"; "")) }
	}]
}' >"$LAYOUT/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$LAYOUT/oci-layout"

tar --sort=name --mtime=@0 --numeric-owner -C "$LAYOUT" -cf "$WORK/image.tar" oci-layout index.json blobs
mv -f "$WORK/image.tar" "$OUT"
log "built $OUT ($IMAGE_NAME, manifest $MANIFEST_DIGEST)"
