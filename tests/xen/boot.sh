#!/bin/bash
# Boot Xen 4.17 + the Debian kernel as PV dom0 under QEMU (software emulation, no KVM),
# let dom0 run the bed (checks, domUs), and judge the serial log.
#
# Usage: boot.sh            batch run: serial -> $WORK/serial.log, ends with RESULT: OK|FAILED
#        boot.sh --shell    interactive: serial on stdio, dom0 drops to a shell at the end
#                           (Ctrl-a x quits QEMU)
# Env:   XENTMEM_XEN_WORK=/tmp/xentmem-xen   images from build-images.sh
#        XENTMEM_XEN_DOMUS=2       how many domUs dom0 starts (1 or 2)
#        XENTMEM_XEN_TIMEOUT=900   seconds before QEMU is killed: the bed's deadline, which
#                                  every wait inside the guests follows (image/init)
#        XENTMEM_XEN_ACCEL=tcg|kvm XENTMEM_XEN_SMP=2 XENTMEM_XEN_MEM=2048
#        XENTMEM_XEN_EXTRA_ARGS="..." appended to the Xen command line
set -euo pipefail
WORK=${XENTMEM_XEN_WORK:-/tmp/xentmem-xen}
DOMUS=${XENTMEM_XEN_DOMUS:-2}
TIMEOUT=${XENTMEM_XEN_TIMEOUT:-900}
ACCEL=${XENTMEM_XEN_ACCEL:-tcg}
SMP=${XENTMEM_XEN_SMP:-2}
MEM=${XENTMEM_XEN_MEM:-2048}
LOG=$WORK/serial.log
SHELL_ARG=
[ "${1:-}" = "--shell" ] && SHELL_ARG=" xentmem.shell"

for f in xen vmlinuz dom0.cpio.gz; do
    [ -e "$WORK/$f" ] || { echo "boot: missing $WORK/$f; run build-images.sh first" >&2; exit 2; }
done
case $DOMUS in 1|2) ;; *) echo "boot: XENTMEM_XEN_DOMUS must be 1 or 2" >&2; exit 2 ;; esac

case $ACCEL in
    kvm) CPU=(-accel kvm -cpu host); XEN_FIX="" ;;
    # smap=0: under QEMU 7.2 TCG with SMAP, Xen cannot write the first exception frame
    # to the PV dom0 kernel's stack and crashes dom0 at once.  -rdtscp: QEMU's emulated
    # SVM reports RDTSCP without next-RIP and Xen loops on it in PVH/HVM guests.
    # xsave=0: with several vCPUs under host load, guests' Python processes crashed at random
    #   (SIGSEGV, SystemError) in 3 of 4 runs; with XSAVE (so AVX state) off in Xen, none did.
    *) CPU=(-accel tcg,thread=multi -cpu max,-rdtscp); XEN_FIX="smap=0 xsave=0" ;;
esac
# serial_tx_buffer: bursts of guest output must not be dropped by Xen's 16 KiB default.
XEN_ARGS="console=com1 com1=115200,8n1 serial_tx_buffer=256k dom0_mem=512M,max:512M"
XEN_ARGS="$XEN_ARGS dom0_max_vcpus=$SMP loglvl=all guest_loglvl=all $XEN_FIX ${XENTMEM_XEN_EXTRA_ARGS:-}"
# The deadline is wall-clock time: Xen gives the guests the host's clock (QEMU's RTC).
DEADLINE=$(( $(date +%s) + TIMEOUT ))
LINUX_ARGS="console=hvc0 earlyprintk=xen loglevel=4 xentmem.domus=$DOMUS"
LINUX_ARGS="$LINUX_ARGS xentmem.deadline=$DEADLINE$SHELL_ARG"
# QEMU's multiboot modules are "file args,file args": a comma inside args must be doubled.
MODULES="$WORK/vmlinuz ${LINUX_ARGS//,/,,},$WORK/dom0.cpio.gz"
QEMU=(qemu-system-x86_64 -machine pc "${CPU[@]}" -smp "$SMP" -m "$MEM"
      -display none -vga none -nic none -no-reboot
      -kernel "$WORK/xen" -append "$XEN_ARGS" -initrd "$MODULES")

if [ -n "$SHELL_ARG" ]; then
    exec "${QEMU[@]}" -serial mon:stdio
fi

: >"$LOG"
START=$(date +%s.%N)
elapsed() { awk -v s="$START" -v n="$(date +%s.%N)" 'BEGIN { printf "%7.1fs", n - s }'; }
timeout --kill-after=10 "$TIMEOUT" "${QEMU[@]}" -serial "file:$LOG" -monitor none &
QPID=$!
echo "boot: qemu pid $QPID, serial log $LOG, $DOMUS domU(s), timeout ${TIMEOUT}s"

# Follow the log as it grows: report progress with the host's elapsed time, and stop
# QEMU at once when dom0 or Xen dies instead of waiting for the timeout.
CRASH=
while IFS= read -r line; do
    line=${line%$'\r'}
    case $line in
        *"Xen version "*"(XEN)"*|"(XEN) Xen version"*) echo "$(elapsed)  Xen banner" ;;
        *"Booting paravirtualized kernel on Xen"*) echo "$(elapsed)  dom0 kernel booting" ;;
        *XENTMEM-MARK*|*XENTMEM-CHECK*|*XENTMEM-DOMU-DONE*|*XENTMEM-SIGNAL*|XENTMEM-BED*)
            echo "$(elapsed)  $line" ;;
        "["domu*) ;;    # a guest's own panic is the harness's business, not a reason to stop
        *"Hardware Dom0 crashed"*|*"Kernel panic"*|*"Panic on CPU"*)
            echo "$(elapsed)  FATAL: $line"; CRASH=$line
            sleep 2; kill "$QPID" 2>/dev/null || true ;;
    esac
done < <(tail -n +1 -F --pid="$QPID" "$LOG" 2>/dev/null)

RC=0; wait "$QPID" || RC=$?
echo "$(elapsed)  qemu exited rc=$RC"
tr -d '\r' <"$LOG" >"$LOG.tmp" && mv "$LOG.tmp" "$LOG"
FAILS=$(grep -a -c "XENTMEM-CHECK [^ ]* FAIL" "$LOG" || true)
if [ -n "$CRASH" ]; then
    echo "RESULT: FAILED (crash: $CRASH; see $LOG)"; exit 1
elif ! grep -aq "^XENTMEM-MARK dom0-finished" "$LOG"; then
    echo "RESULT: FAILED (dom0 never finished: timeout or hang; see $LOG)"; exit 1
elif [ "$FAILS" -ne 0 ]; then
    echo "RESULT: FAILED ($FAILS failed check line(s); see $LOG)"; exit 1
fi
echo "RESULT: OK ($(grep -a "^XENTMEM-BED summary" "$LOG" | tail -n 1))"
