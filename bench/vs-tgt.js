#!/usr/bin/env node
// peersan vs tgt (Debian tgt, file-backed LUN of the same size), same machine, same run; and
// peersan local vs forwarded; IOPS (or MB/s) and CPU microseconds per operation.
//
//   npm run build && node bench/vs-tgt.js [--size-mib 1024] [--seconds 5] [--repeat 5] [--tls 1]
//
// peersan runs as a group of two `peersan peer` processes sharing an etcd catalog (as two
// machines would; each process gets its own core on a 2-core box). The volume is placed on
// p1 only, so the same volume is measured through two portals:
//   local      p1's portal: p1 owns every page, no RPC
//   forwarded  p2's portal: p2 owns none, every command goes to p1 over the peer data stream
// Both LUNs (peersan's, tgt's) are filled completely first (a thin volume reads unwritten
// blocks without I/O, which would flatter peersan). Then, rotating between the targets,
// each figure is measured --repeat times and the median printed:
//   4 KiB random read, depth 32     iscsi-perf -r -b 8 -m 32
//   4 KiB scattered writes, d 32    qemu-img bench -w -t none -d 32 -s 4096 -S <step>
//                                   (a step prime to the LUN's slot count: no two writes in
//                                   flight adjacent, as with random offsets; bench/lib/group.js
//                                   scatteredStep. iscsi-perf does not write.)
//   4 KiB sequential writes, d 32   the same without -S
//   128 KiB sequential read, d 16   iscsi-perf -b 256 -m 16
// CPU µs/op (bench/lib/cpu.js: utime+stime of every thread, /proc) is sampled around each
// measurement: for local and forwarded, both peer processes (the one not serving idles but is
// counted; each one's share is printed too), for tgt the tgtd process; the client's (iscsi-perf,
// qemu-img) is printed apart, for context, and is in no ratio. The peers run without the GC
// probe (bench/peer-probe.js), whose work would count.
// Run time: about 6 x --repeat measurements of --seconds plus 6 x --repeat runs of 100,000
// writes, plus filling both LUNs: about 4 minutes for --size-mib 512 --seconds 4 on the 2-core
// box. --only N runs the Nth figure alone. --tls 1 gives the peersan group `cluster.tls`: the
// forwarded figures then cross the peer data stream over mutual TLS (local I/O does not use it).
// Needs root (tgtd), etcd, iscsi-perf, qemu-img with the iscsi driver. Results also go to
// bench/results/vs-tgt-<time>.json (each sample kept).
'use strict';

const { parseArgs, startPeersan, startTgtProcess, fillRandom, iscsiPerf, qemuImgWrites, scatteredStep, median, round2, loadNow, machine, saveResults, runBench } = require('./lib/group');
const { withCpu } = require('./lib/cpu');

const args = parseArgs({ sizeMib: 1024, seconds: 5, repeat: 5, only: 0, tls: 0 }, { '--size-mib': 'sizeMib', '--seconds': 'seconds', '--repeat': 'repeat', '--only': 'only', '--tls': 'tls' });
const mib = 1024 * 1024;

const figures = [
  { name: '4 KiB random read, QD32 (IOPS)', unit: 'iops', measure: (u) => iscsiPerf(u, ['-r', '-b', '8', '-m', '32'], args.seconds) },
  { name: '4 KiB scattered write, QD32 (IOPS)', unit: 'iops', measure: (u) => qemuImgWrites(u, { bytes: 4096, depth: 32, count: 100_000, step: scatteredStep(args.sizeMib * mib, 4096) }) },
  { name: '4 KiB sequential write, QD32 (IOPS)', unit: 'iops', measure: (u) => qemuImgWrites(u, { bytes: 4096, depth: 32, count: 100_000 }) },
  { name: '128 KiB sequential read, QD16 (MB/s)', unit: 'mbps', measure: (u) => iscsiPerf(u, ['-b', '256', '-m', '16'], args.seconds) },
];

/** The three targets: their URLs and the processes whose CPU each one's figure counts. */
async function startTargets() {
  const pc = await startPeersan(args.sizeMib * mib, 512, { ids: ['p1', 'p2'], volumeArgs: ['--peers', 'p1'], probe: false, tls: args.tls > 0 });
  const [p1, p2] = pc.peers;
  const url = (p) => `iscsi://127.0.0.1:${p.iscsi}/iqn.2026-11.io.peersan:bench/0`;
  const peers = { p1: p1.pid, p2: p2.pid };
  const tgt = await startTgtProcess(args.sizeMib * mib);
  return {
    local: { url: url(p1), processes: peers },
    forwarded: { url: url(p2), processes: peers },
    tgt: { url: tgt.url, processes: { tgtd: tgt.pid } },
  };
}

/** Medians over one target's samples: the figure, CPU µs/op (all, each process, client). */
function medians(samples, unit) {
  const per = (get) => median(samples.map(get));
  const names = Object.keys(samples[0].cpu.perProcessUsPerOp);
  return {
    value: per((s) => s[unit]),
    cpuUsPerOp: per((s) => s.cpu.usPerOp),
    perProcessUsPerOp: Object.fromEntries(names.map((n) => [n, per((s) => s.cpu.perProcessUsPerOp[n])])),
    clientUsPerOp: per((s) => s.cpu.clientUsPerOp),
  };
}

const col = (x, w = 10) => String(x).padStart(w);

function printRow(row) {
  const { local, forwarded, tgt } = row.targets;
  const byProcess = (m) => Object.entries(m.perProcessUsPerOp).map(([n, us]) => `${n} ${us}`).join(' + ');
  console.log(`${row.figure.padEnd(38)} ${col(local.value)} ${col(forwarded.value)} ${col(tgt.value)}  fwd/local ${row.forwardedRatio.toFixed(2)}  local/tgt ${row.tgtRatio.toFixed(2)}`);
  console.log(`${'  CPU µs/op (peers | tgtd)'.padEnd(38)} ${col(local.cpuUsPerOp)} ${col(forwarded.cpuUsPerOp)} ${col(tgt.cpuUsPerOp)}  CPU local/tgt ${row.cpuTgtRatio.toFixed(2)}  CPU fwd/local ${row.cpuForwardedRatio.toFixed(2)}`);
  console.log(`    by process: local ${byProcess(local)}; forwarded ${byProcess(forwarded)}; tgt ${byProcess(tgt)}`);
  console.log(`    client µs/op (not in the ratios): local ${local.clientUsPerOp}, forwarded ${forwarded.clientUsPerOp}, tgt ${tgt.clientUsPerOp}   (load ${row.load})`);
}

async function main() {
  const targets = await startTargets();
  await fillRandom([targets.local.url, targets.tgt.url], args.sizeMib);
  const names = Object.keys(targets);
  console.log(`${''.padEnd(38)} ${col('local')} ${col('forwarded')} ${col('tgt')}`);
  const results = [];
  for (const f of figures.filter((_, i) => !args.only || args.only === i + 1)) {
    const samples = { local: [], forwarded: [], tgt: [] };
    for (let i = 0; i < args.repeat; i++) {
      // Rotate the order so no target always runs first (page cache, CPU frequency).
      for (let k = 0; k < names.length; k++) {
        const t = targets[names[(i + k) % names.length]];
        samples[names[(i + k) % names.length]].push(await withCpu(t.processes, () => f.measure(t.url)));
      }
    }
    const m = Object.fromEntries(names.map((n) => [n, medians(samples[n], f.unit)]));
    const row = {
      figure: f.name, unit: f.unit, targets: m, load: loadNow(),
      forwardedRatio: round2(m.forwarded.value / m.local.value), tgtRatio: round2(m.local.value / m.tgt.value),
      cpuTgtRatio: round2(m.local.cpuUsPerOp / m.tgt.cpuUsPerOp), cpuForwardedRatio: round2(m.forwarded.cpuUsPerOp / m.local.cpuUsPerOp),
      samples,
    };
    results.push(row);
    printRow(row);
  }
  const mc = machine();
  console.log(`machine: ${mc.cpus} x ${mc.cpu}, ${mc.memGiB} GiB, node ${mc.node}; medians of ${args.repeat}, ${args.seconds} s each (writes: 100,000 each), ${args.sizeMib} MiB LUNs filled with random data`);
  console.log(`local = through the portal of the peer that owns every page; forwarded = through a peer that owns none (two peer processes, etcd catalog${args.tls ? ', peer data stream over mutual TLS' : ''}); CPU = utime+stime of all threads, /proc`);
  console.log(`results: ${saveResults('vs-tgt', { args, machine: mc, results })}`);
}

runBench(main);
