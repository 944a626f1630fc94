#!/usr/bin/env node
// What a second copy costs (issue 17, acceptance 6): a replicated volume (--replicas 2) next to
// an unreplicated one (--replicas 1), same group, same run, same portal.
//
//   npm run build && node bench/replication.js [--size-mib 512] [--seconds 5] [--repeat 5] [--replicas 2]
//
// A group of three `peersan peer` processes on etcd (bench/lib/group.js: balancer and host
// balancing off, so no page or host moves during the run); two volumes of --size-mib spread over
// the three by the placement rule, `r1` with one copy of each page and `rN` with --replicas, both
// filled completely with the same random data first (a thin grain reads without I/O). Every
// figure is taken through p1's portal (so for both volumes 2/3 of the primaries are elsewhere and
// their requests forwarded), --repeat times alternating which volume goes first, median printed:
//   4 KiB random write, QD32 (IOPS)      qemu-io aio_write at random offsets, 32 outstanding
//                                        (bench/lib/group.js hostWrites), and its p99 latency
//   128 KiB sequential write, QD16 (MB/s) qemu-img bench -w -s 131072 -d 16
//   4 KiB random read, QD32 (IOPS)       iscsi-perf -r -b 8 -m 32
//   128 KiB sequential read, QD16 (MB/s)  iscsi-perf -b 256 -m 16
// and CPU µs per operation of the three peer processes together (bench/lib/cpu.js: utime+stime
// of all threads, from /proc, sampled around each measurement; the peers run without the GC
// probe; the client's, qemu-io / qemu-img / iscsi-perf, printed apart and in no ratio),
// and the ratios replicated / unreplicated of both (aims: random writes ≥ 0.6, sequential writes ≥ 0.5,
// reads unchanged: reads are served by the primary alone). The failover pause is the soak's
// (bench/failover-soak.js). Needs etcd, qemu-io/qemu-img with the iscsi driver, iscsi-perf,
// stdbuf. Results also go to bench/results/replication-<time>.json. Run time: 8 x --repeat
// measurements of about --seconds plus the fill: 4 minutes for --size-mib 256 --seconds 4 on
// the 2-core box (loaded), so about 6 with the defaults.
'use strict';

const {
  parseArgs, startPeersan, fillRandom, hostWrites, summarize, iscsiPerf, qemuImgWrites, median, round2, loadNow, machine, saveResults, runBench,
} = require('./lib/group');
const { withCpu } = require('./lib/cpu');

const args = parseArgs({ sizeMib: 512, seconds: 5, repeat: 5, replicas: 2 }, { '--size-mib': 'sizeMib', '--seconds': 'seconds', '--repeat': 'repeat', '--replicas': 'replicas' });
const mib = 1024 * 1024;

const figures = [
  {
    name: '4 KiB random write, QD32 (IOPS)', unit: 'iops', aim: 0.6,
    measure: async (url) => {
      const r = await hostWrites(url, args.sizeMib * mib, args.seconds, { depth: 32, writeBytes: 4096 });
      const s = summarize(r);
      if (s.errors) throw new Error(`${s.errors} writes failed on ${url}`);
      // The CPU window holds the warm-up too: every write done counts.
      return { iops: s.iops, p99Us: s.p99Us, ops: r.completed };
    },
  },
  // Enough 128 KiB writes for about --seconds at 200 MB/s; qemu-img wraps at the end of the volume.
  { name: '128 KiB sequential write, QD16 (MB/s)', unit: 'mbps', aim: 0.5, measure: (url) => qemuImgWrites(url, { bytes: 128 * 1024, depth: 16, count: args.seconds * 1600 }) },
  { name: '4 KiB random read, QD32 (IOPS)', unit: 'iops', aim: 0.9, measure: (url) => iscsiPerf(url, ['-r', '-b', '8', '-m', '32'], args.seconds) },
  { name: '128 KiB sequential read, QD16 (MB/s)', unit: 'mbps', aim: 0.9, measure: (url) => iscsiPerf(url, ['-b', '256', '-m', '16'], args.seconds) },
];

async function main() {
  // The group's own volume `bench` stays small and unused: the two measured volumes are made here.
  const pc = await startPeersan(16 * mib, 512, { probe: false });
  const processes = Object.fromEntries(pc.peers.map((p) => [p.id, p.pid]));
  const help = await pc.cli('volume', 'create', '--help');
  if (!/--replicas\b/.test(help)) throw new Error('the CLI has no `volume create --replicas`: this bench needs replicated volumes (issue 17)');
  const url = (volume) => `iscsi://127.0.0.1:${pc.peers[0].iscsi}/iqn.2026-11.io.peersan:${volume}/0`;
  const volumes = { unreplicated: 'r1', replicated: `r${args.replicas}` };
  await pc.cli('volume', 'create', volumes.unreplicated, '--size', `${args.sizeMib}M`, '--replicas', '1');
  await pc.cli('volume', 'create', volumes.replicated, '--size', `${args.sizeMib}M`, '--replicas', String(args.replicas));
  await fillRandom(Object.values(volumes).map(url), args.sizeMib);
  console.log(`${''.padEnd(40)} ${'1 copy'.padStart(10)} ${`${args.replicas} copies`.padStart(10)}  ratio  aim   CPU µs/op of the peers: 1 copy, ${args.replicas} copies, ratio; client`);
  const results = [];
  for (const f of figures) {
    const samples = { unreplicated: [], replicated: [] };
    const cpu = { unreplicated: [], replicated: [] };
    const p99Us = { unreplicated: [], replicated: [] };
    for (let i = 0; i < args.repeat; i++) {
      // Alternate which volume goes first (page cache, CPU frequency, the other engineers' load).
      for (const which of i % 2 ? ['replicated', 'unreplicated'] : ['unreplicated', 'replicated']) {
        const r = await withCpu(processes, () => f.measure(url(volumes[which])));
        samples[which].push(r[f.unit]);
        cpu[which].push(r.cpu);
        if (r.p99Us !== undefined) p99Us[which].push(r.p99Us);
      }
    }
    const row = { figure: f.name, unreplicated: median(samples.unreplicated), replicated: median(samples.replicated), samples, cpuSamples: cpu, load: loadNow() };
    row.ratio = round2(row.replicated / row.unreplicated);
    const cpuMedian = (which, get) => median(cpu[which].map(get));
    row.cpuUsPerOp = { unreplicated: cpuMedian('unreplicated', (c) => c.usPerOp), replicated: cpuMedian('replicated', (c) => c.usPerOp) };
    row.cpuRatio = round2(row.cpuUsPerOp.replicated / row.cpuUsPerOp.unreplicated);
    row.clientUsPerOp = { unreplicated: cpuMedian('unreplicated', (c) => c.clientUsPerOp), replicated: cpuMedian('replicated', (c) => c.clientUsPerOp) };
    row.aim = f.aim;
    if (p99Us.replicated.length) row.p99Us = { unreplicated: median(p99Us.unreplicated), replicated: median(p99Us.replicated) };
    results.push(row);
    const p99 = row.p99Us ? `  p99 ${row.p99Us.unreplicated} / ${row.p99Us.replicated} µs` : '';
    const cpuText = `  CPU ${row.cpuUsPerOp.unreplicated} / ${row.cpuUsPerOp.replicated} µs/op (${row.cpuRatio.toFixed(2)}); client ${row.clientUsPerOp.unreplicated} / ${row.clientUsPerOp.replicated}`;
    console.log(`${row.figure.padEnd(40)} ${String(row.unreplicated).padStart(10)} ${String(row.replicated).padStart(10)}  ${row.ratio.toFixed(2)}  ${row.ratio >= f.aim ? '≥' : '<'} ${f.aim}${cpuText}${p99}  (load ${row.load})`);
  }
  const m = machine();
  console.log(`machine: ${m.cpus} x ${m.cpu}, ${m.memGiB} GiB, node ${m.node}; medians of ${args.repeat}, about ${args.seconds} s each, ${args.sizeMib} MiB volumes filled with random data, through p1's portal (three peer processes, etcd)`);
  console.log(`results: ${saveResults('replication', { args, machine: m, results })}`);
}

runBench(main);
