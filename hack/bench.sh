#!/bin/bash
# Janus vs the containerd runc shim, in one run, on one private containerd.
#
#   hack/bench.sh [-n N] [--no-vm] [--no-vmm] [--no-prev-kernel] [--vm-boots B] [--vm-mib M]
#                 [--stdio-mib S]
#       N = samples per runtime (default 20); B = VM boots per kind (default 5);
#       M = MiB streamed out of a guest process (default 1024); S = MiB through ctr (256)
#
# Measures, alternating the two runtimes so drift hits both alike:
#   1. `ctr run --rm IMAGE ID /bin/true` wall time (median) and the ratio Janus/runc
#   2. shim CPU time per container lifecycle: containerd's reaped-children CPU
#      (cutime+cstime: shim start, server, delete, and for runc the runc binary) per run
#   3. shim PSS with one running container (Janus: shim + zygote; runc: shim)
#   4. 20 containers started one after another (`ctr run -d`), total wall time
#   5. VM mode, for our guest kernel and then Debian's (the previous one; --no-prev-kernel
#      skips it), in one table with the ratio: a bare boot's (test init) guest uptime at /init
#      and QEMU spawn -> /init, QEMU spawn -> agent ready (runtime/examples/vm_bench.rs, alternating, medians);
#      stdio throughput of M MiB out of a guest process (MB/s); then through containerd:
#      VM-mode `ctr run --rm /bin/true`, PSS of one idle VM pod (shim + QEMU + virtiofsd) and
#      per pod with two, stdio of S MiB via ctr (and in namespace mode)
#   6. our KVM VMM (janus-vmm, test guests built here with gcc): process start to the guest's
#      first instruction (a guest that powers off at once: wall and CPU ms, medians of N),
#      RSS beyond guest memory (guest RAM in a memfd, measured while an idle guest runs; bar:
#      Firecracker's 5 MiB), MMIO exits per second (a guest reading a virtio-mmio register)
# Targets (printed beside each figure, not asserted): latency <= 0.6x runc, shim CPU <= 5 ms,
# shim PSS <= 2.5 MiB; VM mode (TCG): /init <= 0.5 s, agent <= 0.7 s, ctr run <= 1.0 s,
# pod PSS <= 96 MiB, guest stdio >= 100 MB/s.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
need_root

N=20
VM=1
VMM=1
VM_BOOTS=5
PREV_KERNEL=1
VM_MIB=1024
STDIO_MIB=256
while [ $# -gt 0 ]; do
	case "$1" in
	-n) N="$2"; shift 2 ;;
	--no-vm) VM=0; shift ;;
	--no-vmm) VMM=0; shift ;;
	--no-prev-kernel) PREV_KERNEL=0; shift ;;
	--vm-boots) VM_BOOTS="$2"; shift 2 ;;
	--vm-mib) VM_MIB="$2"; shift 2 ;;
	--stdio-mib) STDIO_MIB="$2"; shift 2 ;;
	*) die "unknown argument $1 (see the header of $0)" ;;
	esac
done

ensure_base_deps
ensure_rust
# The build hack/test.sh and hack/demo.sh make (lib.sh): nothing is rebuilt when it is current.
release_build >&2
TARGET="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
SHIM="$TARGET/release/containerd-shim-janus-v2"
TAR="$(janus_image_tar)"
"$HERE/build-image.sh" "$TAR" >&2

DIR="$(mktemp -d /tmp/janus-bench.XXXXXX)"
NS="bench-$$"
cleanup() {
	local id
	for id in $(ctr --address "$DIR/containerd.sock" -n "$NS" tasks ls -q 2>/dev/null); do
		ctr --address "$DIR/containerd.sock" -n "$NS" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
	done
	sleep 0.5
	for id in $(ctr --address "$DIR/containerd.sock" -n "$NS" containers ls -q 2>/dev/null); do
		ctr --address "$DIR/containerd.sock" -n "$NS" tasks rm -f "$id" >/dev/null 2>&1 || true
		ctr --address "$DIR/containerd.sock" -n "$NS" containers rm "$id" >/dev/null 2>&1 || true
	done
	containerd_stop "$DIR" || true
	grep -F "$DIR/" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
	rm -rf "$DIR" "/run/containerd/runc/$NS"
}
trap cleanup EXIT
containerd_start "$DIR" "$SHIM"
IMG="$JANUS_TEST_IMAGE"
c() { timeout 60 ctr --address "$DIR/containerd.sock" -n "$NS" "$@"; }
c images import --base-name "${IMG%:*}" "$TAR" >/dev/null
CPID="$(cat "$DIR/containerd.pid")"
HZ="$(getconf CLK_TCK)"

now_ns() { date +%s%N; }
children_ticks() { awk '{print $16 + $17}' "/proc/$CPID/stat"; }
median() { sort -n | awk '{a[NR]=$1} END{if (NR==0) {print 0} else if (NR%2) {print a[(NR+1)/2]} else {print (a[NR/2]+a[NR/2+1])/2}}'; }
runtime_flag() { [ "$1" = janus ] && echo "--runtime io.containerd.janus.v2" || echo "--runtime io.containerd.runc.v2"; }

declare -A LAT CPU
for rt in janus runc; do LAT[$rt]=""; CPU[$rt]=0; done
# warm up both (page cache, first shim start)
for rt in janus runc; do c run --rm $(runtime_flag $rt) "$IMG" "warm-$rt" /bin/true; done

log "latency + CPU: $N runs each, alternating"
for i in $(seq 1 "$N"); do
	for rt in janus runc; do
		t0="$(children_ticks)"
		s="$(now_ns)"
		c run --rm $(runtime_flag $rt) "$IMG" "lat-$rt-$i" /bin/true
		e="$(now_ns)"
		sleep 0.05 # let containerd reap the shim so its CPU is counted
		t1="$(children_ticks)"
		LAT[$rt]+="$(( (e - s) / 1000 )) "
		CPU[$rt]=$(( ${CPU[$rt]} + t1 - t0 ))
	done
done
lat_j="$(echo ${LAT[janus]} | tr ' ' '\n' | median)"
lat_r="$(echo ${LAT[runc]} | tr ' ' '\n' | median)"
cpu_j="$(awk -v t="${CPU[janus]}" -v n="$N" -v hz="$HZ" 'BEGIN{printf "%.1f", t*1000/hz/n}')"
cpu_r="$(awk -v t="${CPU[runc]}" -v n="$N" -v hz="$HZ" 'BEGIN{printf "%.1f", t*1000/hz/n}')"

pss_of() { local s=0 p v; for p in "$@"; do v="$(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)"; s=$((s + v)); done; echo "$s"; }
threads_of() { local s=0 p; for p in "$@"; do s=$((s + $(ls "/proc/$p/task" | wc -l))); done; echo "$s"; }
log "PSS with one running container"
c run -d --runtime io.containerd.janus.v2 "$IMG" pss-janus sleep 1000 >/dev/null
c run -d --runtime io.containerd.runc.v2 "$IMG" pss-runc sleep 1000 >/dev/null
sleep 3 # idle state: blocking threads retired
JP=$(pgrep -f "containerd-shim-janus-v2 .*-id pss-janus" | tr '\n' ' ')
RP=$(pgrep -f "containerd-shim-runc-v2 .*-id pss-runc" | tr '\n' ' ')
pss_j="$(pss_of $JP)"; pss_r="$(pss_of $RP)"
thr_j="$(threads_of $JP)"; thr_r="$(threads_of $RP)"
for id in pss-janus pss-runc; do c task kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
sleep 0.3
for id in pss-janus pss-runc; do c task rm -f "$id" >/dev/null 2>&1 || true; c containers rm "$id" >/dev/null 2>&1 || true; done

log "20 containers started one after another"
seq20() {
	local rt="$1" s e i
	s="$(now_ns)"
	for i in $(seq 1 20); do c run -d $(runtime_flag "$rt") "$IMG" "s20-$rt-$i" sleep 1000 >/dev/null; done
	e="$(now_ns)"
	for i in $(seq 1 20); do c task kill -s SIGKILL "s20-$rt-$i" >/dev/null 2>&1 || true; done
	sleep 0.5
	for i in $(seq 1 20); do c task rm -f "s20-$rt-$i" >/dev/null 2>&1 || true; c containers rm "s20-$rt-$i" >/dev/null 2>&1 || true; done
	echo $(( (e - s) / 1000000 ))
}
s20_j="$(seq20 janus)"; s20_r="$(seq20 runc)"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "n/a"}'; }
echo
echo "== Janus vs runc shim (containerd $(containerd --version | awk '{print $3}'), N=$N) =="
nrow() { printf '%-44s %12s %12s %8s %14s\n' "$@"; }
nrow metric janus runc ratio target
nrow "ctr run --rm /bin/true, median (ms)" "$(awk -v v="$lat_j" 'BEGIN{printf "%.1f", v/1000}')" "$(awk -v v="$lat_r" 'BEGIN{printf "%.1f", v/1000}')" "$(ratio "$lat_j" "$lat_r")" "ratio <= 0.60"
nrow "shim CPU per lifecycle (ms)" "$cpu_j" "$cpu_r" "$(ratio "$cpu_j" "$cpu_r")" "<= 5"
nrow "shim PSS, one container (KiB)" "$pss_j" "$pss_r" "$(ratio "$pss_j" "$pss_r")" "<= 2560"
nrow "shim threads, one container" "$thr_j" "$thr_r" "$(ratio "$thr_j" "$thr_r")" ""
nrow "20 containers started sequentially (ms)" "$s20_j" "$s20_r" "$(ratio "$s20_j" "$s20_r")" ""

# vm_figures NAME GUEST_DIR: VM-mode figures of one guest kernel into VMF[NAME.key]: the bare
# boot and agent boot (vm_bench: QEMU directly), then through containerd with the kernel named
# by a config file (`ctr run --runtime-config-path`, as a RuntimeClass's ConfigPath would).
declare -A VMF
vm_figures() {
	local name="$1" gd="$2" cfg line kv i s e rt q vsock vp
	cfg="$DIR/vm-$name.toml"
	printf '[vm]\nkernel = "%s"\ninitrd = "%s"\n' "$(ls "$gd"/vmlinux 2>/dev/null || echo "$gd/vmlinuz")" \
		"$gd/initramfs.cpio" >"$cfg"
	log "VM mode, $name kernel: $VM_BOOTS boots of each kind and a ${VM_MIB} MiB stdio stream"
	line="$("$TARGET/release/examples/vm_bench" --boots "$VM_BOOTS" --mib "$VM_MIB" --guest-dir "$gd")"
	for kv in $line; do VMF[$name.${kv%%=*}]="${kv#*=}"; done
	log "VM mode, $name kernel, through containerd: $VM_BOOTS x ctr run --rm /bin/true, memory, stdio"
	rt="--runtime io.containerd.janus-vm.v2 --runtime-config-path $cfg"
	s=""
	for i in $(seq 1 "$VM_BOOTS"); do
		e="$(now_ns)"
		c run --rm $rt "$IMG" "vlat-$name-$i" /bin/true
		s+="$(( ($(now_ns) - e) / 1000000 )) "
	done
	VMF[$name.ctr_ms]="$(echo $s | tr ' ' '\n' | median)"
	# PSS of one idle pod, then per pod with two (QEMU's file-backed pages, its binary and the
	# kernel it keeps mapped, are shared between VMs). QEMU is named after the container and
	# names virtiofsd's socket; virtiofsd (which inherits the socket) names its share,
	# <work dir>.shared.
	vm_pod_pids() {
		local vsock
		vsock="$(pgrep -af "qemu-system.* -name $1 " | grep -o -- 'socket,id=vfs,path=[^ ]*' | head -n1 | cut -d= -f3)"
		echo "$(pgrep -f "containerd-shim-janus.*-id $1( |$)") $(pgrep -f -- "$vsock") $(pgrep -f -- "source=${vsock%.vfs.sock}.shared")"
	}
	c run -d $rt "$IMG" "pss-$name-1" sleep 1000 >/dev/null
	sleep 3 # idle: the guest's boot work and the shim's blocking threads are done
	VMF[$name.pss]="$(pss_of $(vm_pod_pids "pss-$name-1"))"
	VMF[$name.qemu_pss]="$(pss_of $(pgrep -f "qemu-system.* -name pss-$name-1 "))"
	c run -d $rt "$IMG" "pss-$name-2" sleep 1000 >/dev/null
	sleep 3
	VMF[$name.pss2]="$(( ($(pss_of $(vm_pod_pids "pss-$name-1")) + $(pss_of $(vm_pod_pids "pss-$name-2"))) / 2 ))"
	for i in 1 2; do c task kill -s SIGKILL "pss-$name-$i" >/dev/null 2>&1 || true; done
	sleep 1
	for i in 1 2; do
		c task rm -f "pss-$name-$i" >/dev/null 2>&1 || true
		c containers rm "pss-$name-$i" >/dev/null 2>&1 || true
	done
	VMF[$name.ctr_mbps]="$(tput_of "$rt" "tp-$name" "${VMF[$name.ctr_ms]}")"
}
tput_of() { # runtime-flags id start-ms -> MB/s of STDIO_MIB MiB through ctr's stdout, the
	# container's start (median `ctr run /bin/true`) taken out
	local s e
	s="$(now_ns)"
	c run --rm $1 "$IMG" "$2" dd if=/dev/zero bs=65536 count=$((STDIO_MIB * 16)) 2>/dev/null >/dev/null
	e="$(now_ns)"
	awk -v b="$((STDIO_MIB * 1048576))" -v ns="$((e - s))" -v st="$3" \
		'BEGIN{t = ns / 1e9 - st / 1000; if (t <= 0) t = ns / 1e9; printf "%.1f", b / 1e6 / t}'
}

if [ "$VM" = 1 ]; then
	echo
	KERNELS=(janus)
	"$HERE/build-guest.sh" "$TARGET/guest" >&2
	vm_figures janus "$TARGET/guest"
	if [ "$PREV_KERNEL" = 1 ]; then
		KERNELS+=(debian)
		JANUS_GUEST_KERNEL=debian "$HERE/build-guest.sh" "$TARGET/guest-debian" >&2
		vm_figures debian "$TARGET/guest-debian"
	fi
	tp_ns="$(tput_of "--runtime io.containerd.janus.v2" tp-ns "$(awk -v v="$lat_j" 'BEGIN{print v/1000}')")"
	echo
	echo "== VM mode (QEMU, ${VMF[janus.accel]}): our kernel$([ "$PREV_KERNEL" = 1 ] && echo " against Debian's, the previous one") =="
	vrow() { # label target key [scale]
		local k vals=() r="" d=""
		for k in "${KERNELS[@]}"; do vals+=("${VMF[$k.$3]}"); done
		[ "$PREV_KERNEL" = 1 ] && r="$(ratio "${VMF[janus.$3]}" "${VMF[debian.$3]}")" && d="${vals[1]}"
		printf '%-50s %9s %9s %9s %8s\n' "$1" "$2" "${vals[0]}" "$d" "$r"
	}
	printf '%-50s %9s %9s %9s %8s\n' metric target janus "$([ "$PREV_KERNEL" = 1 ] && echo debian)" "$([ "$PREV_KERNEL" = 1 ] && echo ratio)"
	vrow "bare boot: guest uptime at /init, median (ms)" "<= 500" guest_init_ms
	vrow "bare boot: QEMU spawn -> /init, median (ms)" "" bare_boot_ms
	vrow "agent ready: QEMU spawn -> Health, median (ms)" "<= 700" agent_boot_ms
	vrow "ctr run --rm /bin/true, VM mode, median (ms)" "<= 1000" ctr_ms
	vrow "PSS per VM pod: shim+QEMU+virtiofsd (KiB)" "<= 98304" pss
	vrow "  of which QEMU (KiB)" "" qemu_pss
	vrow "  per pod with two pods running (KiB)" "" pss2
	vrow "stdio out of a guest, ${VM_MIB} MiB (MB/s)" ">= 100" stdio_mbps
	vrow "stdio ${STDIO_MIB} MiB via ctr, VM mode (MB/s)" "" ctr_mbps
	printf '%-50s %9s %9s\n' "stdio ${STDIO_MIB} MiB via ctr, namespace mode (MB/s)" "" "$tp_ns"
	printf '%-50s %9s %9s\n' "VM ctr run / namespace ctr run" "" \
		"$(ratio "${VMF[janus.ctr_ms]}" "$(awk -v v="$lat_j" 'BEGIN{print v/1000}')")"
fi

if [ "$VMM" = 1 ] && [ -r /dev/kvm ]; then
	echo
	log "our VMM: janus-vmm with test guests, $N runs"
	ensure_apt build-essential
	VMMB="$REPO_ROOT/target/release/janus-vmm"
	G="$DIR/guests"
	mkdir -p "$G"
	for g in poweroff idle mmio_loop; do
		gcc -nostdlib -static -no-pie -Wl,-Ttext=0x200000 -Wl,--build-id=none \
			-o "$G/$g.elf" "$REPO_ROOT/vmm/tests/guests/$g.S"
	done
	truncate -s 1M "$G/disk.img"
	walls=() setups=()
	for i in $(seq 1 "$N"); do
		t0=$(now_ns)
		out="$("$VMMB" --kernel "$G/poweroff.elf" --serial-log /dev/null 2>&1)"
		walls+=("$(( ($(now_ns) - t0) / 1000 ))")
		setups+=("$(echo "$out" | sed -n 's/.*ready in \([0-9]*\) us.*/\1/p')")
	done
	wall_ms="$(printf '%s\n' "${walls[@]}" | median | awk '{printf "%.1f", $1/1000}')"
	setup_ms="$(printf '%s\n' "${setups[@]}" | median | awk '{printf "%.2f", $1/1000}')"
	# CPU: the reaped children's user+system ticks of a shell that ran the VMM N times.
	ticks="$(bash -c 'for i in $(seq 1 '"$N"'); do "$0" --kernel "$1" --serial-log /dev/null 2>/dev/null; done
		awk "{print \$16 + \$17}" /proc/$$/stat' "$VMMB" "$G/poweroff.elf")"
	cpu_ms="$(awk -v t="$ticks" -v n="$N" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.1f", t*1000/hz/n}')"
	"$VMMB" --kernel "$G/idle.elf" --serial-log "$G/idle.serial" --shared-memory --mem-mib 128 \
		2>/dev/null &
	vpid=$!
	for _ in $(seq 1 200); do [ -s "$G/idle.serial" ] && break; sleep 0.01; done
	rss_total="$(awk '/^VmRSS:/{print $2}' "/proc/$vpid/status")"
	rss_guest="$(awk '/memfd:janus-guest-ram/{m=1; next} /^[0-9a-f]+-[0-9a-f]+ /{m=0} m && /^Rss:/{s+=$2} END{print s+0}' "/proc/$vpid/smaps")"
	kill -9 "$vpid" 2>/dev/null; wait "$vpid" 2>/dev/null || true
	mmio="$("$VMMB" --kernel "$G/mmio_loop.elf" --disk "$G/disk.img" --serial-log "$G/mmio.serial" 2>&1 \
		| sed -n 's/.* MMIO (\([0-9]*\)\/s).*/\1/p')"
	[ -s "$G/mmio.serial" ] && mmio="failed (guest saw a wrong magic)"
	hw="$(grep -qwE 'vmx|svm' /proc/cpuinfo && echo "hardware KVM" || echo "software KVM (no vmx/svm)")"
	echo
	echo "== our VMM, janus-vmm ($hw) =="
	printf '%-52s %10s\n' metric value
	printf '%-52s %10s\n' "process start -> guest power-off, wall, median (ms)" "$wall_ms"
	printf '%-52s %10s\n' "  CPU (user+sys), mean (ms)" "$cpu_ms"
	printf '%-52s %10s\n' "  VMM setup before the first KVM_RUN, median (ms)" "$setup_ms"
	printf '%-52s %10s\n' "RSS, idle test guest (KiB)" "$rss_total"
	printf '%-52s %10s\n' "  of which guest memory touched (KiB)" "$rss_guest"
	printf '%-52s %10s\n' "  VMM beyond guest memory (KiB; bar 5120)" "$((rss_total - rss_guest))"
	printf '%-52s %10s\n' "MMIO exits per second (virtio-mmio register reads)" "$mmio"
fi
