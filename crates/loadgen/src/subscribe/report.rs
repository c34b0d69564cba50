//! The figures of a run, from the orchestrator's readings and the merged tally: printed as a table
//! and, with `--json`, written as JSON.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::phases::Phases;
use super::tally::Tally;
use super::{Shared, SubscribeArgs};

/// The reconnects of resuming subscribers, timed from the SIGTERM (or the first drop).
fn resume_figures(tally: &Tally, phases: &Phases) -> Value {
    let from_ns = phases
        .killed
        .as_ref()
        .map(|(at, _)| *at)
        .or_else(|| tally.resumes.iter().map(|r| r.dropped_ns).min());
    let since =
        |ns: Option<u64>| -> Option<f64> { Some(ns?.saturating_sub(from_ns?) as f64 / 1e9) };
    let mut drop_to_caught_up_us: Vec<u32> = tally
        .resumes
        .iter()
        .map(|r| {
            (r.caught_up_ns.saturating_sub(r.dropped_ns) / 1000).min(u64::from(u32::MAX)) as u32
        })
        .collect();
    drop_to_caught_up_us.sort_unstable();
    let ms = |p: f64| crate::percentile(&drop_to_caught_up_us, p);
    // How many sockets were cut within one second at most (a mass close shows as one second
    // holding them all).
    let mut drops_per_second = std::collections::BTreeMap::<u64, u64>::new();
    for resumed in &tally.resumes {
        *drops_per_second
            .entry(resumed.dropped_ns / 1_000_000_000)
            .or_insert(0) += 1;
    }
    json!({
        "reconnects": tally.resumes.len(),
        "gave_up": tally.gave_up,
        "unrecovered": tally.unrecovered,
        "last_resubscribed_s": since(tally.resumes.iter().map(|r| r.resubscribed_ns).max()),
        "last_caught_up_s": since(tally.resumes.iter().map(|r| r.caught_up_ns).max()),
        "drop_to_caught_up_ms": {"p50": ms(50.0), "p99": ms(99.0), "max": ms(100.0)},
        "most_drops_in_one_second": drops_per_second.values().max().copied().unwrap_or(0),
    })
}

/// Prints the figures and, with --json, writes them to that file.
pub(super) fn report(
    args: &SubscribeArgs,
    shared: &Shared,
    mut tally: Tally,
    phases: Phases,
) -> Result<(), String> {
    let warmups = args.pks.len();
    let established = shared.established.load(Ordering::Relaxed);
    let ramp_secs = (shared.last_established_ns.load(Ordering::Relaxed) as f64
        - phases.ramp_started_ns as f64)
        / 1e9;
    let connections_per_sec = if ramp_secs > 0.0 {
        established as f64 / ramp_secs
    } else {
        f64::NAN
    };
    tally.handshake_us.sort_unstable();

    // Deliveries of measured events, and per event the latest one.
    let measured = phases.expected.len();
    let mut latencies_us: Vec<u32> = Vec::with_capacity(tally.receipts.len());
    let mut last_us: Vec<Option<u32>> = vec![None; measured];
    let mut first_us: Vec<Option<u32>> = vec![None; measured];
    let mut received: Vec<u64> = vec![0; measured];
    let mut last_receipt_ns = 0u64;
    for (index, at_ns) in &tally.receipts {
        let index = *index as usize;
        if index < warmups || index - warmups >= measured {
            continue;
        }
        let published = shared.published_ns[index].load(Ordering::Relaxed);
        let latency = (at_ns.saturating_sub(published) / 1000).min(u64::from(u32::MAX)) as u32;
        latencies_us.push(latency);
        let k = index - warmups;
        received[k] += 1;
        last_us[k] = Some(last_us[k].map_or(latency, |l| l.max(latency)));
        first_us[k] = Some(first_us[k].map_or(latency, |f| f.min(latency)));
        last_receipt_ns = last_receipt_ns.max(*at_ns);
    }
    latencies_us.sort_unstable();
    let mut last_sorted: Vec<u32> = last_us.iter().flatten().copied().collect();
    last_sorted.sort_unstable();
    let expected_total: u64 = phases.expected.iter().sum();
    let missing: u64 = phases
        .expected
        .iter()
        .zip(&received)
        .map(|(want, got)| want.saturating_sub(*got))
        .sum();
    let duplicates: u64 = tally.duplicates
        + phases
            .expected
            .iter()
            .zip(&received)
            .map(|(want, got)| got.saturating_sub(*want))
            .sum::<u64>();
    let resume = resume_figures(&tally, &phases);
    tally.renewal_us.sort_unstable();
    let delivered = latencies_us.len() as u64;
    let first_publish_ns = (warmups..warmups + measured)
        .map(|i| shared.published_ns[i].load(Ordering::Relaxed))
        .filter(|ns| *ns > 0)
        .min()
        .unwrap_or(phases.events_started_ns);
    let delivery_secs = (last_receipt_ns.saturating_sub(first_publish_ns)) as f64 / 1e9;
    let messages_per_sec = if delivery_secs > 0.0 {
        delivered as f64 / delivery_secs
    } else {
        f64::NAN
    };
    let per_connection = |rss: Option<u64>| match (phases.rss_before, rss) {
        (Some(before), Some(after)) if established > 0 => {
            Some((after as f64 - before as f64) / established as f64)
        }
        _ => None,
    };
    // Fan-out speed while events are being delivered: deliveries over the time during which at
    // least one event was on its way (the union of each event's publish-to-last-receipt span).
    let mut spans: Vec<(u64, u64)> = last_us
        .iter()
        .enumerate()
        .filter_map(|(k, last)| {
            let published = shared.published_ns[warmups + k].load(Ordering::Relaxed);
            last.map(|us| (published, published + u64::from(us) * 1000))
        })
        .collect();
    spans.sort_unstable();
    let mut busy_ns = 0u64;
    let mut covered_until = 0u64;
    for (start, end) in spans {
        let start = start.max(covered_until);
        if end > start {
            busy_ns += end - start;
            covered_until = end;
        }
    }
    let busy_secs = busy_ns as f64 / 1e9;
    let burst_per_sec = if busy_secs > 0.0 {
        delivered as f64 / busy_secs
    } else {
        f64::NAN
    };
    let per_delivery_us = |cpu: Option<f64>| {
        cpu.filter(|_| delivered > 0)
            .map(|secs| secs * 1e6 / delivered as f64)
    };
    // Per published event, whatever the number of its subscribers: what routing by key bounds.
    let per_event_us = |cpu: Option<f64>| {
        cpu.filter(|_| measured > 0)
            .map(|secs| secs * 1e6 / measured as f64)
    };
    let ms = |sorted: &[u32], p: f64| crate::percentile(sorted, p);

    let figures = json!({
        "scenario": "subscribe carModelUpdated",
        "protocol": args.protocol.name(),
        "connections": args.connections,
        "pks": args.pks.len(),
        "distribution": format!("{:?}", args.distribution),
        "hot_subscribers": args.hot_subscribers,
        "burst": args.burst,
        "threads": args.threads,
        "rate": args.rate,
        "established": established,
        "connections_per_second": connections_per_sec,
        "ramp_seconds": ramp_secs,
        "handshake_ms": {
            "p50": ms(&tally.handshake_us, 50.0),
            "p99": ms(&tally.handshake_us, 99.0),
            "max": ms(&tally.handshake_us, 100.0),
        },
        "live_at_idle": phases.live_at_idle,
        "warmup_complete": phases.warmup_complete,
        "events": measured,
        "events_per_second": args.events_per_sec,
        "deliveries": delivered,
        "deliveries_expected": expected_total,
        "messages_per_second": messages_per_sec,
        "first_publish_to_last_delivery_seconds": delivery_secs,
        "messages_per_second_while_delivering": burst_per_sec,
        "delivery_ms": {
            "p50": ms(&latencies_us, 50.0),
            "p99": ms(&latencies_us, 99.0),
            "max": ms(&latencies_us, 100.0),
        },
        "last_delivery_per_event_ms": {
            "p50": ms(&last_sorted, 50.0),
            "p99": ms(&last_sorted, 99.0),
            "max": ms(&last_sorted, 100.0),
        },
        // Event by event, in publishing order: when its first and its last subscriber had it
        // (null: nobody did). A slow event with a late first delivery was held up before the
        // fan-out (Redis, the hub, the execution); one with an early first, during it.
        // (Left out past 100,000 events: the file would hold millions of numbers.)
        "by_event_ms": (measured <= 100_000).then(|| json!({
            "first": first_us.iter().map(|us| us.map(|us| f64::from(us) / 1000.0)).collect::<Vec<_>>(),
            "last": last_us.iter().map(|us| us.map(|us| f64::from(us) / 1000.0)).collect::<Vec<_>>(),
        })),
        "errors": {
            "connect": tally.connect_errors,
            "closes": tally.closes,
            "protocol": tally.protocol_errors,
            "publish": phases.publish_errors,
            "missing_deliveries": missing,
            // Of the missing, those the subscribers were told of (`extensions.skipped`); the
            // rest were lost without a word. With other loadgens publishing to the same keys,
            // the told include skips of their events: the untold are then a lower bound.
            "skipped_told": tally.skipped_told,
            "missing_untold": missing.saturating_sub(tally.skipped_told),
            "duplicate_deliveries": duplicates,
            "foreign_deliveries": tally.foreign,
        },
        "keepalives": tally.keepalives,
        "gateway_rss_kib": {
            "before": phases.rss_before,
            "idle": phases.rss_idle,
            "end": phases.rss_end,
            "idle_per_connection": per_connection(phases.rss_idle),
            "end_per_connection": per_connection(phases.rss_end),
        },
        "cpu_seconds": {
            "ramp": {"gateway": phases.cpu_ramp.gateway, "loadgen": phases.cpu_ramp.loadgen},
            "events": {"gateway": phases.cpu_events.gateway, "loadgen": phases.cpu_events.loadgen},
            "gateway_us_per_delivery": per_delivery_us(phases.cpu_events.gateway),
            "gateway_us_per_event": per_event_us(phases.cpu_events.gateway),
            "loadgen_us_per_delivery": per_delivery_us(phases.cpu_events.loadgen),
        },
        "stopped_by_cap": phases.stopped_by_cap,
        "seconds": (phases.events_ended_ns as f64) / 1e9,
        "resume": resume,
        "renewals": {
            "every_secs": args.renew_every_secs,
            "token_lifetime_secs": args.token_lifetime_secs,
            "sent": tally.renewals_sent,
            "answered": tally.renewal_us.len(),
            "ping_to_pong_ms": {
                "p50": ms(&tally.renewal_us, 50.0),
                "p99": ms(&tally.renewal_us, 99.0),
                "max": ms(&tally.renewal_us, 100.0),
            },
        },
    });

    println!(
        "subscribe {} ({}), {} threads: {}/{} established in {:.2} s = {:.0} conn/s; handshake p50 {:.2} ms, p99 {:.2} ms",
        args.protocol.name(),
        match args.pks.len() {
            1 => format!("pk {}", args.pks[0]),
            2..=8 => format!("pks {:?}", args.pks),
            n => format!("{n} pks, {:?}", args.distribution),
        },
        args.threads,
        established,
        args.connections,
        ramp_secs,
        connections_per_sec,
        ms(&tally.handshake_us, 50.0),
        ms(&tally.handshake_us, 99.0),
    );
    if !phases.warmup_complete {
        println!("  warm-up: not every subscriber got the warm-up event in time");
    }
    println!(
        "{:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "events",
        "deliver",
        "missing",
        "msg/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "last p50",
        "last p99",
        "last max"
    );
    println!(
        "{:>7} {:>9} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
        measured,
        delivered,
        missing,
        messages_per_sec,
        ms(&latencies_us, 50.0),
        ms(&latencies_us, 99.0),
        ms(&latencies_us, 100.0),
        ms(&last_sorted, 50.0),
        ms(&last_sorted, 99.0),
        ms(&last_sorted, 100.0),
    );
    if tally.skipped_told > 0 {
        println!(
            "conflated: {} deliveries skipped and said so (extensions.skipped); missing and not told: {}",
            tally.skipped_told,
            missing.saturating_sub(tally.skipped_told)
        );
    }
    let secs = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    println!(
        "fan-out while delivering: {burst_per_sec:.0} msg/s; first publish to last delivery {delivery_secs:.3} s; CPU s during events: gateway {} ({} µs/delivery, {} µs/event), loadgen {} ({} µs/delivery); during ramp: gateway {}, loadgen {}",
        secs(phases.cpu_events.gateway),
        secs(per_delivery_us(phases.cpu_events.gateway)),
        secs(per_event_us(phases.cpu_events.gateway)),
        secs(phases.cpu_events.loadgen),
        secs(per_delivery_us(phases.cpu_events.loadgen)),
        secs(phases.cpu_ramp.gateway),
        secs(phases.cpu_ramp.loadgen),
    );
    let kib = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    let per = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    if args.gateway_pid.is_some() {
        println!(
            "gateway RSS KiB: before {}, idle {} ({} KiB/conn), end {} ({} KiB/conn)",
            kib(phases.rss_before),
            kib(phases.rss_idle),
            per(per_connection(phases.rss_idle)),
            kib(phases.rss_end),
            per(per_connection(phases.rss_end)),
        );
    }
    for (label, map) in [
        ("connect error", &figures["errors"]["connect"]),
        ("closed", &figures["errors"]["closes"]),
        ("protocol message", &figures["errors"]["protocol"]),
        ("publish error", &figures["errors"]["publish"]),
    ] {
        if let Some(map) = map.as_object() {
            for (kind, n) in map {
                println!("  {label} {kind}: {n}");
            }
        }
    }
    if duplicates > 0 || tally.foreign > 0 {
        println!(
            "  duplicate deliveries: {duplicates}, foreign: {}",
            tally.foreign
        );
    }
    if args.resume || args.kill_pid.is_some() {
        let s = |v: &Value| v.as_f64().map_or("-".to_owned(), |v| format!("{v:.2}"));
        println!(
            "resume: {} reconnects, {} gave up, {} recovered:false; from {}: last resubscribed +{} s, last caught up +{} s; drop → caught up per reconnect p50 {} ms, p99 {} ms, max {} ms",
            resume["reconnects"],
            resume["gave_up"],
            resume["unrecovered"],
            if phases.killed.is_some() { "the SIGTERM" } else { "the first drop" },
            s(&resume["last_resubscribed_s"]),
            s(&resume["last_caught_up_s"]),
            s(&resume["drop_to_caught_up_ms"]["p50"]),
            s(&resume["drop_to_caught_up_ms"]["p99"]),
            s(&resume["drop_to_caught_up_ms"]["max"]),
        );
        if let Some((_, Err(err))) = &phases.killed {
            println!("  kill failed: {err}");
        }
    }
    if args.renew_every_secs.is_some() {
        println!(
            "renewals: {} sent, {} answered with the new exp; ping → pong p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            tally.renewals_sent,
            tally.renewal_us.len(),
            ms(&tally.renewal_us, 50.0),
            ms(&tally.renewal_us, 99.0),
            ms(&tally.renewal_us, 100.0),
        );
    }
    if phases.stopped_by_cap {
        println!("  stopped by --max-seconds");
    }
    crate::write_figures(args.json.as_deref(), &figures)?;
    Ok(())
}
