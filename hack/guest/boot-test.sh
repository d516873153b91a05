#!/usr/bin/env bash
# Boot the guest built by hack/build-guest.sh under QEMU microvm (TCG) with the test init, check
# what the guest sees, and time it.
#
#   hack/guest/boot-test.sh [OUT_DIR]        (default OUT_DIR: target/guest)
#
# For each kernel (the PVH vmlinux and the bzImage vmlinuz) it runs BOOTS boots of
# initramfs-testinit.cpio with one virtio-serial port (name janus.agent) bound to a unix socket
# and measures, from QEMU's start: the "JANUS-TESTINIT: kernel=" line on the serial console and
# QEMU's exit (the test init powers off); QEMU's peak RSS (VmHWM, sampled from /proc/<pid>/status).
# Each boot must show: all modules loaded, the virtio console device (virtio id 3) on an
# ACPI-described virtio-mmio device (LNRO0005), the port janus.agent as /dev/vportNpM, and (when
# python3 is there to play the host side) the hello line the guest writes into the port.
#
# Environment:
#   BOOTS=5                      boots per kernel
#   JANUS_BOOT_KERNELS="vmlinux vmlinuz"
#   JANUS_BOOT_CPU=max           QEMU -cpu model (TCG: max or qemu64 boot; host needs KVM)
#   JANUS_BOOT_INITRD=...        another initramfs (default OUT_DIR/initramfs-testinit.cpio)
#   JANUS_BOOT_APPEND=...        extra kernel command line
#   JANUS_BOOT_TIMEOUT=120       seconds before a boot counts as hung and QEMU is killed
#   JANUS_BOOT_NO_BUILD=1        do not run hack/build-guest.sh first
# Console logs and a summary land in OUT_DIR/boot-test/.
set -euo pipefail
export LC_ALL=C
# shellcheck source=hack/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

OUT_DIR="${1:-$REPO_ROOT/target/guest}"
BOOTS="${BOOTS:-5}"
KERNELS="${JANUS_BOOT_KERNELS:-vmlinux vmlinuz}"
CPU="${JANUS_BOOT_CPU:-max}"
TIMEOUT="${JANUS_BOOT_TIMEOUT:-120}"
CLK_TCK="$(getconf CLK_TCK)"

ensure_apt qemu-system-x86
if [ "${JANUS_BOOT_NO_BUILD:-0}" != 1 ]; then
	"$HACK_DIR/build-guest.sh" "$OUT_DIR"
fi
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
INITRD="${JANUS_BOOT_INITRD:-$OUT_DIR/initramfs-testinit.cpio}"
RELEASE="$(cat "$OUT_DIR/kernel.release")"
# Our kernel has no modules (all built in): testinit then reports modules=0/0.
NMODS=0
if [ -f "$OUT_DIR/modules/$RELEASE/modules.order" ]; then
	NMODS="$(grep -cv '^#' "$OUT_DIR/modules/$RELEASE/modules.order")"
fi
[ -f "$INITRD" ] || die "no $INITRD: run hack/build-guest.sh"

TSC_KHZ="$(host_tsc_khz)"
[ -n "$TSC_KHZ" ] || die "cannot find the host TSC frequency (dmesg, /proc/cpuinfo)"
APPEND="console=ttyS0 tsc_early_khz=$TSC_KHZ tsc=reliable panic=-1 quiet${JANUS_BOOT_APPEND:+ $JANUS_BOOT_APPEND}"

ACCEL=tcg
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then
	log "note: the CPU shows vmx/svm, but this test always uses TCG (see docs/guest.md)"
fi

RESULTS="$OUT_DIR/boot-test"
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/janus-boot-test.XXXXXX")"
CHILDREN=()
cleanup() {
	local p
	for p in "${CHILDREN[@]}"; do kill "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

HAVE_PY=0
command -v python3 >/dev/null && HAVE_PY=1
[ "$HAVE_PY" = 1 ] || log "python3 not found: no host side on the agent socket, hello check skipped"

qemu_cmd() { # KERNEL SOCKET
	QEMU_CMD=(
		qemu-system-x86_64
		-M "microvm,accel=$ACCEL,x-option-roms=off,isa-serial=on,rtc=on"
		-cpu "$CPU" -m 256M -smp 1
		-nographic -nodefaults -no-user-config -no-reboot
		-serial stdio
		-kernel "$1" -initrd "$INITRD"
		-append "$APPEND"
		-device virtio-serial-device
		-chardev "socket,id=agent,path=$2,server=on,wait=off"
		-device virtserialport,chardev=agent,name=janus.agent
	)
}

# The host side of the agent channel: connect as soon as the socket exists, save what arrives.
agent_client() { # SOCKET OUTFILE
	python3 - "$1" "$2" <<'EOF'
import socket, sys, time
path, out = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
while True:
    try:
        s.connect(path)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.005)
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
with open(out, "wb") as f:
    f.write(data)
EOF
}

usec() { local t="$1"; echo $((10#${t/./})); }

# boot_once KERNEL_FILE LABEL N: one boot; appends a result line to $RESULTS/results.tsv
boot_once() {
	local kernel="$1" label="$2" n="$3"
	local sock="$WORK/agent-$label-$n.sock" fifo="$WORK/console-$label-$n.fifo"
	local logf="$RESULTS/$label-$n.console.log" hwmf="$WORK/hwm-$label-$n"
	local gotf="$RESULTS/$label-$n.agent.txt" errf="$RESULTS/$label-$n.qemu.stderr"
	local t0 t_line="" t_exit pid poller client="" rc line now hwm=0 ok=1 why=()
	rm -f "$sock" "$fifo" "$gotf"
	mkfifo "$fifo"
	qemu_cmd "$kernel" "$sock"
	[ "$n" = 1 ] && log "$label: $(quote_args "${QEMU_CMD[@]}")"

	t0="$EPOCHREALTIME"
	"${QEMU_CMD[@]}" </dev/null >"$fifo" 2>"$errf" &
	pid=$!
	CHILDREN+=("$pid")
	# Sampler and watchdog in one (bash builtins but sleep, to keep noise down), every 50 ms:
	# VmHWM from /proc/<pid>/status and utime+stime (clock ticks) from /proc/<pid>/stat; the
	# last sample before QEMU exits wins (so CPU time may miss up to 50 ms at the very end).
	# After TIMEOUT seconds QEMU is killed (a hung boot).
	(
		end=$((SECONDS + TIMEOUT))
		while [ -r "/proc/$pid/status" ]; do
			{ while read -r k v _; do
				[ "$k" = VmHWM: ] && echo "$v" >"$hwmf"
			done <"/proc/$pid/status"; } 2>/dev/null || true
			{ read -r -a st <"/proc/$pid/stat" &&
				[ "${#st[@]}" -gt 15 ] && [ "${st[2]}" != Z ] &&
				echo $((st[13] + st[14])) >"$hwmf.cpu"; } 2>/dev/null || true
			[ "$SECONDS" -lt "$end" ] || kill -9 "$pid" 2>/dev/null || true
			sleep 0.05
		done
	) &
	poller=$!
	CHILDREN+=("$poller")
	if [ "$HAVE_PY" = 1 ]; then
		agent_client "$sock" "$gotf" &
		client=$!
		CHILDREN+=("$client")
	fi

	: >"$logf"
	while IFS= read -r line; do
		now="$EPOCHREALTIME"
		line="${line%$'\r'}"
		printf '%s\n' "$line" >>"$logf"
		case "$line" in
		*"JANUS-TESTINIT: kernel="*) [ -n "$t_line" ] || t_line="$now" ;;
		esac
	done <"$fifo"
	rc=0
	wait "$pid" || rc=$?
	t_exit="$EPOCHREALTIME"
	wait "$poller" 2>/dev/null || true
	if [ -n "$client" ]; then
		# The socket closed with QEMU: the client sees EOF and exits by itself.
		local i
		for i in $(seq 1 50); do kill -0 "$client" 2>/dev/null || break; sleep 0.02; done
		kill "$client" 2>/dev/null || true
		wait "$client" 2>/dev/null || true
	fi
	CHILDREN=()
	[ -f "$hwmf" ] && hwm="$(cat "$hwmf")"
	local cpu_ms=-1
	[ -f "$hwmf.cpu" ] && cpu_ms=$(($(cat "$hwmf.cpu") * 1000 / CLK_TCK))

	# Checks
	[ "$rc" -eq 0 ] || { ok=0; why+=("qemu exit status $rc"); }
	[ -n "$t_line" ] || { ok=0; why+=("no JANUS-TESTINIT line"); }
	grep -q "JANUS-TESTINIT: kernel=$RELEASE modules=$NMODS/$NMODS\$" "$logf" ||
		{ ok=0; why+=("not all $NMODS modules loaded"); }
	grep -qE 'JANUS-TESTINIT: virtio virtio[0-9]+ device=0x0003 \(console\) .*driver=virtio_console path=.*/LNRO0005:' "$logf" ||
		{ ok=0; why+=("no virtio console device on ACPI virtio-mmio (LNRO0005)"); }
	grep -qE 'JANUS-TESTINIT: port vport[0-9]+p[0-9]+ name=janus.agent dev=/dev/vport[0-9]+p[0-9]+$' "$logf" ||
		{ ok=0; why+=("no port janus.agent with a /dev node"); }
	if [ "$HAVE_PY" = 1 ]; then
		grep -q 'hello from janus testinit' "$gotf" 2>/dev/null ||
			{ ok=0; why+=("host did not receive the hello over janus.agent"); }
	fi

	# Not fatal, but worth knowing: without tsc=reliable the TSC gets marked unstable under TCG.
	local cs
	cs="$(sed -n 's/^JANUS-TESTINIT: clocksource=//p' "$logf" | head -n1)"
	[ "$cs" = tsc ] || log "$label #$n: warning: guest clocksource is '${cs:-?}', not tsc"

	local ms_line=-1 ms_exit guest_init="?"
	[ -n "$t_line" ] && ms_line=$((($(usec "$t_line") - $(usec "$t0")) / 1000))
	ms_exit=$((($(usec "$t_exit") - $(usec "$t0")) / 1000))
	guest_init="$(sed -n 's/^testinit: started, uptime \([0-9.]*\) .*/\1/p' "$logf" | head -n1)"
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$n" "$ms_line" "$ms_exit" "$hwm" \
		"${guest_init:-?}" "$ok" "$cpu_ms" >>"$RESULTS/results.tsv"
	if [ "$ok" = 1 ]; then
		log "$label #$n: testinit line ${ms_line} ms, qemu exit ${ms_exit} ms, qemu CPU ${cpu_ms} ms, VmHWM $((hwm / 1024)) MiB, guest uptime at /init ${guest_init}s: OK"
	else
		log "$label #$n: FAILED: $(IFS=";"; echo "${why[*]}") (console: $logf, stderr: $errf)"
	fi
	rm -f "$fifo"
}

median() { sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) { print "-"; exit } if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

log "guest $RELEASE, initrd $(basename "$INITRD") ($(stat -c %s "$INITRD") bytes), cpu $CPU, accel $ACCEL, $BOOTS boots per kernel"
log "kernel command line: $APPEND"
: >"$RESULTS/results.tsv"
for i in $(seq 1 "$BOOTS"); do
	# Interleave the kernels so that load changes on this busy machine hit both alike.
	for k in $KERNELS; do
		[ -f "$OUT_DIR/$k" ] || die "no $OUT_DIR/$k"
		boot_once "$OUT_DIR/$k" "$k" "$i"
	done
done

failed=0
for k in $KERNELS; do
	[ "$(awk -F'\t' -v k="$k" '$1 == k && $7 == 1' "$RESULTS/results.tsv" | wc -l)" -eq "$BOOTS" ] || failed=1
done
{
	echo "guest $RELEASE; initrd $(basename "$INITRD"); -cpu $CPU; accel $ACCEL; $BOOTS boots per kernel; $(nproc) host CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
	printf '%-8s %16s %14s %14s %14s %16s %6s\n' kernel "testinit-line-ms" "qemu-exit-ms" "qemu-CPU-ms" "VmHWM-MiB" "guest-/init-s" "ok"
	for k in $KERNELS; do
		rows="$(awk -F'\t' -v k="$k" '$1 == k' "$RESULTS/results.tsv")"
		good="$(echo "$rows" | awk -F'\t' '$7 == 1' | wc -l)"
		printf '%-8s %16s %14s %14s %14s %16s %6s\n' "$k" \
			"$(echo "$rows" | awk -F'\t' '$3 >= 0 { print $3 }' | median)" \
			"$(echo "$rows" | cut -f4 | median)" \
			"$(echo "$rows" | awk -F'\t' '$8 >= 0 { print $8 }' | median)" \
			"$(echo "$rows" | awk -F'\t' '{ printf "%.1f\n", $5 / 1024 }' | median)" \
			"$(echo "$rows" | cut -f6 | grep -v '?' | median)" \
			"$good/$BOOTS"
	done
	echo "(medians; times from QEMU spawn, wall clock)"
} >"$RESULTS/summary.txt"
cat "$RESULTS/summary.txt"
# Show one console log, to see what the guest saw.
first="$(ls "$RESULTS"/*-1.console.log 2>/dev/null | head -n1)"
[ -z "$first" ] || { echo "--- $first"; grep -E 'JANUS-TESTINIT|FAILED' "$first"; }
[ "$failed" -eq 0 ] || die "some boots failed; see $RESULTS"
log "all boots OK; results in $RESULTS"
