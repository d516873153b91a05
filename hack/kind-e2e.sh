#!/bin/bash
# End-to-end test of the installer DaemonSet in a kind cluster:
#
#   hack/kind-e2e.sh
#
# 1. kind create cluster (deploy/kind/cluster.yaml; $JANUS_KIND_CLUSTER, default janus-e2e)
# 2. QEMU + virtiofsd in the node container (apt-get there: kind's node image has neither)
# 3. hack/build-installer.sh, kind load image-archive
# 4. kubectl apply -f deploy/installer/installer.yaml; wait for the node label
#    janus.runtime/installed=true
# 5. a pod per RuntimeClass (deploy/examples/pod-janus.yaml, and the same with janus-vm):
#    the janus pod's `uname -r` is the node's kernel, the janus-vm pod's is not
# 6. delete the pods, the DaemonSet (its pod uninstalls: the label goes), the rest; check the
#    node's containerd config is back; kind delete cluster (kept with JANUS_KIND_KEEP=1)
#
# Needs kind, kubectl, and docker or podman (kind's provider), a release build
# (cargo build --release --workspace --bins) and the guest image (hack/build-guest.sh), and
# network access for kind's node image, apt in the node and the example's busybox image.
# When kind or a container engine is missing it prints "NOT RUN: <reason>" and exits 0, unless
# JANUS_REQUIRE=kind (then it fails).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"

CLUSTER="${JANUS_KIND_CLUSTER:-janus-e2e}"
KIND="${JANUS_KIND:-kind}"
TIMEOUT="${JANUS_KIND_TIMEOUT:-300s}"
LABEL=janus.runtime/installed

not_run() {
	echo "NOT RUN: $*"
	if [ "${JANUS_REQUIRE:-}" = kind ]; then
		die "JANUS_REQUIRE=kind: $*"
	fi
	exit 0
}

command -v "$KIND" >/dev/null || not_run "no kind ($KIND) on PATH"
ENGINE=""
for e in docker podman; do
	if command -v "$e" >/dev/null && "$e" info >/dev/null 2>&1; then
		ENGINE="$e"
		break
	fi
done
[ -n "$ENGINE" ] || not_run "no working docker or podman for kind's nodes"
command -v kubectl >/dev/null || not_run "no kubectl"
[ "$ENGINE" = podman ] && export KIND_EXPERIMENTAL_PROVIDER=podman

WORK="$(mktemp -d)"
cleanup() {
	rm -rf "$WORK"
	if [ "${JANUS_KIND_KEEP:-0}" = 1 ]; then
		log "kept cluster $CLUSTER (kind delete cluster --name $CLUSTER)"
	else
		"$KIND" delete cluster --name "$CLUSTER" >&2 || true
	fi
}
trap cleanup EXIT

k() { kubectl --context "kind-$CLUSTER" "$@"; }

log "creating cluster $CLUSTER"
"$KIND" create cluster --name "$CLUSTER" --config "$REPO_ROOT/deploy/kind/cluster.yaml" --wait "$TIMEOUT" >&2
NODE="$(k get nodes -o jsonpath='{.items[0].metadata.name}')"
CONFIG_BEFORE="$("$ENGINE" exec "$NODE" cat /etc/containerd/config.toml)"

log "QEMU and virtiofsd in node $NODE (VM pods)"
"$ENGINE" exec "$NODE" bash -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 virtiofsd iproute2 iptables' >&2

log "installer image"
TAR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/janus-installer.tar"
IMAGE="$("$HERE/build-installer.sh" "$TAR" | tail -n1)"
"$KIND" load image-archive "$TAR" --name "$CLUSTER" >&2
"$ENGINE" exec "$NODE" crictl images | grep -q "${IMAGE%:*}" || die "$IMAGE not in the node after kind load"

log "installer DaemonSet"
k apply -f "$REPO_ROOT/deploy/installer/installer.yaml" >&2
k wait --for=condition=Ready node "$NODE" --timeout="$TIMEOUT" >&2
for _ in $(seq 1 150); do
	[ "$(k get node "$NODE" -o jsonpath="{.metadata.labels.janus\.runtime/installed}")" = true ] && break
	sleep 2
done
[ "$(k get node "$NODE" -o jsonpath="{.metadata.labels.janus\.runtime/installed}")" = true ] || {
	k -n janus-system logs daemonset/janus-installer >&2 || true
	die "node $NODE never got $LABEL=true"
}

log "a pod per RuntimeClass"
k apply -f "$REPO_ROOT/deploy/examples/pod-janus.yaml" >&2
sed -e 's/name: hello-janus/name: hello-janus-vm/' -e 's/runtimeClassName: janus$/runtimeClassName: janus-vm/' \
	"$REPO_ROOT/deploy/examples/pod-janus.yaml" >"$WORK/pod-janus-vm.yaml"
k apply -f "$WORK/pod-janus-vm.yaml" >&2
k wait --for=condition=Ready pod/hello-janus pod/hello-janus-vm --timeout="$TIMEOUT" >&2 || {
	k describe pod hello-janus hello-janus-vm >&2 || true
	die "pods not ready"
}
NODE_KERNEL="$(k get node "$NODE" -o jsonpath='{.status.nodeInfo.kernelVersion}')"
NS_KERNEL="$(k exec hello-janus -- uname -r)"
VM_KERNEL="$(k exec hello-janus-vm -- uname -r)"
log "kernels: node $NODE_KERNEL, janus pod $NS_KERNEL, janus-vm pod $VM_KERNEL"
[ "$NS_KERNEL" = "$NODE_KERNEL" ] || die "the janus pod does not run on the node's kernel"
[ "$VM_KERNEL" != "$NODE_KERNEL" ] || die "the janus-vm pod runs on the node's kernel, not in a VM"

log "removal"
k delete pod hello-janus hello-janus-vm --wait >&2
# The DaemonSet first, waiting for its pod's uninstall (which needs the ServiceAccount).
k -n janus-system delete daemonset janus-installer --cascade=foreground --wait --timeout="$TIMEOUT" >&2
k delete -f "$REPO_ROOT/deploy/installer/installer.yaml" --ignore-not-found --wait >&2
[ -z "$(k get node "$NODE" -o jsonpath="{.metadata.labels.janus\.runtime/installed}")" ] ||
	die "node $NODE still has $LABEL"
[ "$("$ENGINE" exec "$NODE" cat /etc/containerd/config.toml)" = "$CONFIG_BEFORE" ] ||
	die "the node's containerd config was not restored"
! "$ENGINE" exec "$NODE" test -e /usr/local/bin/containerd-shim-janus-v2 ||
	die "the shim is still on the node"
echo "PASS: kind e2e (node $NODE_KERNEL, VM $VM_KERNEL)"
