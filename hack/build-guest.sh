#!/usr/bin/env bash
# Build the Janus VM guest from Debian packages only (apt; nothing from other sources).
#
#   hack/build-guest.sh [OUT_DIR]            (default OUT_DIR: target/guest)
#
# Environment:
#   JANUS_GUEST_INIT=/path/to/static/binary  /init of initramfs.cpio; unset: the vm-agent, built
#                                            statically here (cargo). initramfs-testinit.cpio
#                                            always holds the test init (hack/guest/testinit.c)
#   JANUS_GUEST_KERNEL_PKG=linux-image-cloud-amd64
#                                            the kernel metapackage to resolve
#   SOURCE_DATE_EPOCH=0                      mtime of every initramfs entry
#
# Outputs in OUT_DIR:
#   vmlinuz                  the bzImage from the package
#   vmlinux                  the uncompressed ELF from inside it (boots through its PVH entry)
#   kernel.release           e.g. 6.1.0-56-cloud-amd64
#   modules/<release>/       the selected .ko files (package layout kernel/...) + modules.order
#                            (load order, dependencies first; paths relative to that directory)
#   testinit                 static test init (hack/guest/testinit.c)
#   initramfs-testinit.cpio  initramfs with the test init
#   initramfs.cpio           initramfs with $JANUS_GUEST_INIT (or the test init)
#   kernel.stamp, *.cpio.stamp  cache keys
#
# Cached: the kernel step is skipped while kernel.stamp matches the resolved package version and
# module list; an initramfs is rebuilt only when its init binary, the modules or this script
# changed. Reproducible: fixed mtimes, uid/gid 0, sorted names, renumbered inodes.
#
# The script can also be sourced (for build_initramfs) without running anything.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

# Bump when the layout of the outputs changes, to invalidate caches.
GUEST_BUILD_FORMAT=2
GUEST_KERNEL_PKG="${JANUS_GUEST_KERNEL_PKG:-linux-image-cloud-amd64}"
# What the guest needs, by module name; dependencies are added from modules.dep.
GUEST_MODULES=(
	virtio_mmio virtio_pci virtio_blk virtio_net virtio_console
	vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
	fuse virtiofs overlay erofs
)
# What a NET_ADMIN or privileged container may reasonably do in its pod, carried in the image
# but loaded only when the kernel asks for it (its module helper, /sbin/modprobe, is the
# agent: see vm-agent/src/modprobe.rs), so the boot pays nothing for them. docs/guest.md lists
# the reasoning; anything not here fails in the guest as it would on a host without it.
GUEST_MODULES_ON_DEMAND=(
	# links: bridges (brctl/ip), veth pairs, VLANs, tun/tap, macvlan/ipvlan, dummy, overlays
	bridge br_netfilter veth 8021q tun macvlan ipvlan dummy vxlan geneve ipip ip_gre sit
	wireguard
	# nftables (nft, iptables-nft)
	nf_tables nft_compat nft_chain_nat nft_ct nft_masq nft_nat nft_redir nft_reject_inet
	nft_fib_inet nft_limit nft_log
	# iptables-legacy and the xtables matches/targets kube-proxy, CNI plugins and meshes use
	ip_tables ip6_tables iptable_filter iptable_nat iptable_mangle iptable_raw
	ip6table_filter ip6table_nat ip6table_mangle ip6table_raw ipt_REJECT ip6t_REJECT
	xt_conntrack xt_MASQUERADE xt_addrtype xt_comment xt_mark xt_connmark xt_multiport xt_nat
	xt_REDIRECT xt_set xt_statistic xt_physdev xt_recent xt_limit xt_LOG xt_owner xt_CT
	nf_conntrack_netlink ip_set ip_set_hash_ip ip_set_hash_net nf_log_syslog
	# SCTP (Kubernetes services may use it)
	sctp
	# IPVS (kube-proxy's ipvs mode, load balancers)
	ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh
	# traffic control (tc: shaping, ingress, redirects)
	sch_htb sch_ingress cls_u32 act_mirred
)
: "${SOURCE_DATE_EPOCH:=0}"

_file_sha() { sha256sum "$1" | cut -d' ' -f1; }
_human_size() { numfmt --to=iec --suffix=B "$(stat -c %s "$1")"; }

# resolve_kernel_pkg META: print "<package> <version>" of the real kernel image package the
# metapackage's candidate depends on (e.g. linux-image-6.1.0-56-cloud-amd64 6.1.192-2).
resolve_kernel_pkg() {
	local meta="$1" dep pkg ver
	dep="$(apt-cache show --no-all-versions "$meta" 2>/dev/null |
		sed -n 's/^Depends: *//p' | head -n1 | tr ',' '\n' | grep -o '^ *linux-image-[^ ]*' |
		tr -d ' ' | head -n1)" || true
	[ -n "$dep" ] || return 1
	pkg="$dep"
	ver="$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: *//p' | head -n1)"
	[ -n "$ver" ] || return 1
	echo "$pkg $ver"
}

# extract_vmlinux BZIMAGE OUT: write the uncompressed kernel ELF embedded in a bzImage.
# The setup header gives the payload's place (payload_offset at 0x248, payload_length at 0x24c,
# relative to the protected-mode code after (setup_sects+1)*512 bytes); the payload is
# compressed data followed by the le32 uncompressed size. Debian's kernel uses LZ4 (legacy
# frame format, magic 02 21 4c 18); others are handled for completeness.
extract_vmlinux() {
	local bz="$1" out="$2" ss po pl off size magic got
	[ "$(od -An -tx1 -j $((0x202)) -N4 "$bz" | tr -d ' ')" = "48647253" ] ||
		die "$bz: no 'HdrS' bzImage header"
	ss="$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')"
	[ "$ss" -eq 0 ] && ss=4
	po="$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')"
	pl="$(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')"
	off=$(((ss + 1) * 512 + po))
	size="$(od -An -tu4 -j $((off + pl - 4)) -N4 "$bz" | tr -d ' ')"
	magic="$(od -An -tx1 -j "$off" -N4 "$bz" | tr -d ' ')"
	local dec
	case "$magic" in
	02214c18) dec=(lz4 -dc) ;;           # LZ4 legacy
	1f8b*) dec=(gzip -dc) ;;
	fd377a58) dec=(xz -dc) ;;
	28b52ffd) dec=(zstd -dc) ;;
	*) die "$bz: unknown payload compression (magic $magic at offset $off)" ;;
	esac
	log "vmlinux: payload at offset $off, $pl bytes, ${dec[0]}-compressed, $size bytes uncompressed"
	# Drop the trailing size word: lz4 would read it as a block header and fail.
	dd if="$bz" iflag=skip_bytes,count_bytes skip="$off" count=$((pl - 4)) bs=1M status=none |
		"${dec[@]}" >"$out.tmp" ||
		die "$bz: decompressing the payload failed"
	got="$(stat -c %s "$out.tmp")"
	[ "$got" -eq "$size" ] || die "$bz: payload decompressed to $got bytes, header says $size"
	[ "$(head -c 4 "$out.tmp" | od -An -tx1 | tr -d ' ')" = "7f454c46" ] ||
		die "$bz: payload is not an ELF file"
	# XEN_ELFNOTE_PHYS32_ENTRY (type 18 = 0x12) in a "Xen" note: the PVH entry point.
	# binutils 2.40 prints it as "Unknown note type: (0x00000012)", newer ones by name.
	local pvh
	pvh="$(readelf -n "$out.tmp" | awk '
		/^ *Xen / && ($0 ~ /PHYS32_ENTRY/ || $0 ~ /\(0x00000012\)/) { want = 1; next }
		want && /description data:/ { sub(/.*description data: */, ""); print; exit }')"
	[ -n "$pvh" ] || die "$bz: the vmlinux has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
	# The note holds the le32 (or le64) physical entry address.
	local entry b
	entry=""
	for b in $pvh; do entry="$b$entry"; done
	entry="$(printf '0x%x' "$((16#$entry))")"
	mv "$out.tmp" "$out"
	log "vmlinux: ELF with PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) at $entry"
}

# select_modules MODDIR OUTDIR LIST NAMES...: copy the named modules and their dependencies
# (from MODDIR/modules.dep) into OUTDIR (same relative paths) and write OUTDIR/LIST in load
# order, dependencies first. Built-in modules (MODDIR/modules.builtin) are skipped and reported.
select_modules() {
	local moddir="$1" outdir="$2" list="$3"
	shift 3
	local -A path_of=() deps_of=() builtin=() state=()
	local line p d n order=() skipped=()
	_modname() {
		local b="${1##*/}"
		b="${b%%.ko*}"
		echo "${b//-/_}"
	}
	while IFS= read -r line; do
		p="${line%%:*}"
		n="${p##*/}"
		n="${n%%.ko*}"
		n="${n//-/_}"
		path_of[$n]="$p"
		deps_of[$p]="${line#*:}"
	done <"$moddir/modules.dep"
	while IFS= read -r p; do
		n="${p##*/}"
		n="${n%%.ko*}"
		builtin[${n//-/_}]=1
	done <"$moddir/modules.builtin"

	# Depth-first, dependencies before dependents. modules.dep lists each module's full
	# (transitive) dependency set, so recursing on each entry's own line orders them.
	_visit() {
		local p="$1" d
		case "${state[$p]:-}" in
		done) return 0 ;;
		active) die "module dependency cycle at $p" ;;
		esac
		state[$p]=active
		for d in ${deps_of[$p]}; do _visit "$d"; done
		state[$p]=done
		order+=("$p")
	}
	for n in "$@"; do
		n="${n//-/_}"
		if [ -n "${builtin[$n]:-}" ]; then
			skipped+=("$n")
		elif [ -n "${path_of[$n]:-}" ]; then
			_visit "${path_of[$n]}"
		else
			die "module $n is neither in modules.dep nor in modules.builtin"
		fi
	done
	if [ "${#skipped[@]}" -eq 0 ]; then
		log "modules: none of the requested modules is built into the kernel"
	else
		log "modules: built into the kernel (skipped): ${skipped[*]}"
	fi

	mkdir -p "$outdir"
	: >"$outdir/$list"
	for p in "${order[@]}"; do
		local dst="$p"
		case "$p" in
		*.ko) install -D -m 0644 "$moddir/$p" "$outdir/$p" ;;
		*.ko.xz | *.ko.zst | *.ko.gz)
			dst="${p%.*}"
			mkdir -p "$(dirname "$outdir/$dst")"
			case "$p" in
			*.xz) xz -dc "$moddir/$p" ;;
			*.zst) zstd -dcq "$moddir/$p" ;;
			*.gz) gzip -dc "$moddir/$p" ;;
			esac >"$outdir/$dst"
			chmod 0644 "$outdir/$dst"
			;;
		*) die "unexpected module file $p" ;;
		esac
		echo "$dst" >>"$outdir/$list"
	done
	local soft
	soft="$(for p in "${order[@]}"; do
		n="$(_modname "$p")"
		sed -n "s/^softdep $n //p" "$moddir/modules.softdep" 2>/dev/null | sed "s/^/$n: /"
	done)"
	[ -z "$soft" ] || log "modules: soft dependencies not followed (check they are built in): $(echo "$soft" | paste -sd';')"
	log "modules ($list): ${#order[@]} selected, load order: $(for p in "${order[@]}"; do _modname "$p"; done | paste -sd' ')"
}

# build_kernel OUT_DIR: download, extract and lay out the kernel and modules (cached).
build_kernel() {
	local out="$1" resolved pkg ver stamp_want
	resolved="$(resolve_kernel_pkg "$GUEST_KERNEL_PKG")" || {
		apt_update_once
		resolved="$(resolve_kernel_pkg "$GUEST_KERNEL_PKG")" ||
			die "cannot resolve $GUEST_KERNEL_PKG to a kernel image package (apt-cache show)"
	}
	read -r pkg ver <<<"$resolved"
	stamp_want="format=$GUEST_BUILD_FORMAT meta=$GUEST_KERNEL_PKG package=$pkg version=$ver modules=${GUEST_MODULES[*]} on-demand=${GUEST_MODULES_ON_DEMAND[*]}"
	if [ -f "$out/kernel.stamp" ] && [ "$(cat "$out/kernel.stamp")" = "$stamp_want" ] &&
		[ -s "$out/vmlinuz" ] && [ -s "$out/vmlinux" ] && [ -s "$out/kernel.release" ] &&
		[ -f "$out/modules/$(cat "$out/kernel.release")/modules.order" ]; then
		log "kernel: up to date ($pkg $ver, release $(cat "$out/kernel.release"))"
		return 0
	fi
	log "kernel: $GUEST_KERNEL_PKG -> $pkg $ver"

	local tmp deb root rel
	tmp="$(mktemp -d "${TMPDIR:-/tmp}/janus-guest.XXXXXX")"
	# shellcheck disable=SC2064
	trap "rm -rf '$tmp'" EXIT
	# apt-get download drops privileges to _apt: let it write here (else it warns).
	chmod 0755 "$tmp"
	id _apt >/dev/null 2>&1 && chown _apt "$tmp"
	if ! (cd "$tmp" && apt-get download -q "$pkg=$ver" >&2); then
		# Stale package lists (a superseded security update): refresh and resolve again.
		apt_update_once
		read -r pkg ver <<<"$(resolve_kernel_pkg "$GUEST_KERNEL_PKG")"
		stamp_want="format=$GUEST_BUILD_FORMAT meta=$GUEST_KERNEL_PKG package=$pkg version=$ver modules=${GUEST_MODULES[*]} on-demand=${GUEST_MODULES_ON_DEMAND[*]}"
		(cd "$tmp" && apt-get download -q "$pkg=$ver" >&2) || die "apt-get download $pkg=$ver failed"
	fi
	deb="$(ls "$tmp"/*.deb)"
	log "kernel: downloaded $(basename "$deb") ($(_human_size "$deb"))"
	root="$tmp/root"
	dpkg-deb -x "$deb" "$root"
	rel="$(cd "$root/lib/modules" && ls)"
	[ "$(echo "$rel" | wc -l)" -eq 1 ] || die "expected one release in $pkg, found: $rel"
	[ "$pkg" = "linux-image-$rel" ] || log "kernel: note: package $pkg holds release $rel"
	[ -f "$root/boot/vmlinuz-$rel" ] || die "$pkg has no /boot/vmlinuz-$rel"

	# The package ships no modules.dep (its postinst runs depmod): generate it.
	depmod -b "$root" -F "$root/boot/System.map-$rel" "$rel" ||
		die "depmod on the extracted $pkg failed"

	mkdir -p "$out"
	rm -f "$out/kernel.stamp"
	install -m 0644 "$root/boot/vmlinuz-$rel" "$out/vmlinuz"
	log "vmlinuz: $out/vmlinuz ($(_human_size "$out/vmlinuz"))"
	extract_vmlinux "$out/vmlinuz" "$out/vmlinux"
	chmod 0644 "$out/vmlinux"
	log "vmlinux: $out/vmlinux ($(_human_size "$out/vmlinux"))"
	rm -rf "$out/modules"
	select_modules "$root/lib/modules/$rel" "$out/modules/$rel" modules.order "${GUEST_MODULES[@]}"
	select_modules "$root/lib/modules/$rel" "$out/modules/$rel" modules.ondemand \
		"${GUEST_MODULES_ON_DEMAND[@]}"
	echo "$rel" >"$out/kernel.release"
	echo "$stamp_want" >"$out/kernel.stamp"
	rm -rf "$tmp"
	trap - EXIT
	log "kernel: release $rel ready in $out"
}

# build_testinit OUT_DIR: compile hack/guest/testinit.c when it is newer than the binary.
build_testinit() {
	local out="$1" src="$HACK_DIR/guest/testinit.c"
	if [ -x "$out/testinit" ] && [ "$out/testinit" -nt "$src" ]; then
		log "testinit: up to date"
		return 0
	fi
	mkdir -p "$out"
	gcc -static -O2 -s -Wall -o "$out/testinit.tmp" "$src" || die "compiling $src failed"
	mv "$out/testinit.tmp" "$out/testinit"
	log "testinit: built $out/testinit ($(_human_size "$out/testinit"))"
}

# build_initramfs INIT_BINARY OUT_CPIO [modprobe]: pack an uncompressed newc initramfs holding
#   /init                          INIT_BINARY (static)
#   /lib/modules/<release>/...     the selected modules (from $GUEST_OUT_DIR): modules.order
#                                  (loaded at boot), modules.dep + modules.alias (depmod; the
#                                  on-demand ones are loaded through /sbin/modprobe)
#   /sbin/modprobe                 -> /init, with "modprobe" (the agent answers the kernel's
#                                  module requests)
#   /proc /sys /dev /run /tmp /mnt /etc   empty directories
#   /dev/console /dev/null         device nodes (made with mknod: needs root)
# Reproducible: entries sorted, mtime $SOURCE_DATE_EPOCH, owner 0:0, renumbered inodes.
# Skipped when OUT_CPIO.stamp says the same init, modules and builder made it.
build_initramfs() {
	local init="$1" cpio="$2" modprobe="${3:-}" out="${GUEST_OUT_DIR:?GUEST_OUT_DIR not set}" rel stamp_want stage
	[ -x "$init" ] || die "init binary $init is missing or not executable"
	if file -b "$init" 2>/dev/null | grep -q 'dynamically linked'; then
		die "init binary $init is dynamically linked; the initramfs has no libc: link it statically"
	fi
	rel="$(cat "$out/kernel.release")"
	stamp_want="init=$(_file_sha "$init") modprobe=$modprobe kernel=$(cat "$out/kernel.stamp") builder=$(_file_sha "${BASH_SOURCE[0]}") epoch=$SOURCE_DATE_EPOCH"
	if [ -s "$cpio" ] && [ -f "$cpio.stamp" ] && [ "$(cat "$cpio.stamp")" = "$stamp_want" ]; then
		log "initramfs: $cpio up to date"
		return 0
	fi
	[ "$(id -u)" -eq 0 ] || die "build_initramfs needs root (mknod /dev/console, /dev/null)"

	stage="$(mktemp -d "${TMPDIR:-/tmp}/janus-initramfs.XXXXXX")"
	mkdir -p "$stage"/{proc,sys,dev,run,tmp,mnt,etc,lib/modules}
	install -m 0755 "$init" "$stage/init"
	cp -R "$out/modules/$rel" "$stage/lib/modules/$rel"
	# The index the agent's modprobe reads (text only: modules.dep, modules.alias).
	depmod -b "$stage" "$rel" 2>/dev/null || die "depmod on the initramfs modules failed"
	find "$stage/lib/modules/$rel" -maxdepth 1 -type f -name 'modules.*' \
		! -name modules.dep ! -name modules.alias ! -name modules.order -delete
	# The kernel's module helper (kernel.modprobe) is the agent, run as modprobe. Only an init
	# that answers to that name gets the link (the test init would boot a second time).
	mkdir -p "$stage/sbin"
	[ "$modprobe" != modprobe ] || ln -s ../init "$stage/sbin/modprobe"
	find "$stage/lib" -type d -exec chmod 0755 {} +
	find "$stage/lib" -type f -exec chmod 0644 {} +
	chmod 0755 "$stage"/{proc,sys,dev,run,mnt,etc,lib,sbin}
	chmod 1777 "$stage/tmp"
	mknod -m 0600 "$stage/dev/console" c 5 1
	mknod -m 0666 "$stage/dev/null" c 1 3
	find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
	rm -f "$cpio.stamp"
	(cd "$stage" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
		cpio --null -o -H newc -R 0:0 --reproducible --quiet) >"$cpio.tmp" ||
		{ rm -rf "$stage"; die "cpio failed"; }
	rm -rf "$stage"
	mv "$cpio.tmp" "$cpio"
	echo "$stamp_want" >"$cpio.stamp"
	log "initramfs: built $cpio ($(_human_size "$cpio"), init=$init, $(wc -l <"$out/modules/$rel/modules.order") modules)"
}

# build_agent: the vm-agent, statically linked (the initramfs has no libc). Only the gnu
# target exists here, so crt-static on it; libseccomp comes from Debian's static archive.
# Prints the binary's path.
build_agent() {
	ensure_apt libseccomp-dev
	ensure_rust
	local triple=x86_64-unknown-linux-gnu
	(cd "$REPO_ROOT" &&
		LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
			RUSTFLAGS="-C target-feature=+crt-static" \
			cargo build --release -p vm-agent --target "$triple" >&2) ||
		die "building the static vm-agent failed"
	echo "${CARGO_TARGET_DIR:-$REPO_ROOT/target}/$triple/release/vm-agent"
}

main() {
	local out="${1:-$REPO_ROOT/target/guest}"
	mkdir -p "$out"
	out="$(cd "$out" && pwd)"
	GUEST_OUT_DIR="$out"
	ensure_apt apt coreutils dpkg kmod lz4 cpio binutils file gcc libc6-dev qemu-system-x86
	build_kernel "$out"
	build_testinit "$out"
	build_initramfs "$out/testinit" "$out/initramfs-testinit.cpio"
	if [ -n "${JANUS_GUEST_INIT:-}" ]; then
		build_initramfs "$(realpath "$JANUS_GUEST_INIT")" "$out/initramfs.cpio" modprobe
	else
		build_initramfs "$(build_agent)" "$out/initramfs.cpio" modprobe
	fi
	log "done: $out ($(cat "$out/kernel.release")): vmlinux vmlinuz initramfs.cpio modules/"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	main "$@"
fi
