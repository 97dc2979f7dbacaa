#!/bin/sh
# Usage: swapmonitor.sh CHECK_PID DAEMON_PID_FILE (started by swapcheck.start_monitor).
# swapcheck's monitor: a busybox shell loop (its code is on the ramfs root, its memory
# small), so it reports while the check's own Python waits on a swapped-out page.
check=$1 daemon_pid_file=$2 n=0 last=
while [ -e /proc/$check ]; do
    sleep 10; n=$((n + 1))
    stat=$(cat /sys/block/nbd0/stat 2>/dev/null | tr -s ' ' | cut -d' ' -f2,6,10)
    set -- $(awk '/^MemFree|^Writeback:|^SwapFree|^SwapTotal/ {printf "%s ", $2}' /proc/meminfo)
    echo "swap-monitor: up $(cut -d' ' -f1 /proc/uptime)s free ${1}kB swap-free ${3}kB/${2}kB writeback ${4}kB nbd0 r/w/inflight ${stat:-none}" >/dev/console
    if [ "$stat" = "$last" ] && [ -n "$stat" ] && [ $((n % 3)) -eq 0 ]; then
        echo "swap-monitor: nbd0 did not move in 30s: blocked tasks and xentmemd's threads" >/dev/console
        for t in /proc/[0-9]*/task/[0-9]*; do
            state=$(awk '/^State:/ {print $2}' $t/status 2>/dev/null)
            pid=$(echo $t | cut -d/ -f3)
            if [ "$state" = D ] || [ "$pid" = "$(cat $daemon_pid_file 2>/dev/null)" ]; then
                echo "swap-monitor: $t $(cat $t/comm 2>/dev/null) $state wchan=$(cat $t/wchan 2>/dev/null) stack: $(tr '\n' '|' <$t/stack 2>/dev/null | cut -c1-600)" >/dev/console
            fi
        done
    fi
    last=$stat
done
