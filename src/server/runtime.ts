// V8 settings for a process that serves block I/O (`peersan peer`, `peersan demo`).
//
// Forwarding at a few thousand requests a second makes V8 grow the young generation to its
// maximum (16 MiB per semi-space). After each mark-compact V8 sets the old generation's limit
// to a small multiple of what survived (about 17 MiB live → 40 MiB); once the room left under
// that limit is smaller than the young generation, V8 starts incremental marking at once, so
// a portal that forwards ran a mark-compact every 150 ms (5-6 a second), each a 2-10 ms pause
// plus marking steps on the event loop: the latency tail of every request in flight. A fixed
// growing factor of 4 leaves the old generation room to grow between mark-compacts (they
// become rare: 0.1/s) for some tens of MiB of heap. Measured with bench/migration-latency.js's
// group (4 KiB random writes, depth 8, through p1, 2/3 forwarded): p99 11.0 ms → 3.1 ms,
// IOPS 5,457 → 7,735.
//
// v8.setFlagsFromString takes effect for this flag at run time (V8 reads it at each
// mark-compact); a --heap-growing-percent given to node itself wins.

import { setFlagsFromString } from 'node:v8';

export const heapGrowingPercent = 300;

export function tuneHeapForServing(): void {
  if (process.execArgv.some((a) => a.startsWith('--heap-growing-percent') || a.startsWith('--heap_growing_percent'))) return;
  setFlagsFromString(`--heap-growing-percent=${heapGrowingPercent}`);
}
