#!/bin/bash
# Install the Debian 12 packages the test suite needs (run as root): the real-Xen test bed,
# Debian's xenstored as a protocol peer, systemd-analyze, the NBD clients (libnbd, fio),
# Redis (RAMster) and what builds the project's C extension (gcc, python3-dev).
#
# Idempotent and quiet: when every package is already installed (checked with
# dpkg-query) it returns at once without touching apt, so CI pays for apt only
# on a fresh machine.  --no-install-recommends keeps the download near 100 MB.
#
# A fresh VM often runs unattended-upgrades or cloud-init's apt at boot.  apt waits up to
# DPkg::Lock::Timeout for the dpkg lock; `apt-get update` takes the lists lock, which apt
# does not wait for.  So a run that fails on a held lock, or on a download (a mirror's
# hiccup), is tried again after a pause, a bounded number of times, each time saying why.
#
# Env: XENTMEM_APT_UPDATE=0  skip `apt-get update` (when the lists are known to be fresh)
set -euo pipefail

PACKAGES=(
    qemu-system-x86                 # the emulated host (TCG, no KVM needed)
    xen-hypervisor-4.17-amd64       # /boot/xen-4.17-amd64.gz
    xen-utils-4.17                  # xl, xenstored, xenconsoled, xen-init-dom0
    xenstore-utils                  # xenstore-read/-ls/...; not pulled in without recommends
    linux-image-amd64               # the dom0 and domU kernel + its Xen modules
    busybox-static cpio gzip kmod   # initramfs userland, packing, depmod
    python3                         # Debian's /usr/bin/python3.11, copied into the images
    python3-venv                    # .ci/run's `python3 -m venv` (ensurepip) on a fresh machine
    libgcc-s1                       # xl dlopen()s libgcc_s.so.1 (pthread_cancel)
    gcc libc6-dev                   # the xenstored peer tests build an LD_PRELOAD shim; and
    python3-dev                     # `pip install .` builds xentmem/tmem/_hot.c (headers)
    systemd                         # systemd-analyze verify of the shipped units
    python3-libnbd libnbd-bin       # libnbd, the NBD client the NBD export tests drive
    fio                             # its nbd engine: the NBD tests and bench/bench_nbd.py
    nbdkit                          # `nbdkit memory`, bench/bench_nbd.py's baseline
    nbd-client util-linux           # the bed's domU swap checks: nbd-client, mkswap, swapon/off
    redis-server redis-tools        # a real Redis Cluster for the RAMster tier's tests
    openssl                         # the TLS Redis Cluster test makes its CA and certificates
)
LOCK_TIMEOUT_S=300      # how long apt itself waits for the dpkg lock, each attempt
ATTEMPTS=4              # runs of one apt-get command at most, when the failures are transient
RETRY_PAUSE_S=30        # between two of them (the lists lock: apt does not wait for it)
# What a transient failure prints: a lock held by another apt or dpkg, or a failed download.
TRANSIENT='Could not get lock|Unable to lock directory|Unable to acquire the dpkg frontend lock'
TRANSIENT+='|Failed to fetch|Temporary failure resolving|Could not connect to|Connection timed out'
TRANSIENT+='|Some index files failed to download|Hash Sum mismatch|File has unexpected size'

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
    case $status in
        ii*) ;;
        *) missing+=("$pkg") ;;
    esac
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all ${#PACKAGES[@]} packages already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing ${missing[*]}; run as root" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
apt_opts=(-q -y -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
          -o "DPkg::Lock::Timeout=$LOCK_TIMEOUT_S")

# apt_get LOG ARGS...: apt-get ARGS with its output in LOG; run again after a transient
# failure, ATTEMPTS times at most.  The exit status is apt-get's last one.
apt_get() {
    local log=$1 attempt=1 rc reason
    shift
    while :; do
        rc=0
        apt-get "${apt_opts[@]}" "$@" >"$log" 2>&1 || rc=$?
        [ "$rc" -eq 0 ] && return 0
        reason=$(grep -E -m 1 "$TRANSIENT" "$log" || true)
        if [ -z "$reason" ]; then
            return "$rc"    # not transient: trying again would fail the same way
        fi
        if [ "$attempt" -ge "$ATTEMPTS" ]; then
            echo "install-deps: apt-get $1 failed $ATTEMPTS times: $reason" >&2
            return "$rc"
        fi
        echo "install-deps: apt-get $1 failed ($reason); try $((attempt + 1)) of $ATTEMPTS in ${RETRY_PAUSE_S}s" >&2
        sleep "$RETRY_PAUSE_S"
        attempt=$((attempt + 1))
    done
}

# Debian's kernel postinst runs update-initramfs and GRUB hooks; neither matters in a
# container, and their output is noise, so it goes to a log that is shown on failure.
log=$(mktemp /tmp/xentmem-apt.XXXXXX.log)
failed() {   # $1: the apt-get command that failed
    tail -n 60 "$log" >&2
    echo "install-deps: apt-get $1 failed (full log: $log)" >&2
    exit 1
}
start=$(date +%s)
if [ "${XENTMEM_APT_UPDATE:-1}" != 0 ]; then
    apt_get "$log" update || failed update
fi
echo "install-deps: installing ${missing[*]}"
apt_get "$log" install --no-install-recommends "${missing[@]}" || failed install
rm -f "$log"
echo "install-deps: done in $(( $(date +%s) - start ))s"
