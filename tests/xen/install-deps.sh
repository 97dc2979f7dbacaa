#!/bin/bash
# Install the Debian 12 packages the test suite needs (run as root): the real-Xen test bed,
# Debian's xenstored as a protocol peer, and systemd-analyze.
#
# Idempotent and quiet: when every package is already installed (checked with
# dpkg-query) it returns at once without touching apt, so CI pays for apt only
# on a fresh machine.  --no-install-recommends keeps the download near 100 MB.
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
    gcc libc6-dev                   # the xenstored peer tests build an LD_PRELOAD shim
    systemd                         # systemd-analyze verify of the shipped units
)

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
apt_opts=(-q -y -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
start=$(date +%s)
if [ "${XENTMEM_APT_UPDATE:-1}" != 0 ]; then
    apt-get "${apt_opts[@]}" update >/dev/null
fi
echo "install-deps: installing ${missing[*]}"
# Debian's kernel postinst runs update-initramfs and GRUB hooks; neither matters in a
# container, and their output is noise, so it goes to a log that is shown on failure.
log=$(mktemp /tmp/xentmem-apt.XXXXXX.log)
if ! apt-get "${apt_opts[@]}" install --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "install-deps: apt-get install failed (full log: $log)" >&2
    exit 1
fi
rm -f "$log"
echo "install-deps: done in $(( $(date +%s) - start ))s"
