"""The bench's results: ratios, the RSS trend, the printed table and the JSON file."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

RAW = "raw_aiokafka"
TEXTBOOK = "textbook_faust"
QUIX = "quix_streams"
FINFLOW = ("finflow_sink_off", "finflow_sink_on")
LABELS = {
    RAW: "raw aiokafka + orjson",
    TEXTBOOK: "textbook Faust (windowed table)",
    QUIX: "Quix Streams 3.28.1",
    "finflow_sink_off": "FinFlow, storage off",
    "finflow_sink_on": "FinFlow, storage and cache on",
}


READ_LABELS = {
    "redis_get": "baseline: redis-py GET of the key",
    "api_healthz": "baseline: finflow api /healthz",
    "worker_healthz": "baseline: worker /healthz",
    "cached": "cached: finflow api from Redis",
    "uncached_owner": "uncached: owner worker's table",
    "uncached_api": "uncached: finflow api miss -> owner",
    "cached_under_load": "cached, writes at {rate}/s",
    "uncached_owner_under_load": "uncached owner, writes at {rate}/s",
}


def ratios(contenders: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Each measured contender's msg/s over the raw and the textbook baselines'; for FinFlow's,
    also each peer's process CPU per event over the worker process's per transaction (above
    1: the worker spends less CPU on a transaction than the peer on an event)."""
    raw = contenders[RAW]["msg_per_s"]
    textbook = contenders[TEXTBOOK]["msg_per_s"]
    out = {
        name: {"vs_raw": c["msg_per_s"] / raw, "vs_textbook": c["msg_per_s"] / textbook}
        for name, c in contenders.items()
        if "msg_per_s" in c
    }
    for name in FINFLOW:
        worker_us = contenders.get(name, {}).get("cpu", {}).get("worker_us_per_txn", 0.0)
        for peer in (TEXTBOOK, QUIX):
            peer_us = contenders.get(peer, {}).get("process_cpu_us_per_txn", 0.0)
            if worker_us > 0 and peer_us > 0:
                out[name][f"cpu_per_txn_vs_{peer}"] = peer_us / worker_us
    return out


def trend(points: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Start, end, max and the least-squares slope per minute of (seconds, MB) samples."""
    if not points:
        return {}
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0
    return {
        "start_mb": points[0][1],
        "end_mb": points[-1][1],
        "max_mb": max(v for _, v in points),
        "slope_mb_per_min": slope * 60,
        "samples": float(n),
        "seconds": points[-1][0] - points[0][0],
    }


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.0f}"


def _latency(lat: Mapping[str, Any] | None) -> str:
    if not lat:
        return ""
    return "/".join(_ms(lat[k]) for k in ("p50", "p95", "p99"))


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """``rows`` (the first one the header) as left-aligned columns, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def table(results: Mapping[str, Any]) -> str:
    """One table: contender, records timed, msg/s, vs raw, vs textbook, latency percentiles."""
    head = (
        "contender",
        "records",
        "msg/s",
        "vs raw",
        "vs textbook",
        "apply p50/95/99 ms",
        "readable p50/95/99 ms",
    )
    rows = [head]
    cons, rat = results["contenders"], results["ratios"]
    for name, c in cons.items():
        if "msg_per_s" not in c:
            rows.append((LABELS[name], "", "n/a", "", "", str(c.get("error", ""))[:70], ""))
            continue
        records = f"{c['records']:,.0f}" + ("" if c.get("complete", True) else " (timed)")
        r = rat[name]
        rows.append(
            (
                LABELS[name],
                records,
                f"{c['msg_per_s']:,.0f}",
                f"{r['vs_raw']:.4f}",
                f"{r['vs_textbook']:.2f}",
                "",
                "",
            )
        )
    for ph in results["sustained"]:
        rows.append(
            (
                f"FinFlow sustained {ph['fraction']:.0%} ({ph['target_msg_per_s']:,.0f}/s)",
                f"{ph['produced']:,.0f}",
                f"{ph['msg_per_s']:,.0f}",
                f"{ph['vs_raw']:.4f}",
                f"{ph['vs_textbook']:.2f}",
                _latency(ph["apply_latency_s"]),
                _latency(ph["readable_latency_s"]),
            )
        )
    lines = _aligned(rows)
    return "\n".join(line.rstrip() for line in lines)


def _us_and_cores(cpu: Mapping[str, Any], part: str) -> str:
    return f"{cpu['us_per_txn'][part]:.1f} ({cpu['cores'][part]:.2f})"


def cpu_table(results: Mapping[str, Any]) -> str:
    """Where the time goes: CPU microseconds per transaction of each part of the machine,
    storage off and on, the rates those costs allow, and the peers' own processes."""
    cons = results["contenders"]
    measured = [name for name in FINFLOW if "cpu" in cons.get(name, {})]
    if not measured:
        return "where the time goes: not measured"
    head = ("CPU us per transaction (cores)", *(LABELS[name] for name in measured))
    cpus = [cons[n]["cpu"] for n in measured]
    rows = [head]
    for part in cpus[0]["us_per_txn"]:
        rows.append((part, *(_us_and_cores(c, part) for c in cpus)))
    for label, key in (("worker process", "worker_us_per_txn"), ("total", "total_us_per_txn")):
        rows.append((label, *(f"{c[key]:.1f}" for c in cpus)))
    for label, key in (
        ("rate with every CPU busy (msg/s)", "machine_bound_msg_per_s"),
        ("rate with the event loop always busy", "event_loop_bound_msg_per_s"),
    ):
        rows.append((label, *(f"{c[key]:,.0f}" for c in cpus)))
    lines = _aligned(rows)
    peers = [
        f"{LABELS[p]} {cons[p]['process_cpu_us_per_txn']:.1f} us"
        for p in (TEXTBOOK, QUIX)
        if "process_cpu_us_per_txn" in cons.get(p, {})
    ]
    if peers:
        lines.append("peers' own processes (all threads) per event: " + ", ".join(peers))
    return "\n".join(line.rstrip() for line in lines)


def _cores(cpu: Mapping[str, float], served_by: str) -> str:
    return "/".join(f"{cpu.get(k, 0.0):.2f}" for k in ("client", served_by, "machine"))


def reads_table(results: Mapping[str, Any]) -> str:
    """The read path: one row per measurement, latency in ms, ratios to the HTTP baseline."""
    reads = results.get("reads", {})
    if "measurements" not in reads:
        return f"read path: not measured: {reads.get('error', 'skipped')}"
    conf, measured, rat = reads["config"], reads["measurements"], reads["ratios"]
    head = (
        f"read path ({conf['clients']} clients, {conf['seconds']:g} s each)",
        "served by",
        "requests",
        "req/s",
        "req/CPU-s",
        "p50/p95/p99/max ms",
        "p99 vs http",
        "req/s vs http",
        "CPU client/server/machine",
        "writes applied/s",
    )
    rows = [head]
    for name, m in measured.items():
        lat, r = m["latency_ms"], rat.get(name, {})
        rate = m.get("load", {}).get("target_msg_per_s", 0.0)
        rows.append(
            (
                READ_LABELS.get(name, name).format(rate=f"{rate:,.0f}"),
                m["served_by"],
                f"{m['requests']:,}",
                f"{m['req_per_s']:,.0f}",
                f"{m['req_per_cpu_s']:,.0f}",
                "/".join(f"{lat[k]:.2f}" for k in ("p50", "p95", "p99", "max")),
                f"{r['p99_vs_http']:.2f}" if r else "",
                f"{r['req_per_s_vs_http']:.2f}" if r else "",
                _cores(m["cpu_cores"], m["served_by"]),
                f"{m['applied_msg_per_s']:,.0f}" if "load" in m else "",
            )
        )
    lines = _aligned(rows)
    for key, v in rat.items():
        if "_vs_" in key and "p99_speedup" in v:
            fast, slow = key.split("_vs_")
            lines.append(
                f"{fast} vs {slow}: p50 {v['p50_speedup']:.2f}x, p99 {v['p99_speedup']:.2f}x"
                f" faster; req/s {v['req_per_s_gain']:.2f}x, req/CPU-s"
                f" {v['req_per_cpu_s_gain']:.2f}x (above 1: the cache wins)"
            )
    under = {n: m["load"] for n, m in measured.items() if "load" in m}
    if under:
        lines.append(
            "under load the worker applied "
            + ", ".join(f"{v['applied_msg_per_s']:,.0f}/s during {n}" for n, v in under.items())
            + f"; {next(iter(under.values()))['phase_applied_msg_per_s']:,.0f}/s during both"
            + f" (loadgen target {next(iter(under.values()))['target_msg_per_s']:,.0f}/s)"
        )
    target = reads["target"]
    lines.append(
        f"target p99 < {target['p99_ms']:g} ms for cached reads: quiet"
        f" {measured['cached']['latency_ms']['p99']:.2f} ms"
        f" ({'met' if target['cached_met'] else 'NOT met'}), under load"
        f" {measured['cached_under_load']['latency_ms']['p99']:.2f} ms"
        f" ({'met' if target['cached_under_load_met'] else 'NOT met'})"
    )
    return "\n".join(line.rstrip() for line in lines)


def summary(results: Mapping[str, Any]) -> str:
    """Memory, recovery and machine load under the table."""
    rss, rec, machine = results["rss"], results["recovery"], results["machine"]
    lines: list[str] = []
    warm = results.get("warmup")
    if warm and warm["rss"]:
        lines.append(
            f"worker RSS during the {warm['seconds']:.0f} s warm-up (not measured):"
            f" {warm['rss']['start_mb']:.0f} -> {warm['rss']['end_mb']:.0f} MB"
        )
    lines.append(
        f"worker RSS over the sustained phases: {rss['start_mb']:.0f} -> {rss['end_mb']:.0f} MB"
        f" (max {rss['max_mb']:.0f}, {rss['slope_mb_per_min']:+.1f} MB/min)"
    )
    rocks = results.get("rocksdb_memory")
    if rocks:
        lines.append(
            f"  of which RocksDB (memtables, block cache, table readers):"
            f" {rocks['start_mb']:.0f} -> {rocks['end_mb']:.0f} MB (max {rocks['max_mb']:.0f})"
        )
    stored = results.get("contenders", {}).get("finflow_sink_on", {})
    if "cache_published_by_resync" in stored:
        lines.append(
            f"Redis cache (storage and cache on): {stored['cache_published']:,.0f} account values"
            f" written, {stored['cache_published_by_resync']:,.0f} of them by resyncs of whole"
            " partitions (each partition's first sync after its assignment, which reads what"
            " the first batches wrote; more is a publisher that fell behind)"
        )
    lines += [
        f"recovery after kill -9: /readyz 200 after {rec['start_to_ready_s']:.1f} s, of which"
        f" {rec['changelog_read_s']:.1f} s reading {rec['changelog_records']:,} changelog records"
        f" ({rec['changelog_records_per_s']:,.0f}/s)",
        f"load average (1 min) at start {machine['loadavg_1m_start']:.2f}, at end"
        f" {machine['loadavg_1m_end']:.2f} on {machine['cpus']} CPUs",
    ]
    if machine["loadavg_1m_start"] > 1.0:
        lines.append("note: the machine was busy before the bench started; rates are low")
    return "\n".join(lines)


def write(path: Path, results: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
