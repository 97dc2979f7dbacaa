#!/bin/bash
# Build everything boot.sh needs into the work dir, from the Debian packages that
# install-deps.sh installed plus the project itself:
#
#   $WORK/xen            the Xen hypervisor, gunzipped (QEMU's multiboot1 loader boots it)
#   $WORK/vmlinuz        the Debian kernel, used for dom0 and every domU
#   $WORK/domu.cpio.gz   busybox, xenstore-utils, python3 + stdlib, the project and its
#                        runtime deps (site-packages with .dist-info), tests/xen/checks
#   $WORK/dom0.cpio.gz   the same plus xl/xenstored/xenconsoled and, under /guest, the
#                        kernel and domu.cpio.gz that dom0 hands to `xl create`
#
# Env: XENTMEM_XEN_WORK      work dir (default /tmp/xentmem-xen)
#      XENTMEM_BUILD_PYTHON  a python with pip, used to build and fetch wheels
#                            (default: python3 on PATH; the pytest passes its own)
#      XENTMEM_KVER          kernel version (default: newest /boot/vmlinuz-* with modules)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=${XENTMEM_XEN_WORK:-/tmp/xentmem-xen}
BUILD_PYTHON=${XENTMEM_BUILD_PYTHON:-python3}
XENVER=4.17
XENBIN=/usr/lib/xen-$XENVER/bin
GUEST_PY=python3.11                  # Debian 12's /usr/bin/python3
GUEST_SITE=/usr/local/lib/$GUEST_PY/dist-packages   # on Debian python's default sys.path
CHECKS_DIR=/opt/xentmem/checks

say() { echo "build-images: $*"; }
die() { echo "build-images: ERROR: $*" >&2; exit 1; }

pick_kernel() {
    local v
    for v in $(ls /boot | sed -n 's/^vmlinuz-//p' | sort -rV); do
        [ -d "/lib/modules/$v/kernel/drivers/xen" ] && { echo "$v"; return 0; }
    done
    return 1
}
KVER=${XENTMEM_KVER:-$(pick_kernel)} || die "no /boot/vmlinuz-* with Xen modules; run install-deps.sh"
[ -e "/boot/xen-$XENVER-amd64.gz" ] || die "/boot/xen-$XENVER-amd64.gz missing; run install-deps.sh"
[ -x "$XENBIN/xl" ] || die "$XENBIN/xl missing; run install-deps.sh"
[ -x "/usr/bin/$GUEST_PY" ] || die "/usr/bin/$GUEST_PY missing; run install-deps.sh"
"$BUILD_PYTHON" -m pip --version >/dev/null 2>&1 ||
    die "$BUILD_PYTHON has no pip; set XENTMEM_BUILD_PYTHON to a python with pip"

START=$(date +%s)
mkdir -p "$WORK"
STAGE=$WORK/stage
ROOT=$STAGE/root
rm -rf "$STAGE"
mkdir -p "$STAGE"

# ---------------------------------------------------------------- python payload
# Wheels are built from a copy of the tree: an in-tree build would leave build/lib
# behind, and setuptools would package files from it that were deleted since.
# The project's files as git sees them: tracked plus untracked-but-not-ignored (so a
# .venv or build/ in the tree never gets in), minus tests/ and files deleted on disk.
project_files() {
    if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (cd "$REPO" && git ls-files -z --cached --others --exclude-standard -- . ':!tests' |
            while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done)
    else
        (cd "$REPO" && find . \( -name .git -o -name .venv -o -name tests -o -name build \
            -o -name '*.egg-info' -o -name __pycache__ \) -prune -o -type f -print0)
    fi
}

build_site_packages() {
    local src=$STAGE/src wheels=$STAGE/wheels site=$STAGE/site
    mkdir -p "$src" "$wheels" "$site"
    project_files | (cd "$REPO" && cpio -pdm0 --quiet "$src")
    # The project, and pyxs (a wheel today; `pip wheel` also builds it if only an
    # sdist is offered), become wheels that the binary-only install below accepts.
    "$BUILD_PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$wheels" "$src" pyxs
    # Everything else: binary wheels for the guest's CPython 3.11 (lz4 and psutil have
    # C extensions, so the build machine's own python must not decide the tags).  The
    # project has one too (xentmem/tmem/_hot.c): its wheel, built here by $BUILD_PYTHON,
    # is tagged cp311-cp311-linux_x86_64, so that platform is accepted as well.
    "$BUILD_PYTHON" -m pip install -q --disable-pip-version-check --no-warn-script-location \
        --target "$site" --only-binary=:all: --find-links "$wheels" \
        --implementation cp --python-version 3.11 --abi cp311 \
        --platform manylinux_2_36_x86_64 --platform manylinux2014_x86_64 \
        --platform linux_x86_64 \
        xentmem
    rm -rf "$site/bin"     # launchers with the build python's shebang; made below instead
    # The page arena's C loops must be there, built for the guest's CPython 3.11 (a wheel
    # from another minor version would not import in the guest).
    compgen -G "$site/xentmem/tmem/_hot.cpython-311-*.so" >/dev/null ||
        die "xentmem/tmem/_hot.cpython-311-*.so missing from the site: $BUILD_PYTHON must be a CPython 3.11 with its headers (python3-dev)"
}

# Console-script launchers for the guest interpreter, from the installed .dist-info.
write_launchers() {   # $1 site dir, $2 output bin dir
    "$BUILD_PYTHON" - "$1" "$2" "/usr/bin/python3" <<'PY'
import configparser
import pathlib
import sys

site, bindir, interpreter = (pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3])
bindir.mkdir(parents=True, exist_ok=True)
for entry_points in sorted(site.glob("*.dist-info/entry_points.txt")):
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str
    parser.read(entry_points)
    if not parser.has_section("console_scripts"):
        continue
    for name, target in parser.items("console_scripts"):
        module, _, attr = target.strip().partition(":")
        script = bindir / name
        script.write_text(
            f"#!{interpreter}\nimport sys\nfrom {module} import {attr.split('.')[0]}\n"
            f"sys.exit({attr}())\n"
        )
        script.chmod(0o755)
        print(f"build-images: launcher {name} -> {target.strip()}")
PY
}

# ---------------------------------------------------------------- file helpers
# Copy files into $ROOT with their shared-library closure (ldd).  Symlinked paths
# keep their link so that both /usr/bin/xenstore-read and its target resolve.
add_files() {
    local f real lib
    for f in "$@"; do
        real=$(readlink -f "$f")
        if [ ! -e "$ROOT$real" ]; then
            mkdir -p "$ROOT$(dirname "$real")"
            cp -a "$real" "$ROOT$real"
        fi
        if [ "$f" != "$real" ] && [ ! -e "$ROOT$f" ] && [ ! -L "$ROOT$f" ]; then
            mkdir -p "$ROOT$(dirname "$f")"
            ln -s "$real" "$ROOT$f"
        fi
        add_libraries_of "$real"
    done
}

add_libraries_of() {   # $1: an ELF file (host path, or one already staged)
    local lib
    for lib in $(ldd "$1" 2>/dev/null | awk '/=> \// {print $3} /^[[:space:]]*\// {print $1}'); do
        [ -e "$ROOT$lib" ] || add_files "$lib"
    done
}

pack() {   # $1 output; packs $ROOT
    (cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet -R 0:0) | gzip -1 >"$1"
    say "$(basename "$1"): $(du -h "$1" | cut -f1) (unpacked $(du -sh "$ROOT" | cut -f1))"
}

# ---------------------------------------------------------------- common root
t0=$(date +%s)
build_site_packages
say "site-packages: $(ls "$STAGE/site" | grep -c dist-info) distributions, $(du -sh "$STAGE/site" | cut -f1), $(( $(date +%s) - t0 ))s"

mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,proc,sys,dev,run,tmp,etc,var/log,var/lib,root,opt/xentmem}
ln -s usr/bin "$ROOT/bin"; ln -s usr/sbin "$ROOT/sbin"          # merged /usr, like Debian 12
ln -s usr/lib "$ROOT/lib"; ln -s usr/lib64 "$ROOT/lib64"
cp /bin/busybox "$ROOT/usr/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ -e "$ROOT/usr/bin/$applet" ] || ln -s busybox "$ROOT/usr/bin/$applet"
done
add_files /usr/bin/xenstore /usr/bin/xenstore-{read,write,ls,list,rm,exists,watch,chmod}
# Debian's interpreter and its stdlib, without what only developers use.  The 25 MB
# config-3.11-* dir is the static libpython for embedding.  The .pyc files stay:
# compiling at import time is slow under TCG.
add_files "/usr/bin/$GUEST_PY"
ln -sf "$GUEST_PY" "$ROOT/usr/bin/python3"
tar -C / --exclude="$GUEST_PY/test" --exclude="$GUEST_PY/idlelib" --exclude="$GUEST_PY/tkinter" \
    --exclude="$GUEST_PY/turtledemo" --exclude="$GUEST_PY/ensurepip" \
    --exclude="$GUEST_PY/lib2to3" --exclude="$GUEST_PY/pydoc_data" \
    --exclude="$GUEST_PY/distutils" --exclude="$GUEST_PY/config-3.11-*" \
    -cf - "usr/lib/$GUEST_PY" "etc/$GUEST_PY" | tar -C "$ROOT" -xf -
for so in "$ROOT/usr/lib/$GUEST_PY"/lib-dynload/*.so; do add_files "${so#"$ROOT"}"; done
say "python stdlib: $(du -sh "$ROOT/usr/lib/$GUEST_PY" | cut -f1)"
mkdir -p "$ROOT$GUEST_SITE"
cp -a "$STAGE/site/." "$ROOT$GUEST_SITE/"
for so in $(find "$ROOT$GUEST_SITE" -name '*.so'); do add_libraries_of "$so"; done
write_launchers "$ROOT$GUEST_SITE" "$ROOT/usr/local/bin"
# The Xen drivers that are modules in Debian's kernel (xenfs, evtchn, gntdev, privcmd...)
mkdir -p "$ROOT/lib/modules/$KVER/kernel/drivers"
cp -a "/lib/modules/$KVER/kernel/drivers/xen" "$ROOT/lib/modules/$KVER/kernel/drivers/"
# NBD swap (checks/domu/60-swap): the kernel's nbd driver (no dependencies in Debian's 6.1),
# nbd-client, and util-linux's mkswap/swapon/swapoff (`xentmem swap` passes them options
# busybox's applets lack); /usr/sbin comes before busybox's /usr/bin on PATH.
mkdir -p "$ROOT/lib/modules/$KVER/kernel/drivers/block"
cp -a "/lib/modules/$KVER/kernel/drivers/block/nbd.ko" "$ROOT/lib/modules/$KVER/kernel/drivers/block/"
for dep in $(modinfo -F depends "/lib/modules/$KVER/kernel/drivers/block/nbd.ko" | tr , ' '); do
    path=$(modinfo -n -k "$KVER" "$dep") || die "nbd.ko needs $dep, not found"
    mkdir -p "$ROOT$(dirname "$path")"; cp -a "$path" "$ROOT$path"
done
[ -x /usr/sbin/nbd-client ] || die "/usr/sbin/nbd-client missing; run install-deps.sh"
add_files /usr/sbin/nbd-client /usr/sbin/mkswap /usr/sbin/swapon /usr/sbin/swapoff
cp -a "/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$ROOT/lib/modules/$KVER/" 2>/dev/null || true
depmod -b "$ROOT" "$KVER"
# The test bed: init, and the whole checks tree (exec bits kept)
install -m 755 "$HERE/image/init" "$ROOT/init"
cp -a "$HERE/checks" "$ROOT$CHECKS_DIR"
# The NBD swap checks (issue 13: domu/60-swap, 65-swap-killed, 66-swap-restart, dom0's
# 07-swap-host-tmem) are built in unless XENTMEM_XEN_SWAP=0 (a quicker bed for work
# elsewhere; test_real_xen.py then drops their required names too).
if [ "${XENTMEM_XEN_SWAP:-1}" = 0 ]; then
    rm -f "$ROOT$CHECKS_DIR/domu/60-swap" "$ROOT$CHECKS_DIR/domu/65-swap-killed" \
          "$ROOT$CHECKS_DIR/domu/66-swap-restart" \
          "$ROOT$CHECKS_DIR/dom0/during-domu/07-swap-host-tmem"
fi
find "$ROOT$CHECKS_DIR" -name __pycache__ -prune -exec rm -rf {} +
# The shipped units, where a distribution package would put them (the checks read them there)
mkdir -p "$ROOT/usr/lib/systemd/system"
install -m 644 "$REPO"/systemd/*.service "$ROOT/usr/lib/systemd/system/"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"
printf 'project=%s\nkernel=%s\nbuilt=%s\n' "$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)" \
    "$KVER" "$(date -u +%FT%TZ)" >"$ROOT/etc/xentmem-bed"

pack "$WORK/domu.cpio.gz"

# ---------------------------------------------------------------- dom0 extras
# glibc dlopen()s libgcc_s.so.1 for pthread_cancel; xl aborts after creating a domain
# without it, and ldd cannot see it.
add_files /usr/lib/x86_64-linux-gnu/libgcc_s.so.1
add_files "$XENBIN"/{xl,xenstored,xenconsoled,xen-init-dom0,xenstore-control,libxl-save-helper}
for b in xl xenstored xenconsoled xen-init-dom0; do ln -sf "$XENBIN/$b" "$ROOT/usr/sbin/$b"; done
mkdir -p "$ROOT/etc/xen" "$ROOT/var/lib/xen" "$ROOT/var/log/xen" "$ROOT/guest"
[ -e /etc/xen/xl.conf ] && cp /etc/xen/xl.conf "$ROOT/etc/xen/"
cp "/boot/vmlinuz-$KVER" "$ROOT/guest/vmlinuz"
cp "$WORK/domu.cpio.gz" "$ROOT/guest/domu.cpio.gz"
pack "$WORK/dom0.cpio.gz"

zcat "/boot/xen-$XENVER-amd64.gz" >"$WORK/xen"      # 32-bit ELF with a multiboot1 header
cp "/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
rm -rf "$STAGE"
say "done in $(( $(date +%s) - START ))s: $(du -sh "$WORK" | cut -f1) in $WORK (kernel $KVER)"
