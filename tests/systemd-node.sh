#!/bin/bash
# systemd-node.sh DIR CGROUP: a "node container" with systemd as its PID 1, like a kind node,
# for the tests of systemd-managed cgroups on a host that has no systemd of its own
# (tests/src/systemd_node.rs runs it; the host's own systemd and dbus packages are used).
#
# - cgroups: the node's own cgroup CGROUP in every hierarchy and a cgroup namespace rooted
#   there, mounted the way systemd expects a hybrid host (v1 controllers, name=systemd, unified);
# - root: a read-only bind of the host's root file system, with tmpfs on /run, /var/lib/cni and
#   /var/log, the host's /tmp (where the tests' containerd instances live) and DIR read-write;
#   /proc fresh (own pid namespace), /sys fresh, /dev the host's (its console: DIR/console.log);
# - units: systemd starts janus-node.target (dbus only) from /run/systemd/system, so nothing of
#   the host's enabled services runs.
set -euo pipefail
DIR=$1
CG=$2
ROOTFS=$DIR/rootfs
mkdir -p "$ROOTFS"

CONTROLLERS=""
for h in /sys/fs/cgroup/*/; do
	name=$(basename "$h")
	mkdir -p "$h$CG"
	case "$name" in
	cpuset)
		cat "${h}cpuset.cpus" >"$h$CG/cpuset.cpus"
		cat "${h}cpuset.mems" >"$h$CG/cpuset.mems"
		;;
	esac
	case "$name" in
	systemd | unified) ;;
	*) CONTROLLERS="$CONTROLLERS $name" ;;
	esac
done
for h in /sys/fs/cgroup/*/; do echo $$ >"$h$CG/cgroup.procs"; done

cat >"$DIR/inner.sh" <<EOS
set -e
mount --make-rprivate /
mount --bind / $ROOTFS
mount -o remount,bind,ro $ROOTFS
mount -t proc proc $ROOTFS/proc
mount -t sysfs sysfs $ROOTFS/sys
mount -t tmpfs -o mode=755 cgroup $ROOTFS/sys/fs/cgroup
for c in $CONTROLLERS; do
	mkdir $ROOTFS/sys/fs/cgroup/\$c
	mount -t cgroup -o \$c cgroup $ROOTFS/sys/fs/cgroup/\$c
done
mkdir $ROOTFS/sys/fs/cgroup/systemd $ROOTFS/sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup $ROOTFS/sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 $ROOTFS/sys/fs/cgroup/unified
mount --rbind /dev $ROOTFS/dev
# systemd's own log (it writes to the console as a container's PID 1).
: >$DIR/console.log
mount --bind $DIR/console.log $ROOTFS/dev/console
for d in run var/lib/cni var/log; do mount -t tmpfs -o mode=755 tmpfs $ROOTFS/\$d; done
# The host's /tmp: the test's containerd instance directory is there, at the same path.
mount --bind /tmp $ROOTFS/tmp
mount --bind $DIR $ROOTFS$DIR
units=$ROOTFS/run/systemd/system
mkdir -p \$units/dbus.socket.d \$units/dbus.service.d
printf '[Unit]\nDefaultDependencies=no\n' >\$units/dbus.socket.d/node.conf
printf '[Unit]\nDefaultDependencies=no\n' >\$units/dbus.service.d/node.conf
printf '[Unit]\nDescription=Janus test node\nDefaultDependencies=no\nWants=dbus.socket dbus.service\n' >\$units/janus-node.target
exec chroot $ROOTFS env -i container=janus-test-node PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	/lib/systemd/systemd --unit=janus-node.target --log-target=console
EOS
exec unshare --pid --fork --mount --cgroup --uts bash "$DIR/inner.sh"
