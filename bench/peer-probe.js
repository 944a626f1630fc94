// Loaded into each `peersan peer` process by bench/migration-latency.js (NODE_OPTIONS=--require):
// once a second, appends one JSON line to $PEERSAN_PROBE_FILE with that second's garbage
// collections (V8 pauses: count, total and longest, major = mark-compact) and event-loop delay
// (p99, max). A stall of the portal's event loop stalls every request in flight, so these
// explain a latency tail the per-request times alone cannot. Cheap: a gc observer and a 10 ms
// event-loop histogram.
'use strict';

const fs = require('node:fs');
const { PerformanceObserver, monitorEventLoopDelay, constants } = require('node:perf_hooks');

const file = process.env.PEERSAN_PROBE_FILE;
if (file) {
  let second = { gcs: 0, gcMs: 0, gcMaxMs: 0, majorGcs: 0, majorGcMs: 0 };
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      second.gcs++;
      second.gcMs += e.duration;
      second.gcMaxMs = Math.max(second.gcMaxMs, e.duration);
      if (e.detail?.kind === constants.NODE_PERFORMANCE_GC_MAJOR) {
        second.majorGcs++;
        second.majorGcMs += e.duration;
      }
    }
  }).observe({ entryTypes: ['gc'] });
  const loop = monitorEventLoopDelay({ resolution: 10 });
  loop.enable();
  setInterval(() => {
    const line = { t: Date.now(), ...second, loopP99Ms: loop.percentile(99) / 1e6, loopMaxMs: loop.max / 1e6 };
    fs.appendFileSync(file, JSON.stringify(line) + '\n');
    second = { gcs: 0, gcMs: 0, gcMaxMs: 0, majorGcs: 0, majorGcMs: 0 };
    loop.reset();
  }, 1000).unref();
}
