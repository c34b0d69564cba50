#!/usr/bin/env python3
"""Samples a URL (a gateway's /healthz) every INTERVAL seconds until SIGTERM, and a process's
resident memory; then prints one JSON line: how many samples, how many took over 100 ms or
failed (2 s timeout), the slowest, and the RSS's peak and last value.

    health-sampler.py URL PID [INTERVAL]
"""
import json, signal, sys, time, urllib.request

url, pid = sys.argv[1], int(sys.argv[2])
interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
times, failed, rss = [], 0, []
running = True


def stop(*_):
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)


def rss_kib():
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None


while running:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            response.read()
        times.append((time.monotonic() - started) * 1000)
    except Exception:
        failed += 1
    kib = rss_kib()
    if kib is not None:
        rss.append(kib)
    time.sleep(max(0.0, interval - (time.monotonic() - started)))

print(json.dumps({
    "samples": len(times) + failed,
    "failed": failed,
    "over_100ms": sum(1 for t in times if t > 100),
    "max_ms": round(max(times), 2) if times else None,
    "p50_ms": round(sorted(times)[len(times) // 2], 2) if times else None,
    "rss_peak_kib": max(rss) if rss else None,
    "rss_end_kib": rss[-1] if rss else None,
}))
