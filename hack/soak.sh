#!/bin/bash
# Soak: many create/run/delete cycles through a private containerd, then proof that nothing
# was left behind.
#
#   hack/soak.sh [--short] [--ns N] [--vm M] [--workers W] [--vm-workers V] [--pods P] [--vm-pods Q]
#       full run (default): N=1000 namespace-mode and M=50 VM-mode cycles, P=100 and Q=10 pods
#       --short (CI):       N=50 and M=3, P=10 and Q=2
#       W parallel workers for namespace mode (default 4), V for VM mode (default 2)
#
# Each cycle is `ctr run --rm --runtime io.containerd.janus[-vm].v2 IMAGE ID true` against the
# system's containerd (/usr/bin/containerd), run with its own root, state, socket and config in
# a temp dir (hack/lib.sh containerd_start). One namespace-mode container stays up for the
# whole soak; every 10th cycle of each worker execs `echo ok` into it (the output is checked),
# so its shim serves traffic too.
#
# Before the cycles (after a warm-up of one cycle per worker and mode, and a few execs) and after
# them, an inventory of what this instance can leave behind is taken:
#   - processes: our shims (command line names our containerd), QEMU, virtiofsd and container
#     processes (descendants of our shims, or anything naming our namespace in its command line
#     or cgroup)
#   - mounts: mountinfo mount points under the instance dir or /run/janus, or naming our namespace
#   - cgroups: directories under /sys/fs/cgroup (every v1 controller and the v2 hierarchy) whose
#     path names our namespace (ctr's /<ns>/<id>, Janus's janus/<id> prefix: ids carry the
#     namespace too)
#   - network namespaces (/run/netns), tap devices and their tc filters, /run/janus entries:
#     host-wide (a soak is meant to run alone on the node)
#   - containerd's open fds (/proc/<pid>/fd)
# and the long-lived shim's PSS (/proc/<pid>/smaps_rollup, shim + its zygote).
# Then the Kubernetes path: P namespace-mode and Q VM-mode pod lifecycles through containerd's
# CRI plugin (RunPodSandbox, a container, ExecSync, Stop/RemovePodSandbox; two workers each),
# by tests/tests/soak.rs against a containerd of its own, which then checks that nothing is
# left (CRI objects, containers, shims, processes, mounts, cgroups, netns, CNI state, bridge
# ports, bundles, sockets).
# Deltas must be zero (the after-inventory is retaken for up to 30s while shims exit) and the
# PSS may grow by at most PSS_TOLERANCE_KIB (default 256, see below). Any failed cycle, nonzero
# delta or PSS growth beyond it makes the exit status non-zero.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
need_root

NS_CYCLES=1000
VM_CYCLES=50
WORKERS=4
VM_WORKERS=2
PODS=100
VM_PODS=10
while [ $# -gt 0 ]; do
	case "$1" in
	--short) NS_CYCLES=50; VM_CYCLES=3; PODS=10; VM_PODS=2; shift ;;
	--ns) NS_CYCLES="$2"; shift 2 ;;
	--vm) VM_CYCLES="$2"; shift 2 ;;
	--workers) WORKERS="$2"; shift 2 ;;
	--vm-workers) VM_WORKERS="$2"; shift 2 ;;
	--pods) PODS="$2"; shift 2 ;;
	--vm-pods) VM_PODS="$2"; shift 2 ;;
	*) die "unknown argument $1 (see the header of $0)" ;;
	esac
done
# The long-lived shim's PSS may grow this much over the soak. Its baseline is taken after the
# warm-up (execs from every worker at once), so allocator arenas and the runtime's thread pool
# are at their working size already; what is left is page-granular noise (a few dirty pages of
# heap, stacks of threads that come and go). A leak per exec or per cycle would be far larger.
PSS_TOLERANCE_KIB="${PSS_TOLERANCE_KIB:-256}"

ensure_base_deps
SHIM="$(janus_shim_bin)" ||
	die "no shim binary: cargo build --release --bin containerd-shim-janus-v2 (or set JANUS_SHIM)"
TAR="$(janus_image_tar)"
[ -s "$TAR" ] || "$HERE/build-image.sh" "$TAR" >&2
if [ "$VM_CYCLES" -gt 0 ]; then
	# The shim finds the guest next to its target dir; say so explicitly for containerd's shims.
	GUEST="${JANUS_GUEST_DIR:-$(dirname "$(dirname "$(readlink -f "$SHIM")")")/guest}"
	[ -f "$GUEST/initramfs.cpio" ] || die "no guest image in $GUEST: run hack/build-guest.sh"
	export JANUS_GUEST_DIR="$GUEST"
fi

DIR="$(mktemp -d /tmp/janus-soak.XXXXXX)"
# The namespace, and a token every container id carries: what the inventory attributes to us.
NS="soak$$"
IMG="$JANUS_TEST_IMAGE"
LONG_ID="$NS-long"
c() { timeout 180 ctr --address "$DIR/containerd.sock" -n "$NS" "$@"; }

WPIDS=()
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
	local id
	# Workers still cycling (interrupted run): stop them and their ctr first.
	for id in "${WPIDS[@]}"; do pkill -P "$id" 2>/dev/null || true; kill "$id" 2>/dev/null || true; done
	for id in $(c tasks ls -q 2>/dev/null); do c tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
	sleep 1
	for id in $(c containers ls -q 2>/dev/null); do
		c tasks rm -f "$id" >/dev/null 2>&1 || true
		c containers rm "$id" >/dev/null 2>&1 || true
	done
	containerd_stop "$DIR" || true
	grep -F "$DIR/" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
	containerd_rm_ns_cgroups "$NS"
	if [ -n "${KEEP:-}" ]; then log "keeping $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

containerd_start "$DIR" "$SHIM"
CPID="$(cat "$DIR/containerd.pid")"
c images import --base-name "${IMG%:*}" "$TAR" >/dev/null

# ---- inventory -----------------------------------------------------------------------------

# Our processes: shims naming our containerd, their descendants, and anything naming $NS.
our_processes() {
	local shims
	shims="$(for p in /proc/[0-9]*; do
		cmd="$({ tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null)" || continue
		case "$cmd" in *containerd-shim-janus*"$DIR/"*) echo "${p#/proc/}" ;; esac
	done | tr '\n' ' ')"
	# pid ppid for everyone, then a closure over children of our shims.
	ps -eo pid=,ppid= | awk -v roots="$shims" '
		BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) if (r[i] != "") keep[r[i]] = 1 }
		{ parent[$1] = $2; pids[NR] = $1 }
		END {
			do { changed = 0
				for (i in pids) { p = pids[i]; if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } }
			} while (changed)
			for (p in keep) print p
		}'
	for p in /proc/[0-9]*; do
		{ tr '\0' ' ' <"$p/cmdline"; cat "$p/cgroup"; } 2>/dev/null | grep -q -- "$NS" && echo "${p#/proc/}"
	done
	return 0
}

# inventory OUT: one "category<TAB>item" line per thing we could leak.
inventory() {
	local dest="$1" p cmd kind dev
	{
		for p in $(our_processes | sort -un); do
			[ "$p" = "$$" ] || [ "$p" = "$BASHPID" ] && continue
			cmd="$({ tr '\0' ' ' <"/proc/$p/cmdline"; } 2>/dev/null)" || continue
			[ -n "$cmd" ] || continue
			case "$cmd" in
			*grep*"$NS"* | *ctr\ --address*) continue ;; # ourselves, in-flight ctr
			*containerd-shim-janus*) kind=shim ;;
			*qemu-system*) kind=qemu ;;
			*virtiofsd*) kind=virtiofsd ;;
			*) kind=container-proc ;;
			esac
			printf '%s\t%s %s\n' "$kind" "$p" "${cmd:0:100}"
		done
		awk -v d="$DIR/" -v ns="$NS" '
			index($5, d) == 1 || index($5, "/run/janus") == 1 || index($5, ns) { print "mount\t" $5 }' \
			/proc/self/mountinfo
		find /sys/fs/cgroup -mindepth 2 -maxdepth 7 -type d -path "*$NS*" 2>/dev/null | sed 's/^/cgroup\t/'
		find /run/netns -mindepth 1 -maxdepth 1 2>/dev/null | sed 's/^/netns\t/'
		for dev in $(ip -o link show type tap 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
			printf 'tap\t%s\n' "$dev"
			tc filter show dev "$dev" ingress 2>/dev/null | grep -c . | sed "s/^/tc-filter\t$dev ingress lines: /"
			tc filter show dev "$dev" egress 2>/dev/null | grep -c . | sed "s/^/tc-filter\t$dev egress lines: /"
		done
		find /run/janus -mindepth 1 -maxdepth 3 2>/dev/null | sed 's/^/run-janus\t/'
		printf 'containerd-fd\tcount %s\n' "$(find "/proc/$CPID/fd" -mindepth 1 | wc -l)"
	} | sort >"$dest"
}

CATS="shim qemu virtiofsd container-proc mount cgroup netns tap tc-filter run-janus containerd-fd"
count_of() { # FILE CAT: the number of items (containerd-fd: the count itself)
	if [ "$2" = containerd-fd ]; then
		awk -F'\t' '$1 == "containerd-fd" { sub("count ", "", $2); print $2 }' "$1"
	elif [ "$2" = tc-filter ]; then
		awk -F'\t' '$1 == "tc-filter" { n = $2; sub(/.*: /, "", n); s += n } END { print s + 0 }' "$1"
	else
		awk -F'\t' -v c="$2" '$1 == c { n++ } END { print n + 0 }' "$1"
	fi
}
deltas_zero() { # BEFORE AFTER
	local cat
	for cat in $CATS; do
		[ "$(count_of "$1" "$cat")" = "$(count_of "$2" "$cat")" ] || return 1
	done
	cmp -s <(grep -v '^containerd-fd' "$1" | grep -v -P '^(shim|qemu|virtiofsd|container-proc)\t') \
		<(grep -v '^containerd-fd' "$2" | grep -v -P '^(shim|qemu|virtiofsd|container-proc)\t')
}

# PSS (KiB) of the long-lived container's shim processes (the shim and its zygote).
long_shim_pids() { pgrep -f "containerd-shim-janus-v2 .*-id $LONG_ID( |\$)" | tr '\n' ' '; }
pss_of() {
	local s=0 p v
	for p in "$@"; do
		v="$(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)"
		s=$((s + v))
	done
	echo "$s"
}

# ---- cycles --------------------------------------------------------------------------------

NS_RT="io.containerd.janus.v2"
VM_RT="io.containerd.janus-vm.v2"
FAILS="$DIR/failures"
: >"$FAILS"

# cycle RUNTIME ID: one create/run/delete; failures are logged with ctr's output.
cycle() {
	local rt="$1" id="$2" out
	if ! out="$(c run --rm --runtime "$rt" "$IMG" "$id" true 2>&1)"; then
		printf 'cycle %s (%s) failed: %s\n' "$id" "$rt" "$(echo "$out" | tail -n 3 | tr '\n' ' ')" >>"$FAILS"
		# Leave nothing behind for the next cycles (the inventory still sees what this missed).
		c tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
		c tasks rm -f "$id" >/dev/null 2>&1 || true
		c containers rm "$id" >/dev/null 2>&1 || true
		return 1
	fi
	[ -z "$out" ] || printf 'cycle %s (%s): unexpected output: %s\n' "$id" "$rt" "$out" >>"$FAILS"
}
exec_long() { # ID
	local out
	out="$(c tasks exec --exec-id "$1" "$LONG_ID" echo ok 2>&1)" || true
	echo "$1" >>"$DIR/execs"
	[ "$out" = ok ] || printf 'exec %s in %s failed (printed %s, not ok)\n' "$1" "$LONG_ID" "[$out]" >>"$FAILS"
}
# worker RUNTIME KIND W COUNT: COUNT cycles with ids $NS-KIND-W-i, an exec every 10th.
worker() {
	local rt="$1" kind="$2" w="$3" n="$4" i
	for i in $(seq 1 "$n"); do
		cycle "$rt" "$NS-$kind-$w-$i" || true
		[ $((i % 10)) -ne 0 ] || exec_long "x-$kind-$w-$i"
	done
}
# run_parallel RUNTIME KIND WORKERS TOTAL: TOTAL cycles spread over WORKERS.
run_parallel() {
	local rt="$1" kind="$2" workers="$3" total="$4" w n pids=()
	[ "$total" -gt 0 ] || return 0
	[ "$workers" -le "$total" ] || workers="$total"
	for w in $(seq 1 "$workers"); do
		n=$((total / workers + (w <= total % workers ? 1 : 0)))
		worker "$rt" "$kind" "$w" "$n" &
		pids+=($!)
		WPIDS+=($!)
	done
	wait "${pids[@]}" || true
}

log "long-lived container $LONG_ID (namespace mode)"
c run -d --runtime "$NS_RT" "$IMG" "$LONG_ID" sleep 1000000 >/dev/null

log "warm-up: one cycle per worker and mode, execs from every worker"
run_parallel "$NS_RT" warm "$WORKERS" "$WORKERS"
[ "$VM_CYCLES" -eq 0 ] || run_parallel "$VM_RT" warmvm "$VM_WORKERS" "$VM_WORKERS"
XPIDS=()
for w in $(seq 1 "$WORKERS"); do
	exec_long "warm-$w" &
	XPIDS+=($!)
done
wait "${XPIDS[@]}"
if [ -s "$FAILS" ]; then
	cat "$FAILS" >&2
	die "warm-up failed"
fi
: >"$DIR/execs"
sleep 2
inventory "$DIR/before"
LONG_PIDS="$(long_shim_pids)"
[ -n "$LONG_PIDS" ] || die "no shim found for $LONG_ID"
# shellcheck disable=SC2086 # a list of pids
PSS_BEFORE="$(pss_of $LONG_PIDS)"

log "soak: $NS_CYCLES namespace-mode cycles ($WORKERS workers), $VM_CYCLES VM-mode cycles ($VM_WORKERS workers)"
T0="$(date +%s%N)"
run_parallel "$NS_RT" n "$WORKERS" "$NS_CYCLES"
T1="$(date +%s%N)"
run_parallel "$VM_RT" vm "$VM_WORKERS" "$VM_CYCLES"
T2="$(date +%s%N)"

# Shims and QEMU exit asynchronously after `ctr run --rm` returns: retake for up to 30s.
for _ in $(seq 1 30); do
	inventory "$DIR/after"
	deltas_zero "$DIR/before" "$DIR/after" && break
	sleep 1
done
# shellcheck disable=SC2086
PSS_AFTER="$(pss_of $LONG_PIDS)"
LONG_PIDS_AFTER="$(long_shim_pids)"

# ---- report --------------------------------------------------------------------------------

RC=0
NFAIL="$(grep -c . "$FAILS" || true)"
rate() { awk -v n="$1" -v ns="$2" 'BEGIN { printf "%.2f", (ns > 0 ? n / (ns / 1e9) : 0) }'; }
secs() { awk -v ns="$1" 'BEGIN { printf "%.1f", ns / 1e9 }'; }
echo
echo "== soak: containerd $(/usr/bin/containerd --version | awk '{print $3}'), shim $SHIM =="
printf '%-26s %8s %10s %10s\n' mode cycles "wall (s)" "cycles/s"
printf '%-26s %8s %10s %10s\n' "namespace ($WORKERS workers)" "$NS_CYCLES" "$(secs $((T1 - T0)))" "$(rate "$NS_CYCLES" $((T1 - T0)))"
printf '%-26s %8s %10s %10s\n' "vm ($VM_WORKERS workers)" "$VM_CYCLES" "$(secs $((T2 - T1)))" "$(rate "$VM_CYCLES" $((T2 - T1)))"
printf '%-26s %8s %10s %10s\n' total "$((NS_CYCLES + VM_CYCLES))" "$(secs $((T2 - T0)))" "$(rate $((NS_CYCLES + VM_CYCLES)) $((T2 - T0)))"
echo "execs into the long-lived container (echo ok, output checked): $(grep -c . "$DIR/execs" || true)"
echo "failures: $NFAIL"
if [ "$NFAIL" -gt 0 ]; then
	head -n 20 "$FAILS"
	RC=1
fi
echo
printf '%-16s %8s %8s %8s\n' inventory before after delta
for cat in $CATS; do
	b="$(count_of "$DIR/before" "$cat")"
	a="$(count_of "$DIR/after" "$cat")"
	printf '%-16s %8s %8s %8s\n' "$cat" "$b" "$a" "$((a - b))"
	[ "$a" = "$b" ] || RC=1
done
if ! deltas_zero "$DIR/before" "$DIR/after"; then
	RC=1
	echo "changed items (- before only, + after only):"
	diff <(grep -v '^containerd-fd' "$DIR/before") <(grep -v '^containerd-fd' "$DIR/after") |
		grep '^[<>]' | sed 's/^</-/; s/^>/+/' | head -n 60 || true
	# What the leftover processes are doing (they are killed on exit).
	for p in $(comm -13 <(grep -P '^(shim|qemu|virtiofsd|container-proc)\t' "$DIR/before") \
		<(grep -P '^(shim|qemu|virtiofsd|container-proc)\t' "$DIR/after") | cut -f2 | cut -d' ' -f1); do
		[ -d "/proc/$p" ] || continue
		echo "leftover pid $p:"
		ps -o pid=,ppid=,stat=,wchan:32=,etime=,nlwp=,comm= -p "$p" "$(awk '{print $4}' "/proc/$p/stat")" | sed 's/^/    /' || true
		echo "    threads: $(for t in /proc/"$p"/task/*; do printf '%s(%s) ' "$(cat "$t/comm")" "$(cat "$t/wchan")"; done)"
		sed 's/^/    stack: /' "/proc/$p/stack" 2>/dev/null | head -n 8 || true
		find "/proc/$p/fd" -mindepth 1 -printf "    fd %f -> %l\n" 2>/dev/null | head -n 20 || true
	done
fi
echo
GROWTH=$((PSS_AFTER - PSS_BEFORE))
echo "long-lived shim ($LONG_ID, pids $LONG_PIDS): PSS before ${PSS_BEFORE} KiB, after ${PSS_AFTER} KiB, growth ${GROWTH} KiB (tolerance ${PSS_TOLERANCE_KIB} KiB)"
if [ "$LONG_PIDS_AFTER" != "$LONG_PIDS" ]; then
	echo "long-lived shim processes changed: before $LONG_PIDS, after $LONG_PIDS_AFTER"
	RC=1
fi
[ "$GROWTH" -le "$PSS_TOLERANCE_KIB" ] || RC=1

# ---- CRI pods ------------------------------------------------------------------------------

# cri_soak TEST PODS: one of tests/tests/soak.rs's soaks; its failure fails the soak.
cri_soak() {
	local test="$1" n="$2" out="$DIR/cri-$1.log"
	[ "$n" -gt 0 ] || return 0
	echo
	log "CRI: $test ($n pods)"
	if (cd "$REPO_ROOT" && JANUS_SHIM="$SHIM" JANUS_TEST_IMAGE_TAR="$TAR" \
		JANUS_TEST_PAUSE_TAR="$(janus_pause_tar)" JANUS_SOAK_PODS="$PODS" \
		JANUS_SOAK_VM_PODS="$VM_PODS" cargo test -q -p janus-tests --test soak -- \
		--ignored --exact "$test" --nocapture) >"$out" 2>&1; then
		grep -E '^soak \(CRI\)' "$out" || true
	else
		tail -n 40 "$out"
		echo "CRI soak $test: FAIL"
		RC=1
	fi
}
cri_soak cri_pods_namespace_mode "$PODS"
cri_soak cri_pods_vm_mode "$VM_PODS"
echo
if [ "$RC" -eq 0 ]; then echo "soak: PASS"; else echo "soak: FAIL"; KEEP=1; fi
exit "$RC"
