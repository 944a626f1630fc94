#!/usr/bin/env node
// Snapshots under load (issue 5, acceptance 2 and 3): how long a barrier-mode snapshot holds
// host I/O and how long it takes, and the host's 4 KiB random-write IOPS just before and right
// after a snapshot (the copy-on-write grain at work), in the same run.
//
//   npm run build && node bench/snapshot.js [--seconds 5] [--repeat 3] [--snapshots 10]
//        [--size-mib 1024] [--depth 8]
//
// A group of three `peersan peer` processes on etcd (bench/lib/group.js: balancer and host
// balancing off, so nothing moves but what the bench does), one volume of 4 KiB blocks spread
// over the three, filled completely with random data first (a thin grain has nothing to copy,
// which would flatter the after-snapshot figure). The host is qemu-io (libiscsi) writing 4 KiB
// at random offsets over the whole volume, depth 8, through p1's portal (so 2/3 of its writes
// are forwarded), each write timed by qemu-io itself (see migration-latency.js's header).
// Snapshots are taken with the CLI, `peersan --json snapshot create bench --name …` against p1
// (p1 coordinates): its JSON gives heldMs (the longest time any peer held host I/O) and tookMs
// (from the coordinator receiving the command to the snapshot being ready); the bench also
// times the CLI process (node start-up, connect, the call).
// Then, --repeat times:
//   baseline   the host writes for (--snapshots + 1) s, no snapshot exists
//   holding    the same, while the bench takes --snapshots snapshots, one starting every
//              second (after the previous one returned); the writes that completed while a
//              snapshot command ran are told apart from those between commands (the latter pay
//              the copy-on-write of the fresh snapshots). The snapshots are deleted afterwards.
//   iops       the host writes; after --seconds s one snapshot is taken; the IOPS in the
//              --seconds s before the command started are compared with those in the --seconds
//              s right after the snapshot was ready (createdAtMs + tookMs from the record), when
//              most writes are the first to their 64 KiB grain since the snapshot and copy it.
//              The snapshot is deleted before the next repeat, so every "before" window runs
//              with no snapshot at all (no copy-on-write).
//   stamping   the same as holding, with `--mode timestamp` snapshots (no host I/O held:
//              creation time, and the host's latency while they are taken)
//
// Needs etcd, qemu-io/qemu-img with the iscsi driver, stdbuf. The machine load (loadavg) is
// printed with each phase: other engineers' runs share the cores. Results also go to
// bench/results/snapshot-<time>.json (bench/results is git-ignored).
'use strict';

const fs = require('node:fs');
const {
  peersanBin, sleep, parseArgs, run, startPeersan, fillRandom, hostWrites, summarize, pausesInWindow, cpuMs, round2, median,
  percentile, loadNow, machine: machineInfo, saveResults, runBench,
} = require('./lib/group');

const args = parseArgs({ seconds: 5, repeat: 3, snapshots: 10, sizeMib: 1024, depth: 8 },
  { '--seconds': 'seconds', '--repeat': 'repeat', '--snapshots': 'snapshots', '--size-mib': 'sizeMib', '--depth': 'depth' });
const blockSize = 4096;
const grainBytes = 64 * 1024;
/** A snapshot command that takes longer than this has hung: the bench fails. */
const snapshotMsMax = 60_000;

/** `peersan snapshot create` through the CLI: the record's figures and the CLI's wall time. */
async function takeSnapshot(pc, name, mode = 'barrier') {
  const startMs = Date.now();
  const t = performance.now();
  const out = await run(process.execPath, [peersanBin, '--config', pc.config, '--json', 'snapshot', 'create', 'bench', '--name', name, '--mode', mode], snapshotMsMax);
  const cliMs = performance.now() - t;
  const [s] = JSON.parse(out);
  return { name, mode, heldMs: s.heldMs, tookMs: s.tookMs, cliMs: Math.round(cliMs), startMs, endMs: Date.now(), createdAtMs: s.createdAtMs };
}

async function deleteSnapshot(pc, name) {
  await pc.cli('snapshot', 'delete', 'bench', name);
}

/** The host's writes while `during(measureStartMs)` runs; CPU of the peers and of the bench's exited children. */
async function phase(pc, sizeBytes, seconds, during) {
  const load = loadNow();
  const cpu0 = { peers: pc.peers.map((p) => cpuMs(p.pid).self), clients: cpuMs().children, at: performance.now() };
  let work = Promise.resolve(undefined);
  const r = await hostWrites(pc.url, sizeBytes, seconds, { depth: args.depth, onMeasureStart: (ms) => {
    work = during(ms);
    work.catch(() => undefined); // awaited below, once the host is done
  } });
  const extra = await work;
  const wallMs = performance.now() - cpu0.at;
  const peersCores = pc.peers.map((p, j) => (cpuMs(p.pid).self - cpu0.peers[j]) / wallMs);
  const cores = { peers: round2(peersCores.reduce((a, b) => a + b, 0)), perPeer: peersCores.map(round2), clients: round2((cpuMs().children - cpu0.clients) / wallMs) };
  return { r, extra, load, cores, pauses: pausesInWindow(pc.peers, r.measureStart, r.measureEnd) };
}

/** Latency figures of a set of writes (µs); the window gives IOPS when known. */
function brief(latenciesUs, windowMs) {
  if (latenciesUs.length === 0) return { requests: 0 };
  const s = Float64Array.from(latenciesUs).sort();
  const out = { requests: s.length, p50Us: Math.round(percentile(s, 0.5)), p99Us: Math.round(percentile(s, 0.99)), maxUs: Math.round(s[s.length - 1]) };
  if (windowMs) out.iops = Math.round(s.length / (windowMs / 1000));
  return out;
}

/** The writes of a run that completed in [fromMs, toMs) (epoch ms), in completion order. */
function writesIn(r, fromMs, toMs) {
  const idx = [];
  for (let i = 0; i < r.doneAtMs.length; i++) if (r.doneAtMs[i] >= fromMs && r.doneAtMs[i] < toMs) idx.push(i);
  return idx;
}

/** Baseline and snapshot-taking runs of one repeat; the snapshots are deleted at the end. */
async function holdRepeat(pc, sizeBytes, rep) {
  const seconds = args.snapshots + 1;
  const baseline = await phase(pc, sizeBytes, seconds, async () => undefined);
  const taking = async (mode) => {
    const p = await phase(pc, sizeBytes, seconds, async (startMs) => {
      const snaps = [];
      for (let k = 0; k < args.snapshots; k++) {
        // One command starting each second from the window's start (later if the last one ran long).
        const at = startMs + (k + 0.5) * 1000;
        if (Date.now() < at) await sleep(at - Date.now());
        snaps.push(await takeSnapshot(pc, `${mode}-${rep}-${k}`, mode));
      }
      return snaps;
    });
    const during = new Set(p.extra.flatMap((s) => writesIn(p.r, s.startMs, s.endMs)));
    const inside = [];
    const between = [];
    p.r.latenciesUs.forEach((us, i) => (during.has(i) ? inside : between).push(us));
    for (const s of p.extra) await deleteSnapshot(pc, s.name);
    return { figures: { ...summarize(p.r), load: p.load, cores: p.cores, pauses: p.pauses, whileCommandRan: brief(inside), betweenCommands: brief(between) }, snaps: p.extra, errors: p.r.errors };
  };
  const holding = await taking('barrier');
  const stamping = await taking('timestamp');
  return {
    baseline: { ...summarize(baseline.r), load: baseline.load, cores: baseline.cores, pauses: baseline.pauses },
    holding: holding.figures,
    stamping: stamping.figures,
    snapshots: holding.snaps,
    stamped: stamping.snaps,
    errors: [...baseline.r.errors, ...holding.errors, ...stamping.errors],
  };
}

/** IOPS in the N s before a snapshot and the N s right after it was ready, same host run. */
async function iopsRepeat(pc, sizeBytes, rep) {
  const n = args.seconds;
  // Room for the snapshot command itself (a few seconds at worst on a loaded box) and the after window.
  const seconds = 2 * n + 8;
  const p = await phase(pc, sizeBytes, seconds, async (startMs) => {
    await sleep(startMs + n * 1000 - Date.now());
    return takeSnapshot(pc, `iops-${rep}`);
  });
  const s = p.extra;
  const r = p.r;
  const readyMs = s.createdAtMs + s.tookMs;
  if (readyMs + n * 1000 > r.measureEnd) throw new Error(`the snapshot took too long (${s.cliMs} ms): no full ${n} s window after it`);
  const beforeIdx = writesIn(r, s.startMs - n * 1000, s.startMs);
  const afterIdx = writesIn(r, readyMs, readyMs + n * 1000);
  // Writes of the after window that were the first to their grain since the snapshot: each copies the grain.
  const seen = new Set();
  let copies = 0;
  for (const i of writesIn(r, readyMs, Infinity)) {
    const grain = Math.floor(r.offsets[i] / grainBytes);
    if (seen.has(grain)) continue;
    seen.add(grain);
    if (r.doneAtMs[i] < readyMs + n * 1000) copies++;
  }
  await deleteSnapshot(pc, s.name);
  const before = brief(beforeIdx.map((i) => r.latenciesUs[i]), n * 1000);
  const after = brief(afterIdx.map((i) => r.latenciesUs[i]), n * 1000);
  return {
    before, after, ratio: round2(after.iops / before.iops), firstToGrainPct: Math.round((copies / Math.max(1, afterIdx.length)) * 100),
    snapshot: s, load: p.load, cores: p.cores, pauses: p.pauses, errors: p.r.errors,
  };
}

/** Per peer, from its log: how long each PREPARE drained requests and each TAKE froze the layers. */
function holdPartsFromLogs(peers) {
  return peers.map((p) => {
    const parts = fs.readFileSync(p.log, 'utf8').split('\n').filter((l) => l.includes('"snapshot layers frozen"')).map((l) => JSON.parse(l));
    const fig = (xs) => (xs.length ? { p50: median(xs), max: Math.max(...xs) } : { p50: 0, max: 0 });
    return { peer: p.id, count: parts.length, flushMs: fig(parts.map((x) => x.flushMs ?? 0)), drainMs: fig(parts.map((x) => x.drainMs)), freezeMs: fig(parts.map((x) => x.freezeMs)) };
  });
}

const p50max = (xs) => `p50 ${median(xs)}, max ${Math.max(...xs)}`;

async function main() {
  const sizeBytes = args.sizeMib * 1024 * 1024;
  const pc = await startPeersan(sizeBytes, blockSize);
  const owners = pc.map.pages.map((p) => p.owner);
  console.log(`volume: ${args.sizeMib} MiB, ${blockSize}-byte blocks, ${owners.length} pages on ${[...new Set(owners)].sort().join(', ')}; filling it with random data… (load ${loadNow()})`);
  await fillRandom([pc.url], args.sizeMib);

  const holds = [];
  const iops = [];
  for (let rep = 1; rep <= args.repeat; rep++) {
    const h = await holdRepeat(pc, sizeBytes, rep);
    holds.push(h);
    const held = h.snapshots.map((s) => s.heldMs);
    console.log(`  run ${rep} hold   baseline p50 ${h.baseline.p50Us} µs p99 ${h.baseline.p99Us} µs (load ${h.baseline.load}); with ${h.snapshots.length} barrier snapshots p50 ${h.holding.p50Us} µs p99 ${h.holding.p99Us} µs max ${h.holding.maxUs} µs (load ${h.holding.load}); held ms ${p50max(held)}; with ${h.stamped.length} timestamp snapshots p50 ${h.stamping.p50Us} µs p99 ${h.stamping.p99Us} µs max ${h.stamping.maxUs} µs (load ${h.stamping.load}), took ms ${p50max(h.stamped.map((s) => s.tookMs))}${h.errors.length ? `; ${h.errors.length} WRITE ERRORS` : ''}`);
    const x = await iopsRepeat(pc, sizeBytes, rep);
    iops.push(x);
    console.log(`  run ${rep} iops   before ${x.before.iops} IOPS, after ${x.after.iops} IOPS: ${x.ratio}× (${x.firstToGrainPct}% of the after writes copied a grain; snapshot held ${x.snapshot.heldMs} ms, took ${x.snapshot.tookMs} ms; load ${x.load}; cores busy: peers ${x.cores.peers}, clients ${x.cores.clients})${x.errors.length ? `; ${x.errors.length} WRITE ERRORS` : ''}`);
  }

  const snaps = [...holds.flatMap((h) => h.snapshots), ...iops.map((x) => x.snapshot)];
  const col = (k) => snaps.map((s) => s[k]);
  const fig = (xs) => ({ p50: median(xs), max: Math.max(...xs) });
  const creation = { snapshots: snaps.length, heldMs: fig(col('heldMs')), tookMs: fig(col('tookMs')), cliMs: fig(col('cliMs')) };
  const stamped = holds.flatMap((h) => h.stamped);
  const timestamp = { snapshots: stamped.length, heldMs: fig(stamped.map((s) => s.heldMs)), tookMs: fig(stamped.map((s) => s.tookMs)), cliMs: fig(stamped.map((s) => s.cliMs)) };
  const lat = (pick) => Object.fromEntries(['p50Us', 'p99Us', 'maxUs'].map((k) => [k, median(holds.map((h) => pick(h)[k] ?? 0))]));
  const latency = {
    withoutSnapshots: lat((h) => h.baseline),
    snapshotRun: lat((h) => h.holding),
    timestampRun: lat((h) => h.stamping),
    timestampWhileCommandRan: lat((h) => h.stamping.whileCommandRan),
    whileCommandRan: lat((h) => h.holding.whileCommandRan),
    betweenCommands: lat((h) => h.holding.betweenCommands),
  };
  const ratios = iops.map((x) => x.ratio);
  const ratio = median(ratios);
  const errors = [...holds.flatMap((h) => h.errors), ...iops.flatMap((x) => x.errors)];

  console.log('');
  console.log(`snapshot creation (${creation.snapshots} snapshots, host writing at QD${args.depth})`.padEnd(58) + ['p50 ms', 'max ms'].map((h) => h.padStart(9)).join(''));
  const row = (label, f) => console.log(label.padEnd(58) + [f.p50, f.max].map((v) => String(v).padStart(9)).join(''));
  row('barrier: hosts held (heldMs, longest of any peer)', creation.heldMs);
  row('barrier: command to ready (tookMs)', creation.tookMs);
  row('barrier: CLI wall time (node start, connect, call)', creation.cliMs);
  row(`timestamp: hosts held (${timestamp.snapshots} snapshots)`, timestamp.heldMs);
  row('timestamp: command to ready (tookMs)', timestamp.tookMs);
  row('timestamp: CLI wall time', timestamp.cliMs);
  const parts = holdPartsFromLogs(pc.peers);
  console.log(`where the hold goes, per peer (p50/max ms over ${parts[0].count} snapshots): ${parts.map((x) => `${x.peer} pre-flush ${x.flushMs.p50}/${x.flushMs.max} (hosts not held), drain ${x.drainMs.p50}/${x.drainMs.max}, freeze ${x.freezeMs.p50}/${x.freezeMs.max}`).join('; ')} (the rest of heldMs: the PREPARE/TAKE/RELEASE round trips)`);
  console.log('');
  console.log(`4 KiB random write, QD${args.depth}, host on p1`.padEnd(58) + ['p50 µs', 'p99 µs', 'max µs'].map((h) => h.padStart(9)).join(''));
  const lrow = (label, f) => console.log(label.padEnd(58) + [f.p50Us, f.p99Us, f.maxUs].map((v) => String(v).padStart(9)).join(''));
  lrow('no snapshots', latency.withoutSnapshots);
  lrow(`taking ${args.snapshots} barrier snapshots, 1/s: all writes`, latency.snapshotRun);
  lrow('  writes completed while a snapshot command ran', latency.whileCommandRan);
  lrow('  writes completed between commands (copy-on-write)', latency.betweenCommands);
  lrow(`taking ${args.snapshots} timestamp snapshots, 1/s: all writes`, latency.timestampRun);
  lrow('  writes completed while a snapshot command ran', latency.timestampWhileCommandRan);
  console.log('');
  console.log(`IOPS ${args.seconds} s before / ${args.seconds} s right after a snapshot: ${iops.map((x) => `${x.before.iops} / ${x.after.iops}`).join(', ')}; after/before ${ratios.join(', ')}, median ${ratio} (aim ≥ 0.5: ${ratio >= 0.5 ? 'met' : 'NOT met'})`);
  console.log(`  write latency before → after (median over repeats): p50 ${median(iops.map((x) => x.before.p50Us))} → ${median(iops.map((x) => x.after.p50Us))} µs, p99 ${median(iops.map((x) => x.before.p99Us))} → ${median(iops.map((x) => x.after.p99Us))} µs; ${median(iops.map((x) => x.firstToGrainPct))}% of the after writes were the first to their 64 KiB grain`);
  console.log('  snapshots deleted between repeats: every "before" window runs with no snapshot');
  if (errors.length > 0) console.log(`host write errors: ${errors.length}; first: ${errors[0].message}`);
  const machine = machineInfo();
  console.log(`machine: ${machine.cpus} x ${machine.cpu}, ${machine.memGiB} GiB, node ${machine.node}; load at the start of each phase: ${[...holds.flatMap((h) => [h.baseline.load, h.holding.load, h.stamping.load]), ...iops.map((x) => x.load)].map((l) => l.split(' ')[0]).join(', ')} (1-min loadavg)`);
  console.log(`results: ${saveResults('snapshot', { args, machine, creation, holdParts: parts, timestamp, latency, ratio, ratios, holds, iops })}`);
}

runBench(main);
