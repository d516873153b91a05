# shellcheck shell=bash
# Shared helpers for the hack/ scripts. Source it: . "$(dirname "$0")/lib.sh"
#
# Provides:
#   log/die               messages on stderr
#   need_root             fail unless running as root
#   ensure_apt PKG...     apt-get install the packages that are not installed yet
#                         (apt-get update at most once per script run)
#   ensure_base_deps      the packages every script needs (containerd, runc, busybox-static...)
#   ensure_rust           fail clearly when cargo is missing
#   release_build         the one release build of the workspace (binaries and the VM benchmark)
#   containerd_write_config DIR
#                         write DIR/config.toml for a private containerd rooted in DIR
#   containerd_start DIR SHIM_BIN
#                         start a private containerd (own root, state, socket, config) in DIR,
#                         with SHIM_BIN linked as containerd-shim-janus-v2 first on its PATH
#   containerd_stop DIR   stop it (by the PID it recorded) and its leftover shims
#   containerd_rm_ns_cgroups NS
#                         remove empty cgroup dirs of containerd namespace NS
#   ctr_private DIR ARGS  run ctr against it
#   janus_image_tar       where build-image.sh caches the busybox image
#   apt_update_once       apt-get update at most once per script run
#   host_tsc_khz          host TSC frequency in kHz (for the guest's tsc_early_khz=)
#   janus_pause_tar       where build-image.sh caches the pause image (CRI tests)
#   busybox_rootfs ROOT   the busybox-static rootfs of build-image.sh in ROOT
#   oci_image_tar WORK ROOT CONFIG_JSON IMAGE_NAME CREATED_BY OUT [full-name]
#                         pack ROOT as the one layer of an OCI image (layout packed as a tar)
#   ensure_containerd SUITE
#                         containerd from Debian's SUITE (trixie: 1.7, sid: 2.x), downloaded
#                         with apt and a sources list of our own, extracted into a cache (never
#                         installed over the system's); prints the extracted root

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HACK_DIR/.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

JANUS_TEST_IMAGE="${JANUS_TEST_IMAGE:-janus.test/busybox:latest}"

# release_build: the workspace's binaries and runtime's vm_bench example, in one cargo run that
# every script shares. An example turns on its package's dev-dependencies, which changes the
# features cargo unifies for the whole build: building the binaries with it here and without it
# elsewhere would recompile runtime and the shim each time a script switched.
release_build() {
	(cd "$REPO_ROOT" && cargo build --release --workspace --bins --example vm_bench)
}

# quote_args ARGS...: print the arguments as a shell would need them typed (single quotes).
quote_args() {
	local a out=()
	for a in "$@"; do
		if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
			out+=("$a")
		else
			out+=("'${a//\'/\'\\\'\'}'")
		fi
	done
	echo "${out[*]}"
}

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
	[ "$(id -u)" -eq 0 ] || die "must run as root (containerd, mounts, cgroups)"
}

_APT_UPDATED=0
ensure_apt() {
	local missing=() p
	for p in "$@"; do
		if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
			missing+=("$p")
		fi
	done
	[ "${#missing[@]}" -eq 0 ] && return 0
	command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get"
	if [ "$_APT_UPDATED" -eq 0 ]; then
		log "apt-get update"
		apt-get update -q >&2 || die "apt-get update failed"
		_APT_UPDATED=1
	fi
	log "apt-get install ${missing[*]}"
	apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
		die "apt-get install ${missing[*]} failed"
}

# Packages needed to build images and run containers.
ensure_base_deps() {
	ensure_apt containerd runc busybox-static umoci skopeo jq iproute2 iptables \
		containernetworking-plugins util-linux tar coreutils gzip
	# The systemd-managed node of the cgroup tests (tests/systemd-node.sh): systemd as a
	# container's PID 1 with dbus (never the host's init).
	ensure_apt systemd dbus
	# kubectl validates deploy/'s manifests offline against a fake API server
	# (tests/tests/deploy.rs); Debian's kubectl where the machine has none of its own.
	command -v kubectl >/dev/null || ensure_apt kubernetes-client
}

# Packages needed to build the workspace.
ensure_build_deps() {
	ensure_apt protobuf-compiler pkg-config build-essential libseccomp-dev
	# The vmm crate's tests: iasl checks its ACPI tables (gcc, from build-essential,
	# assembles the test guests).
	ensure_apt acpica-tools
}

ensure_rust() {
	if ! command -v cargo >/dev/null; then
		if [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
			export PATH="${HOME:-/root}/.cargo/bin:$PATH"
		else
			die "cargo not found: install a Rust toolchain (rustup or Debian's cargo) first"
		fi
	fi
}

janus_image_tar() {
	echo "${JANUS_TEST_IMAGE_TAR:-$REPO_ROOT/target/janus-test/busybox.tar}"
}

# The CRI sandbox (pause) image archive of the CRI tests (build-image.sh OUT pause).
janus_pause_tar() {
	echo "${JANUS_TEST_PAUSE_TAR:-$REPO_ROOT/target/janus-test/pause.tar}"
}

# Locate the shim binary: $JANUS_SHIM, else target/release, else target/debug.
janus_shim_bin() {
	local t="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
	if [ -n "${JANUS_SHIM:-}" ]; then
		echo "$JANUS_SHIM"
	elif [ -x "$t/release/containerd-shim-janus-v2" ]; then
		echo "$t/release/containerd-shim-janus-v2"
	elif [ -x "$t/debug/containerd-shim-janus-v2" ]; then
		echo "$t/debug/containerd-shim-janus-v2"
	else
		return 1
	fi
}

# containerd_write_config DIR: version 2 config for a private containerd in DIR.
containerd_write_config() {
	local dir="$1"
	mkdir -p "$dir/root" "$dir/state" "$dir/bin"
	cat >"$dir/config.toml" <<EOF
version = 2
root = "$dir/root"
state = "$dir/state"
oom_score = 0
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[debug]
  address = "$dir/debug.sock"
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"

# ctr's --runtime goes straight to the v2 task manager, which runs containerd-shim-<name>-v2
# from containerd's PATH ($dir/bin first): no per-runtime tables needed without CRI.
[plugins."io.containerd.runtime.v2.task"]
  platforms = ["linux/amd64"]
EOF
}

# containerd_start DIR SHIM_BIN: start containerd in the background, wait for its socket.
containerd_start() {
	local dir="$1" shim="$2"
	containerd_write_config "$dir"
	ln -sfn "$shim" "$dir/bin/containerd-shim-janus-v2"
	ln -sfn "$shim" "$dir/bin/containerd-shim-janus-vm-v2"
	if [ -f "$dir/containerd.pid" ] && kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null; then
		log "containerd already running in $dir (pid $(cat "$dir/containerd.pid")), stopping it first"
		containerd_stop "$dir"
	fi
	rm -f "$dir/containerd.sock" "$dir/containerd.sock.ttrpc" "$dir/debug.sock"
	PATH="$dir/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
		setsid /usr/bin/containerd --config "$dir/config.toml" \
		>"$dir/containerd.log" 2>&1 </dev/null &
	echo $! >"$dir/containerd.pid"
	for _ in $(seq 1 200); do
		if ctr --address "$dir/containerd.sock" version >/dev/null 2>&1; then
			return 0
		fi
		kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null || {
			tail -n 30 "$dir/containerd.log" >&2
			die "containerd exited during startup (log: $dir/containerd.log)"
		}
		sleep 0.05
	done
	tail -n 30 "$dir/containerd.log" >&2
	die "containerd did not answer on $dir/containerd.sock within 10s"
}

# Kill shims whose command line names this containerd's socket or state dir.
_kill_private_shims() {
	local dir="$1" p cmd
	for p in /proc/[0-9]*; do
		# A process may exit between the glob and the read: the redirection's error is noise.
		cmd="$({ tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null)" || continue
		case "$cmd" in
		*containerd-shim*"$dir/"*) kill -9 "${p#/proc/}" 2>/dev/null || true ;;
		esac
	done
}

containerd_stop() {
	local dir="$1" pid
	if [ -f "$dir/containerd.pid" ]; then
		pid="$(cat "$dir/containerd.pid")"
		if kill -0 "$pid" 2>/dev/null; then
			kill -TERM "$pid" 2>/dev/null || true
			for _ in $(seq 1 100); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.05
			done
			kill -KILL "$pid" 2>/dev/null || true
		fi
		rm -f "$dir/containerd.pid"
	fi
	_kill_private_shims "$dir"
}

# containerd_rm_ns_cgroups NS: remove the (empty) per-namespace cgroup parents that runc and
# Janus leave under /sys/fs/cgroup/<ctrl>/NS.
containerd_rm_ns_cgroups() {
	local ns="$1" d
	for d in /sys/fs/cgroup/*/"$ns" /sys/fs/cgroup/"$ns"; do
		[ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
	done
	return 0
}

ctr_private() {
	local dir="$1"
	shift
	ctr --address "$dir/containerd.sock" "$@"
}

# apt_update_once: apt-get update, at most once per script run (shared with ensure_apt).
apt_update_once() {
	[ "$_APT_UPDATED" -eq 1 ] && return 0
	log "apt-get update"
	apt-get update -q >&2 || die "apt-get update failed"
	_APT_UPDATED=1
}

# host_tsc_khz: the host TSC frequency in kHz, for the guest's tsc_early_khz= (QEMU microvm
# under TCG otherwise fails TSC calibration in ~1 boot of 6 and hangs). Taken from the kernel's
# "tsc: Refined/Detected TSC clocksource ... MHz" line when dmesg is readable, else from
# /proc/cpuinfo's "cpu MHz" (equal to the TSC rate only with constant_tsc/tsc_known_freq, as in
# this VM; on bare metal with frequency scaling prefer the dmesg line). Prints nothing when
# neither is available.
host_tsc_khz() {
	local mhz
	mhz="$(dmesg 2>/dev/null | sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9.]*\) MHz.*/\1/p' | tail -n1)" || true
	[ -n "$mhz" ] || mhz="$(dmesg 2>/dev/null | sed -n 's/.*tsc: Detected \([0-9.]*\) MHz processor.*/\1/p' | tail -n1)" || true
	[ -n "$mhz" ] || mhz="$(sed -n 's/^cpu MHz[[:space:]]*: *\([0-9.]*\)$/\1/p' /proc/cpuinfo | head -n1)" || true
	[ -n "$mhz" ] || return 0
	awk -v m="$mhz" 'BEGIN { printf "%d\n", m * 1000 + 0.5 }'
}

# ensure_containerd SUITE: print the root of Debian SUITE's containerd package, extracted under
# $JANUS_CACHE_DIR (default /var/cache/janus: outside the clone, reused by later runs). apt runs
# with its own sources list, lists and cache, so the system's apt state is untouched.
ensure_containerd() {
	local suite="$1"
	local cache="${JANUS_CACHE_DIR:-/var/cache/janus}/containerd/$suite"
	local apt_dir="$cache/apt" root="$cache/root"
	if [ -x "$root/usr/bin/containerd" ] && [ -s "$cache/version" ]; then
		echo "$root"
		return 0
	fi
	mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$cache/dl"
	# The system's Debian entry with the suite changed.
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
		>"$apt_dir/sources.list"
	local opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=/dev/null"
		-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
	log "containerd ($suite): apt-get update with a sources list of our own"
	apt-get "${opts[@]}" update -q >&2 || die "apt-get update for $suite failed"
	rm -f "$cache"/dl/*.deb
	chmod 0755 "$cache/dl"
	if id _apt >/dev/null 2>&1; then chown _apt "$cache/dl"; fi
	(cd "$cache/dl" && apt-get "${opts[@]}" download -q containerd >&2) ||
		die "apt-get download containerd ($suite) failed"
	local deb
	deb="$(ls "$cache"/dl/containerd_*.deb)"
	rm -rf "$root"
	dpkg-deb -x "$deb" "$root"
	dpkg-deb -f "$deb" Version >"$cache/version"
	[ -x "$root/usr/bin/containerd" ] || die "$deb has no usr/bin/containerd"
	log "containerd ($suite): $(cat "$cache/version") in $root"
	echo "$root"
}

# busybox_rootfs ROOT: Debian's busybox-static in ROOT (build-image.sh describes the result):
# /bin/busybox plus every applet as a HARD link at the path `busybox --list-full` gives,
# /etc/passwd and /etc/group (root, user 1000, nobody 65534), /tmp (1777), /root, /home/user.
busybox_rootfs() {
	local root="$1" busybox=/bin/busybox d applet found a
	ensure_apt busybox-static
	[ -x "$busybox" ] || die "$busybox missing after installing busybox-static"
	"$busybox" --list-full >/dev/null || die "$busybox --list-full failed"
	for d in bin sbin usr/bin usr/sbin etc dev proc sys run var var/tmp home; do
		install -d -m 0755 "$root/$d"
	done
	install -d -m 1777 "$root/tmp"
	chmod 1777 "$root/var/tmp"
	install -d -m 0700 "$root/root"
	install -d -m 0755 -o 1000 -g 1000 "$root/home/user"

	install -m 0755 "$busybox" "$root/bin/busybox"
	while read -r applet; do
		case "$applet" in
		bin/busybox | "") continue ;;
		*/*) ;;
		*) continue ;; # e.g. "linuxrc" at the top level: not wanted
		esac
		mkdir -p "$root/$(dirname "$applet")"
		ln -f "$root/bin/busybox" "$root/$applet"
	done < <("$busybox" --list-full)
	# Sanity: hard links, not symlinks.
	[ "$(stat -c %h "$root/bin/busybox")" -gt 100 ] || die "applet hard links were not created"
	[ -z "$(find "$root" -type l)" ] || die "unexpected symlinks in rootfs"
	for a in sh cat echo sleep head tr kill tty id uname dd ls; do
		found=0
		for d in bin sbin usr/bin usr/sbin; do [ -e "$root/$d/$a" ] && found=1; done
		[ "$found" = 1 ] || die "applet $a missing from busybox --list-full"
	done

	cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
	cat >"$root/etc/group" <<'GROUP'
root:x:0:
user:x:1000:
nogroup:x:65534:
GROUP
	chmod 0644 "$root/etc/passwd" "$root/etc/group"
}

# oci_image_tar WORK ROOT CONFIG_JSON IMAGE_NAME CREATED_BY OUT [full-name]: ROOT as the only layer of an
# OCI image (linux/amd64, image config CONFIG_JSON, history CREATED_BY), written as an OCI
# image layout packed as a tar at OUT (replaced atomically). Its one manifest is annotated
# org.opencontainers.image.ref.name=<IMAGE_NAME's tag>; build-image.sh says how ctr imports it.
# With "full-name" it is also annotated io.containerd.image.name=IMAGE_NAME: a plain
# `ctr images import` (as `kind load image-archive` runs it) then names the image IMAGE_NAME
# (and --base-name is not needed; never combine it with an --index-name of the same name).
# Deterministic: the same ROOT and config give the same bytes. WORK is a scratch directory.
oci_image_tar() {
	local work="$1" root="$2" cfg="$3" name="$4" created_by="$5" dest="$6" full="${7:-}"
	# shellcheck disable=SC2016 # jq's $name, not the shell's
	local annotations='{ "org.opencontainers.image.ref.name": ($name | sub("^.*:"; "")) }'
	if [ "$full" = full-name ]; then
		annotations="$annotations + { \"io.containerd.image.name\": \$name }"
	fi
	local layout="$work/layout" diff_id
	local layer_digest layer_size config_digest config_size manifest_digest manifest_size
	mkdir -p "$layout/blobs/sha256"
	# Sorted, fixed mtime, numeric owners; GNU tar keeps hard links as links.
	tar --sort=name --mtime=@0 --numeric-owner --format=posix \
		--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
		-C "$root" -cf "$work/layer.tar" .
	diff_id="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
	gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"
	read -r layer_digest layer_size < <(_oci_blob "$layout" "$work/layer.tar.gz")

	jq -n -c --arg diff "$diff_id" --argjson cfg "$cfg" --arg by "$created_by" '{
	created: "1970-01-01T00:00:00Z",
	architecture: "amd64",
	os: "linux",
	config: $cfg,
	rootfs: { type: "layers", diff_ids: [$diff] },
	history: [{ created: "1970-01-01T00:00:00Z", created_by: $by }]
}' >"$work/config.json"
	read -r config_digest config_size < <(_oci_blob "$layout" "$work/config.json")

	jq -n -c \
		--arg cd "$config_digest" --argjson cs "$config_size" \
		--arg ld "$layer_digest" --argjson ls "$layer_size" '{
	schemaVersion: 2,
	mediaType: "application/vnd.oci.image.manifest.v1+json",
	config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs },
	layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $ld, size: $ls }]
}' >"$work/manifest.json"
	read -r manifest_digest manifest_size < <(_oci_blob "$layout" "$work/manifest.json")

	jq -n -c --arg md "$manifest_digest" --argjson ms "$manifest_size" --arg name "$name" '{
	schemaVersion: 2,
	manifests: [{
		mediaType: "application/vnd.oci.image.manifest.v1+json",
		digest: $md,
		size: $ms,
		platform: { architecture: "amd64", os: "linux" },
		annotations: ('"$annotations"')
	}]
}' >"$layout/index.json"
	echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

	tar --sort=name --mtime=@0 --numeric-owner -C "$layout" -cf "$work/image.tar" oci-layout index.json blobs
	mv -f "$work/image.tar" "$dest"
	log "built $dest ($name, manifest $manifest_digest)"
}

# _oci_blob LAYOUT FILE: store FILE as a blob of LAYOUT; prints "sha256:<hex> <size>".
_oci_blob() {
	local layout="$1" f="$2" h s
	h="$(sha256sum "$f" | cut -d' ' -f1)"
	s="$(stat -c %s "$f")"
	cp "$f" "$layout/blobs/sha256/$h"
	echo "sha256:$h $s"
}
