#!/usr/bin/env python3
"""Summarises a bench/compare.sh JSONL file: chatd against the reference server.

    python3 bench/ratios.py OUT.jsonl [PREFIX]

Reads the chat-bench lines whose label carries `server=... case=... pair=...` (written by
bench/compare.sh; PREFIX keeps only labels starting with it) and prints, per case, the medians
of each server, chatd's ratio to the reference (ratio of the medians, and the per-pair ratios
it summarises), the issue's target for that ratio, and the steal time of every run, as Markdown
tables ready for docs/performance.md. Runs labelled server=base (compare.sh's BASELINE=, an
older chatd build in the same rounds) get their own medians, their ratio to the reference, and
chatd's ratio to them (after / before).

Exit status: 1 if any run lost, duplicated, reordered or never-sent (bogus) a message, or its
receivers saw more than one order; 0 otherwise. Timeouts, errors and dropped connections are
listed but do not change the status (a timed-out idle run has no integrity to lose).
"""

import json
import statistics
import sys

# (key in a case's table, label, how to read it from a line, target on chatd/reference)
FANOUT_METRICS = [
    ("dps", "deliveries/s", lambda r: r.get("deliveries_per_s"), ">= 0.90"),
    (
        "dpc",
        "deliveries per server CPU-s",
        lambda r: (r.get("server") or {}).get("deliveries_per_cpu_s"),
        ">= 0.90",
    ),
    ("p50", "p50 latency (µs)", lambda r: (r.get("latency_us") or {}).get("p50"), ""),
    ("p99", "p99 latency (µs)", lambda r: (r.get("latency_us") or {}).get("p99"), ""),
    ("p999", "p99.9 latency (µs)", lambda r: (r.get("latency_us") or {}).get("p999"), ""),
    ("cpu", "server CPU (s)", lambda r: (r.get("server") or {}).get("cpu_s"), ""),
]
IDLE_METRICS = [
    (
        "rss",
        "RSS per joined connection (B)",
        lambda r: (r.get("server") or {}).get("rss_per_conn_bytes"),
        "chatd <= 4,096 B",
    ),
    ("seated", "all seated (s)", lambda r: r.get("all_seated_s"), ""),
    ("drained", "join storm drained (s)", lambda r: r.get("drained_s"), ""),
    (
        "peak",
        "peak RSS (KiB)",
        lambda r: (r.get("server") or {}).get("rss_peak_kib"),
        "",
    ),
]
# Targets that depend on the case rather than the metric.
CASE_TARGETS = {
    ("latency", "p99"): "<= 1.10",
    # The light-load case's target is its p99; its CPU figure is shown, not a target.
    ("latency", "dpc"): "",
    # Not a target: what one line costs when it reaches the room alone (see compare.sh).
    ("single1000", "dps"): "",
    ("single1000", "dpc"): "",
}
# In the latency case throughput is fixed by the rate; only latency and CPU are compared.
LATENCY_ONLY = {"dps"}


def parse_label(label):
    """`key=value` words of a compare.sh label."""
    fields = {}
    for word in label.split():
        if "=" in word:
            k, v = word.split("=", 1)
            fields[k] = v
    return fields


def fmt(v):
    if v is None:
        return "—"
    # Large figures (deliveries, bytes) are whole numbers; a median of two may end in .5.
    if isinstance(v, float) and abs(v) < 1000 and not v.is_integer():
        return f"{v:,.2f}"
    return f"{round(v):,}"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def integrity_faults(r):
    """What makes a fan-out run untrustworthy, as words; empty when clean."""
    if r.get("mode") != "fanout":
        return []
    faults = [k for k in ("lost", "duplicated", "reordered", "bogus") if r.get(k)]
    if (r.get("orders_seen") or 0) > 1:
        faults.append(f"{r['orders_seen']} orders")
    return faults


def other_problems(r):
    problems = []
    if r.get("timed_out"):
        problems.append("timed out")
    if r.get("errors"):
        problems.append(f"{r['errors']} errors ({r.get('first_error')})")
    if r.get("disconnected"):
        problems.append(f"{r['disconnected']} disconnected")
    if r.get("mode") == "idle" and r.get("still_open") != r.get("clients"):
        problems.append(f"{r.get('still_open')} of {r.get('clients')} still open")
    return problems


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    prefix = sys.argv[2] if len(sys.argv) > 2 else ""
    runs = []
    with open(sys.argv[1], encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            text = text.strip()
            if not text:
                continue
            try:
                r = json.loads(text)
            except json.JSONDecodeError as e:
                print(f"line {n}: not JSON ({e}); skipped", file=sys.stderr)
                continue
            label = r.get("label") or ""
            fields = parse_label(label)
            if not label.startswith(prefix) or not {"server", "case"} <= fields.keys():
                continue
            r["_f"] = fields
            runs.append(r)
    if not runs:
        print("no compare.sh runs found", file=sys.stderr)
        return 2

    cases = list(dict.fromkeys(r["_f"]["case"] for r in runs))
    bad = False
    for case in cases:
        of_case = [r for r in runs if r["_f"]["case"] == case]
        # "base" (BASELINE= in compare.sh: the build before a change) is optional.
        servers = [s for s in ("reference", "base", "chatd") if s != "base" or any(
            r["_f"]["server"] == "base" for r in of_case)]
        by = {s: [r for r in of_case if r["_f"]["server"] == s] for s in servers}
        has_base = "base" in by
        mode = of_case[0].get("mode")
        metrics = FANOUT_METRICS if mode == "fanout" else IDLE_METRICS
        if case == "latency":
            metrics = [m for m in metrics if m[0] not in LATENCY_ONLY]
        counts = ", ".join(f"{len(by[s])} {s}" for s in servers)
        print(f"### {case} ({counts} runs)\n")
        if has_base:
            print("| metric | reference median | base median | base / reference | chatd median "
                  "| chatd / reference | per-round chatd / reference | chatd / base | target |")
            print("|---|---|---|---|---|---|---|---|---|")
        else:
            print("| metric | reference median | chatd median | chatd / reference | per-pair ratios | target |")
            print("|---|---|---|---|---|---|")
        for key, name, get, target in metrics:
            med = {s: median(get(r) for r in by[s]) for s in servers}
            ref, ch = med["reference"], med["chatd"]

            def ratio(a, b):
                return a / b if b and a is not None else None

            def show(x):
                return "—" if x is None else f"**{x:.3f}**"

            pairs = {}
            for r in of_case:
                pairs.setdefault(r["_f"].get("pair"), {})[r["_f"]["server"]] = get(r)
            per_pair = [
                p["chatd"] / p["reference"]
                for p in pairs.values()
                if p.get("reference") and p.get("chatd") is not None
            ]
            target = CASE_TARGETS.get((case, key), target)
            per = ", ".join(f"{x:.2f}" for x in per_pair) or "—"
            if has_base:
                base = med["base"]
                print(
                    f"| {name} | {fmt(ref)} | {fmt(base)} | {show(ratio(base, ref))} | {fmt(ch)} | "
                    f"{show(ratio(ch, ref))} | {per} | {show(ratio(ch, base))} | {target} |"
                )
            else:
                print(f"| {name} | {fmt(ref)} | {fmt(ch)} | {show(ratio(ch, ref))} | {per} | {target} |")
        print()
        for s in servers:
            steal = ", ".join(
                f"{r.get('steal_pct', '—')}" for r in by[s]
            )
            loads = ", ".join(r["_f"].get("load", "—") for r in by[s])
            print(f"- {s}: steal % per run: {steal or '—'}; load at start: {loads or '—'}")
        for r in of_case:
            where = f"{r['_f']['server']} pair {r['_f'].get('pair')}"
            faults = integrity_faults(r)
            if faults:
                bad = True
                print(f"- **{where}: {', '.join(faults)}**")
            problems = other_problems(r)
            if problems:
                print(f"- {where}: {'; '.join(problems)}")
        clean = all(not integrity_faults(r) for r in of_case)
        if mode == "fanout":
            print(f"- lost / duplicated / reordered / orders: {'none in any run' if clean else 'SEE ABOVE'}")
        print()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
