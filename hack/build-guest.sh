#!/usr/bin/env bash
# Build the Janus VM guest: a kernel and an initramfs with the vm-agent as /init. Debian
# packages only (apt; nothing from other sources).
#
#   hack/build-guest.sh [OUT_DIR]            (default OUT_DIR: target/guest)
#
# Two kernels (JANUS_GUEST_KERNEL):
#   janus (default)  our own: Debian's kernel source (linux-source-6.1) built with
#                    hack/guest/kernel.config on top of allnoconfig; everything the agent and
#                    pods need is built in, no modules. Built once into a cache outside the
#                    clone, $JANUS_GUEST_KERNEL_CACHE/<key>/ (default
#                    /var/cache/janus/guest-kernel), keyed by the config fragment, our
#                    patches (hack/guest/patches/*.patch), the source package version, the gcc
#                    version and GUEST_KERNEL_FORMAT.
#   debian           Debian's cloud kernel package with its modules (boot set + on-demand set).
#
# Environment:
#   JANUS_GUEST_KERNEL=janus|debian          which kernel (above)
#   JANUS_GUEST_INIT=/path/to/static/binary  /init of initramfs.cpio; unset: the vm-agent, built
#                                            statically here (cargo). initramfs-testinit.cpio
#                                            always holds the test init (hack/guest/testinit.c)
#   JANUS_GUEST_KERNEL_PKG=linux-image-cloud-amd64
#                                            debian: the kernel metapackage to resolve
#   JANUS_GUEST_KERNEL_SRC_PKG=linux-source-6.1
#                                            janus: the kernel source package
#   JANUS_GUEST_KERNEL_CACHE=/var/cache/janus/guest-kernel
#   JANUS_KERNEL_JOBS=$(nproc)               janus: make -j (run under nice 10)
#   SOURCE_DATE_EPOCH=0                      mtime of every initramfs entry, kernel build date
#
# Outputs in OUT_DIR:
#   vmlinux                  the uncompressed kernel ELF (boots through its PVH entry)
#   vmlinuz                  the bzImage (janus: from the build; debian: from the package)
#   kernel.release           e.g. 6.1.192-janus or 6.1.0-56-cloud-amd64
#   kernel.config            janus: the full .config
#   modules/<release>/       debian only: the selected .ko files (package layout kernel/...)
#                            + modules.order (load order, dependencies first; paths relative to
#                            that directory) + modules.ondemand
#   testinit                 static test init (hack/guest/testinit.c)
#   initramfs-testinit.cpio  initramfs with the test init
#   initramfs.cpio           initramfs with $JANUS_GUEST_INIT (or the vm-agent)
#   kernel.stamp, *.cpio.stamp  cache keys
#
# Cached: janus: the kernel cache above (a warm run neither extracts nor builds anything);
# debian: the kernel step is skipped while kernel.stamp matches the resolved package version and
# module list. An initramfs is rebuilt only when its init binary, the kernel or this script
# changed. Reproducible: fixed mtimes, uid/gid 0, sorted names, renumbered inodes.
#
# The script can also be sourced (for build_initramfs) without running anything.
set -euo pipefail
# shellcheck source=hack/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

# Bump when the layout of the outputs changes, to invalidate caches.
GUEST_BUILD_FORMAT=2
GUEST_KERNEL="${JANUS_GUEST_KERNEL:-janus}"
GUEST_KERNEL_PKG="${JANUS_GUEST_KERNEL_PKG:-linux-image-cloud-amd64}"
GUEST_KERNEL_SRC_PKG="${JANUS_GUEST_KERNEL_SRC_PKG:-linux-source-6.1}"
GUEST_KERNEL_CONFIG="$HACK_DIR/guest/kernel.config"
# More fragments on top (space-separated paths; part of the cache key), e.g.
# hack/guest/kernel-initcall-debug.config for boot-time measurements.
GUEST_KERNEL_CONFIG_EXTRA="${JANUS_GUEST_KERNEL_CONFIG_EXTRA:-}"
# Our patches to the source, applied in name order (each file says why; docs/guest.md lists
# them). Part of the cache key.
GUEST_KERNEL_PATCHES="$HACK_DIR/guest/patches"
GUEST_KERNEL_CACHE="${JANUS_GUEST_KERNEL_CACHE:-/var/cache/janus/guest-kernel}"
# Part of the kernel cache key: bump when the way the kernel is built changes (make targets,
# outputs, build variables) while the config fragment does not.
GUEST_KERNEL_FORMAT=1
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
	check_pvh_vmlinux "$out.tmp"
	mv "$out.tmp" "$out"
}

# check_pvh_vmlinux ELF: fail unless ELF is a kernel image with a PVH entry point, which is how
# both QEMU (-kernel vmlinux) and janus-vmm boot it.
check_pvh_vmlinux() {
	local elf="$1" pvh entry b
	[ "$(head -c 4 "$elf" | od -An -tx1 | tr -d ' ')" = "7f454c46" ] ||
		die "$elf is not an ELF file"
	# XEN_ELFNOTE_PHYS32_ENTRY (type 18 = 0x12) in a "Xen" note: the PVH entry point.
	# binutils 2.40 prints it as "Unknown note type: (0x00000012)", newer ones by name.
	pvh="$(readelf -n "$elf" | awk '
		/^ *Xen / && ($0 ~ /PHYS32_ENTRY/ || $0 ~ /\(0x00000012\)/) { want = 1; next }
		want && /description data:/ { sub(/.*description data: */, ""); print; exit }')"
	[ -n "$pvh" ] || die "$elf has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): CONFIG_PVH?"
	# The note holds the le32 (or le64) physical entry address.
	entry=""
	for b in $pvh; do entry="$b$entry"; done
	entry="$(printf '0x%x' "$((16#$entry))")"
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

# build_debian_kernel OUT_DIR: download, extract and lay out Debian's kernel and modules (cached).
build_debian_kernel() {
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
	rm -f "$out/kernel.stamp" "$out/kernel.config"
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

# --- Our own kernel (the default): Debian's kernel source, our config, everything built in ----

# janus_kernel_inputs: print "<tarball> <source package version> <gcc version line>", installing
# the source package and the build dependencies first.
janus_kernel_inputs() {
	ensure_apt "$GUEST_KERNEL_SRC_PKG" make gcc libc6-dev bc bison flex libelf-dev libssl-dev \
		xz-utils cpio kmod binutils patch
	local ver tarball
	ver="$(dpkg-query -W -f='${Version}' "$GUEST_KERNEL_SRC_PKG")"
	tarball="$(dpkg -L "$GUEST_KERNEL_SRC_PKG" | grep -m1 '^/usr/src/linux-source-.*\.tar\.xz$')" ||
		die "$GUEST_KERNEL_SRC_PKG has no /usr/src/linux-source-*.tar.xz"
	echo "$tarball $ver $(gcc --version | head -n1 | tr ' ' '_')"
}

# janus_kernel_fragment: the config fragment in effect (ours, then any extra ones).
janus_kernel_fragment() {
	local f
	cat "$GUEST_KERNEL_CONFIG"
	for f in $GUEST_KERNEL_CONFIG_EXTRA; do
		[ -f "$f" ] || die "JANUS_GUEST_KERNEL_CONFIG_EXTRA: no file $f"
		cat "$f"
	done
}

# janus_kernel_patch_files: our patches, in the order they are applied.
janus_kernel_patch_files() {
	[ -d "$GUEST_KERNEL_PATCHES" ] || return 0
	find "$GUEST_KERNEL_PATCHES" -maxdepth 1 -name '*.patch' | LC_ALL=C sort
}

# janus_kernel_patch SRC: apply our patches to the source tree SRC; a patch that does not
# apply cleanly (a new source package version moved the code) stops the build.
janus_kernel_patch() {
	local src="$1" p
	for p in $(janus_kernel_patch_files); do
		patch -d "$src" -p1 --batch --forward --quiet <"$p" >&2 ||
			die "kernel patch $(basename "$p") does not apply to $GUEST_KERNEL_SRC_PKG"
		log "kernel: applied $(basename "$p")"
	done
}

# janus_kernel_configure SRC: allnoconfig + the fragment + olddefconfig in SRC, then fail naming
# every option of the fragment that Kconfig dropped or changed (a missing dependency, a renamed
# symbol): silently losing one would give a guest that boots but lacks a feature.
janus_kernel_configure() {
	local src="$1" line sym lost=()
	janus_kernel_fragment >"$src/janus.fragment"
	(cd "$src" && make -s allnoconfig >&2 &&
		scripts/kconfig/merge_config.sh -m .config janus.fragment >/dev/null &&
		make -s olddefconfig >&2) || die "configuring the kernel in $src failed"
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*) sym="${line%%=*}" ;;
		"# CONFIG_"*" is not set") sym="${line#\# }" && sym="${sym%% *}" ;;
		*) continue ;;
		esac
		# "is not set" also holds for a symbol whose dependencies hide it altogether.
		grep -qxF -- "$line" "$src/.config" ||
			{ [[ "$line" = "# "* ]] && ! grep -qE "^$sym=" "$src/.config"; } ||
			lost+=("$line (now: $(grep -m1 -E "^$sym=|^# $sym is not set" "$src/.config" || echo absent))")
	done <"$src/janus.fragment"
	[ "${#lost[@]}" -eq 0 ] || die "kernel options of $GUEST_KERNEL_CONFIG${GUEST_KERNEL_CONFIG_EXTRA:+ $GUEST_KERNEL_CONFIG_EXTRA} that did not survive olddefconfig: $(printf '\n  %s' "${lost[@]}")"
	log "kernel: config: every option of $(basename "$GUEST_KERNEL_CONFIG")${GUEST_KERNEL_CONFIG_EXTRA:+ $GUEST_KERNEL_CONFIG_EXTRA} survived olddefconfig"
}

# janus_kernel_compile TARBALL DEST: extract, configure, build vmlinux + bzImage, and put
# vmlinux, bzImage, config and kernel.release into DEST (created).
janus_kernel_compile() {
	local tarball="$1" dest="$2" work src jobs t0
	work="$(mktemp -d "$GUEST_KERNEL_CACHE/build.XXXXXX")"
	# shellcheck disable=SC2064
	trap "rm -rf '$work'" EXIT
	t0=$SECONDS
	log "kernel: extracting $tarball"
	tar -C "$work" -xf "$tarball" || die "extracting $tarball failed"
	src="$(echo "$work"/linux-source-*)"
	[ -f "$src/Makefile" ] || die "$tarball holds no linux-source-*/Makefile"
	janus_kernel_patch "$src"
	janus_kernel_configure "$src"
	jobs="${JANUS_KERNEL_JOBS:-$(nproc)}"
	log "kernel: make -j$jobs vmlinux bzImage (nice 10; minutes)"
	# KBUILD_BUILD_*: a kernel that does not depend on who built it when.
	(cd "$src" && nice -n 10 make -j"$jobs" KBUILD_BUILD_USER=janus KBUILD_BUILD_HOST=janus \
		KBUILD_BUILD_TIMESTAMP="@$SOURCE_DATE_EPOCH" vmlinux bzImage >"$work/make.log" 2>&1) ||
		{ tail -n 40 "$work/make.log" >&2; die "kernel build failed (log above)"; }
	check_pvh_vmlinux "$src/vmlinux"
	mkdir -p "$dest"
	install -m 0644 "$src/vmlinux" "$dest/vmlinux"
	install -m 0644 "$src/arch/x86/boot/bzImage" "$dest/bzImage"
	install -m 0644 "$src/.config" "$dest/config"
	(cd "$src" && make -s kernelrelease) >"$dest/kernel.release"
	rm -rf "$work"
	trap - EXIT
	log "kernel: built $(cat "$dest/kernel.release") in $((SECONDS - t0)) s"
}

# build_janus_kernel OUT_DIR: our kernel from the cache, built there first when missing. The
# cache (outside the clone, shared by every checkout) is keyed by what decides the result: the
# config fragment, our patches, the source package version, the compiler and GUEST_KERNEL_FORMAT.
build_janus_kernel() {
	local out="$1" inputs tarball ver cc cfg_sha patch_sha key dir f lock
	# Not inside the here-string: a failure there would go unnoticed.
	inputs="$(janus_kernel_inputs)"
	read -r tarball ver cc <<<"$inputs"
	cfg_sha="$(janus_kernel_fragment | sha256sum | cut -d' ' -f1)"
	patch_sha="$(janus_kernel_patch_files | while read -r f; do cat "$f"; done | sha256sum | cut -d' ' -f1)"
	key="$(printf 'format=%s\nconfig=%s\npatches=%s\nsource=%s %s\ngcc=%s\n' \
		"$GUEST_KERNEL_FORMAT" "$cfg_sha" "$patch_sha" "$GUEST_KERNEL_SRC_PKG" "$ver" "$cc" |
		sha256sum | cut -c1-16)"
	dir="$GUEST_KERNEL_CACHE/$key"
	mkdir -p "$GUEST_KERNEL_CACHE"
	# One build per key at a time; a second run waits and then finds it cached.
	exec {lock}>"$GUEST_KERNEL_CACHE/$key.lock"
	flock "$lock"
	if [ -s "$dir/vmlinux" ] && [ -s "$dir/bzImage" ] && [ -s "$dir/kernel.release" ]; then
		log "kernel: cached $dir ($GUEST_KERNEL_SRC_PKG $ver, $(cat "$dir/kernel.release"))"
	else
		log "kernel: not cached ($dir): building from $GUEST_KERNEL_SRC_PKG $ver with $cc"
		rm -rf "$dir.tmp"
		janus_kernel_compile "$tarball" "$dir.tmp"
		printf 'format=%s\nconfig_sha256=%s\npatches_sha256=%s (%s)\nsource=%s %s\ngcc=%s\n' \
			"$GUEST_KERNEL_FORMAT" "$cfg_sha" "$patch_sha" \
			"$(janus_kernel_patch_files | xargs -r -n1 basename | tr '\n' ' ')" \
			"$GUEST_KERNEL_SRC_PKG" "$ver" "$cc" >"$dir.tmp/key"
		mv "$dir.tmp" "$dir"
	fi
	exec {lock}>&-
	mkdir -p "$out"
	rm -rf "$out/modules" "$out/kernel.stamp"
	# Hard links when the cache is on the same file system (no copy of 30 MB), else copies.
	for f in vmlinux:vmlinux bzImage:vmlinuz config:kernel.config kernel.release:kernel.release; do
		ln -f "$dir/${f%%:*}" "$out/${f#*:}" 2>/dev/null || cp -f "$dir/${f%%:*}" "$out/${f#*:}"
	done
	echo "format=$GUEST_BUILD_FORMAT kernel=janus cache=$dir" >"$out/kernel.stamp"
	log "kernel: $(cat "$out/kernel.release") in $out (vmlinux $(_human_size "$out/vmlinux"), no modules)"
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
#   /lib/modules/<release>/...     debian kernel only: the selected modules (from $GUEST_OUT_DIR): modules.order
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
	mkdir -p "$stage"/{proc,sys,dev,run,tmp,mnt,etc,lib,sbin}
	install -m 0755 "$init" "$stage/init"
	# Our kernel has everything built in (CONFIG_MODULES off): no modules, and no module
	# helper, since the kernel never runs one. The agent reads a missing modules.order as
	# "nothing to load".
	if [ -d "$out/modules/$rel" ]; then
		mkdir -p "$stage/lib/modules"
		cp -R "$out/modules/$rel" "$stage/lib/modules/$rel"
		# The index the agent's modprobe reads (text only: modules.dep, modules.alias).
		depmod -b "$stage" "$rel" 2>/dev/null || die "depmod on the initramfs modules failed"
		find "$stage/lib/modules/$rel" -maxdepth 1 -type f -name 'modules.*' \
			! -name modules.dep ! -name modules.alias ! -name modules.order -delete
		# The kernel's module helper (kernel.modprobe) is the agent, run as modprobe. Only an
		# init that answers to that name gets the link (the test init would boot a second time).
		[ "$modprobe" != modprobe ] || ln -s ../init "$stage/sbin/modprobe"
	fi
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
	log "initramfs: built $cpio ($(_human_size "$cpio"), init=$init, $( (wc -l <"$out/modules/$rel/modules.order") 2>/dev/null || echo 0) modules at boot)"
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
	case "$GUEST_KERNEL" in
	janus) build_janus_kernel "$out" ;;
	debian) build_debian_kernel "$out" ;;
	*) die "JANUS_GUEST_KERNEL=$GUEST_KERNEL: expected janus (our own kernel) or debian" ;;
	esac
	build_testinit "$out"
	build_initramfs "$out/testinit" "$out/initramfs-testinit.cpio"
	if [ -n "${JANUS_GUEST_INIT:-}" ]; then
		build_initramfs "$(realpath "$JANUS_GUEST_INIT")" "$out/initramfs.cpio" modprobe
	else
		build_initramfs "$(build_agent)" "$out/initramfs.cpio" modprobe
	fi
	log "done: $out ($GUEST_KERNEL kernel $(cat "$out/kernel.release")): vmlinux vmlinuz initramfs.cpio"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	main "$@"
fi
