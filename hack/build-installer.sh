#!/bin/bash
# Build the installer image janus.dev/janus-installer:<version> (deploy/installer/installer.yaml
# runs it as a DaemonSet), offline, as an OCI image archive like hack/build-image.sh's.
#
#   hack/build-installer.sh OUT_TAR
#
# Rootfs: busybox-static (sh, and nsenter for the containerd restart on the host) as in
# build-image.sh, plus
#   /opt/janus/bin/     containerd-shim-janus-v2, janus, janus-vmm (if built) from target/release
#   /opt/janus/guest/   vmlinux (else vmlinuz) and initramfs.cpio from target/guest
#                       ($JANUS_GUEST_DIR; hack/build-guest.sh makes them)
#   /opt/janus/etc/     config.toml, vm.toml (deploy/janus/)
#   the shared libraries `janus` needs, at the paths `ldd` gives (the shim and janus-vmm run on
#   the node, with the node's libraries)
#   /usr/bin/kubectl    the build machine's, if it has one (the node label needs it; without
#                       it `janus install` fails when NODE_NAME is set)
# Entrypoint: /opt/janus/bin/janus install --stay --host-root /host (the DaemonSet's args add
# --restart ...). Env PATH, HOME=/tmp (kubectl's cache).
#
# Build first: cargo build --release --workspace --bins (CARGO_TARGET_DIR is honoured).
# Load it: `ctr -n k8s.io images import OUT_TAR` on each node, or `kind load image-archive
# OUT_TAR`: the manifest is annotated io.containerd.image.name=janus.dev/janus-installer:<version>
# (and ref.name=<version>), so either names it without --base-name.
#
# Cached: nothing is done when OUT_TAR exists and is newer than every input (this script,
# hack/lib.sh, busybox, the payload files, the libraries, kubectl). The image name is printed
# last on stdout.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"

[ $# -eq 1 ] || die "usage: $0 OUT_TAR"
OUT="$1"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
TARGET="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
GUEST="${JANUS_GUEST_DIR:-$TARGET/guest}"
VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$REPO_ROOT/Cargo.toml")"
[ -n "$VERSION" ] || die "no [workspace.package] version in Cargo.toml"
IMAGE_NAME="${JANUS_INSTALLER_IMAGE:-janus.dev/janus-installer:$VERSION}"
ENTRYPOINT='["/opt/janus/bin/janus", "install", "--stay", "--host-root", "/host"]'

# --- inputs -----------------------------------------------------------------------------------
# PAYLOAD: "source destination-in-rootfs" lines.
payload() {
	local b k
	for b in containerd-shim-janus-v2 janus janus-vmm; do
		if [ -x "$TARGET/release/$b" ]; then
			echo "$TARGET/release/$b /opt/janus/bin/$b"
		elif [ "$b" != janus-vmm ]; then
			die "$TARGET/release/$b missing: cargo build --release --workspace --bins"
		fi
	done
	for k in vmlinux vmlinuz ""; do
		[ -n "$k" ] || die "no vmlinux or vmlinuz in $GUEST: hack/build-guest.sh (or set JANUS_GUEST_DIR)"
		[ -f "$GUEST/$k" ] && break
	done
	echo "$GUEST/$k /opt/janus/guest/$k"
	[ -f "$GUEST/initramfs.cpio" ] || die "no initramfs.cpio in $GUEST: hack/build-guest.sh"
	echo "$GUEST/initramfs.cpio /opt/janus/guest/initramfs.cpio"
	for k in config.toml vm.toml; do
		echo "$REPO_ROOT/deploy/janus/$k /opt/janus/etc/$k"
	done
	# The libraries janus links (file => path lines, and the loader's own line).
	ldd "$TARGET/release/janus" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
		sort -u | while read -r lib; do echo "$(readlink -f "$lib") $lib"; done
	if [ -x /usr/bin/kubectl ]; then
		echo "$(readlink -f /usr/bin/kubectl) /usr/bin/kubectl"
	fi
}

mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9

PAYLOAD="$(payload)"
up_to_date() {
	local src dst
	[ -s "$OUT" ] || return 1
	for src in "$HERE/build-installer.sh" "$HERE/lib.sh" /bin/busybox; do
		[ "$OUT" -nt "$src" ] || return 1
	done
	while read -r src dst; do
		[ "$OUT" -nt "$src" ] || return 1
	done <<<"$PAYLOAD"
}
if up_to_date; then
	log "up to date: $OUT"
	echo "$IMAGE_NAME"
	exit 0
fi
[ -x /usr/bin/kubectl ] ||
	log "no /usr/bin/kubectl here: the image has none, so the installer cannot label its node (run it with --node \"\" or label nodes by hand)"

ensure_apt busybox-static jq tar coreutils gzip

WORK="$(mktemp -d "$(dirname "$OUT")/.build-installer.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/rootfs"
mkdir -p "$ROOT"
busybox_rootfs "$ROOT"
while read -r src dst; do
	case "$dst" in
	*.toml | */guest/*) install -D -m 0644 "$src" "$ROOT$dst" ;;
	*) install -D -m 0755 "$src" "$ROOT$dst" ;;
	esac
done <<<"$PAYLOAD"
install -d -m 0755 "$ROOT/host"
"$ROOT/opt/janus/bin/janus" --version >/dev/null || die "the janus binary does not run"

CONFIG_JSON="$(jq -n -c --argjson ep "$ENTRYPOINT" '{
	Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/tmp"],
	Entrypoint: $ep,
	WorkingDir: "/",
	Labels: { "org.opencontainers.image.title": "janus-installer" }
}')"
oci_image_tar "$WORK" "$ROOT" "$CONFIG_JSON" "$IMAGE_NAME" \
	"janus hack/build-installer.sh (busybox-static, Janus $VERSION)" "$OUT" full-name
log "payload: $(awk '{print $2}' <<<"$PAYLOAD" | tr '\n' ' ')"
echo "$IMAGE_NAME"
