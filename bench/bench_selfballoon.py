"""Kernel self-ballooning policy vs. the pressure guard, on simulated committed-memory traces.

Each trace is replayed through :mod:`xentmem_selfballoon.simulate`: the real loop (parsers,
policy, actuator) runs on a fake clock against a model 2 GiB guest whose balloon moves at
128 MiB/s and whose PSI comes from the model (the guest stalls while what it needs, Committed_AS
plus 64 MiB of slab and drivers, exceeds its memory).  Printed per trace and policy:

* returned:  average MiB below static max (memory the host got back);
* risk:      seconds with the target below committed + totalreserve (the OOM-risk proxy: the
             target no longer even covers committed memory plus the kernel's watermarks);
* stall:     seconds of PSI "some" stall in the model;
* <goal:     seconds with the target below the whole goal (committed + totalreserve +
             reserved_mb), the stricter reading of the proxy; shown, not targeted;
* reaction:  mean / max lag from the end of a rise (>= 64 MiB) until the target covers the new
             committed + totalreserve.

Target: the guard cuts OOM-risk time by at least half while returning >= 80 % as much memory.

Run:  python bench/bench_selfballoon.py [--json] [--burst-seeds 7,8,9]
      [--traces steady,ramp,bursts] [--duration 1800]
The test suite runs it small (two traces of 600 s); the figures above are the full run's.
Exit status 0 when the target is met, 1 when it is not.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xentmem_selfballoon.simulate import (
    ReplayResult,
    Trace,
    burst_trace,
    ramp_trace,
    replay,
    steady_trace,
)

POLICIES: dict[str, dict[str, Any]] = {
    "kernel": {},
    "guard": {"pressure_guard": "1"},
}
TRACES = ("steady", "ramp", "bursts")
RISK_CUT_TARGET = 0.5
MEMORY_TARGET = 0.8


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def run(traces: list[Trace]) -> list[ReplayResult]:
    return [replay(t, values, policy=name) for t in traces for name, values in POLICIES.items()]


def as_rows(results: list[ReplayResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        m = r.metrics
        rows.append({
            "trace": r.trace,
            "policy": r.policy,
            "duration_s": round(m.duration_s, 1),
            "returned_avg_mib": round(m.returned_avg_mib, 1),
            "risk_s": round(m.risk_s, 1),
            "risk_pct": round(100 * m.risk_s / m.duration_s, 2) if m.duration_s else 0.0,
            "stall_s": round(m.stall_s, 1),
            "below_goal_s": round(m.below_goal_s, 1),
            "reaction_mean_s": None if m.mean_reaction_s is None else round(m.mean_reaction_s, 2),
            "reaction_max_s": None if m.max_reaction_s is None else round(m.max_reaction_s, 2),
            "rises": len(m.reaction_lags_s) + m.unanswered_rises,
            "ticks": r.loop_counters["ticks"],
            "guard_ticks": r.loop_counters["guard_ticks"],
            "errors": r.loop_counters["errors"],
        })
    return rows


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Guard against kernel, per trace and over all traces."""
    by_key = {(r["trace"], r["policy"]): r for r in rows}
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    per_trace = {}
    for t in traces:
        k, g = by_key[(t, "kernel")], by_key[(t, "guard")]
        per_trace[t] = {
            "risk_cut": None if not k["risk_s"] else 1 - g["risk_s"] / k["risk_s"],
            "memory_ratio": g["returned_avg_mib"] / k["returned_avg_mib"]
            if k["returned_avg_mib"] else None,
        }
    k_risk = sum(by_key[(t, "kernel")]["risk_s"] for t in traces)
    g_risk = sum(by_key[(t, "guard")]["risk_s"] for t in traces)
    k_mem = sum(by_key[(t, "kernel")]["returned_avg_mib"] for t in traces)
    g_mem = sum(by_key[(t, "guard")]["returned_avg_mib"] for t in traces)
    risk_cut = 1 - g_risk / k_risk if k_risk else 0.0
    memory_ratio = g_mem / k_mem if k_mem else 0.0
    return {
        "per_trace": per_trace,
        "kernel_risk_s": round(k_risk, 1),
        "guard_risk_s": round(g_risk, 1),
        "risk_cut": risk_cut,
        "memory_ratio": memory_ratio,
        "pass": risk_cut >= RISK_CUT_TARGET and memory_ratio >= MEMORY_TARGET,
    }


def render(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    head = (f"{'trace':<10} {'policy':<7} {'returned MiB':>12} {'risk s':>7} {'risk %':>7} "
            f"{'stall s':>8} {'react mean/max s':>17} {'rises':>5} {'guard ticks':>11} "
            f"{'<goal s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        react = f"{_fmt(r['reaction_mean_s'], '.2f')}/{_fmt(r['reaction_max_s'], '.2f')}"
        lines.append(
            f"{r['trace']:<10} {r['policy']:<7} {r['returned_avg_mib']:>12.1f} "
            f"{r['risk_s']:>7.1f} {r['risk_pct']:>7.2f} {r['stall_s']:>8.1f} {react:>17} "
            f"{r['rises']:>5} {r['guard_ticks']:>11} {r['below_goal_s']:>8.1f}"
        )
    lines.append("")
    for trace, c in summary["per_trace"].items():
        cut = "n/a (no risk under the kernel policy)" if c["risk_cut"] is None \
            else f"{100 * c['risk_cut']:.0f}%"
        mem = "n/a" if c["memory_ratio"] is None else f"{100 * c['memory_ratio']:.1f}%"
        lines.append(f"{trace:<10} guard vs kernel: risk cut {cut}, memory returned {mem}")
    verdict = "PASS" if summary["pass"] else "FAIL"
    lines.append(
        f"summary: guard cuts OOM-risk time {summary['kernel_risk_s']:.1f}s -> "
        f"{summary['guard_risk_s']:.1f}s ({100 * summary['risk_cut']:.0f}%, target >= "
        f"{100 * RISK_CUT_TARGET:.0f}%) while returning {100 * summary['memory_ratio']:.1f}% as "
        f"much memory (target >= {100 * MEMORY_TARGET:.0f}%): {verdict}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    parser.add_argument("--burst-seeds", default="7",
                        help="comma-separated seeds for the bursts trace (default 7)")
    parser.add_argument("--traces", default=",".join(TRACES),
                        help=f"comma-separated traces to replay (default {','.join(TRACES)})")
    parser.add_argument("--duration", type=int, default=1800,
                        help="simulated seconds of the steady and bursts traces (default 1800; "
                             "ramp has a fixed shape of 1500 s)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.traces.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TRACES))
    if unknown or not names:
        parser.error(f"--traces: choose among {', '.join(TRACES)}")
    if args.duration < 300:
        parser.error("--duration must be >= 300 (bursts come every 1 to 3 minutes)")
    seeds = [int(s) for s in args.burst_seeds.split(",") if s.strip()]
    traces: list[Trace] = []
    if "steady" in names:
        traces.append(steady_trace(duration_s=args.duration))
    if "ramp" in names:
        traces.append(ramp_trace())
    if "bursts" in names:
        for seed in seeds:
            t = burst_trace(seed=seed, duration_s=args.duration)
            if len(seeds) > 1:
                t = Trace(f"bursts#{seed}", t.points)
            traces.append(t)
    rows = as_rows(run(traces))
    summary = compare(rows)
    if args.as_json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2))
    else:
        print(render(rows, summary))
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
