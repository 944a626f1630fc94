#!/usr/bin/env node
// Host write latency while pages of the same volume migrate (issue 4, acceptance 5).
//
//   npm run build && node bench/migration-latency.js [--seconds 10] [--repeat 3]
//        [--size-mib 1024] [--block-size 4096] [--movers 2] [--depth 8]
//
// A group of three `peersan peer` processes on an etcd catalog (as three machines would), with
// the default migration settings (no `migration:` section: rateMBps 64, pieceKiB 256,
// dutyPercent 10). The balancer and host balancing are switched off so that the only page
// moves are the ones this bench makes and the host stays on the portal it chose. One volume,
// its pages spread over all three peers, filled completely with random data first, so a move
// copies real data (a thin page would be copied as UNMAP). Then, --repeat times, in alternating order:
//   idle       a host writes 4 KiB at random offsets over the whole volume, depth 8, through
//              p1's portal (so 2/3 of its writes are forwarded to the owner)
//   migrating  the same host, while --movers background loops each keep running
//              `peersan page move bench PAGE --to NEXT --wait` one after the other, on the
//              pages of the same volume (every page, shuffled; the host's writes cover every
//              page, so they hit pages in transit)
//   tgt        the same host against Debian tgt (file-backed LUN of the same size, filled),
//              idle only, for reference
// Each figure is the median over the repeats of that phase's p50/p90/p99/max and IOPS.
// How much of the time some page was in transit, the pages moved and the MB/s copied come from
// the source peers' own logs ('page move started' / 'page move committed', with bytesCopied),
// clipped to the measured window.
//
// The client: qemu-io (libiscsi, qemu's iscsi:// driver), driven interactively. Each
// `aio_write` is timed by qemu-io itself, from just before it submits the request to libiscsi
// to its completion callback (clock_gettime); the report prints that time as "ops/sec" of a
// single op with 4 decimals, so 1e6 / ops_per_sec is the latency in microseconds (the "sec"
// figure next to it has only 10 ms resolution). qemu-io is run under `stdbuf -i0 -oL`: it
// reads commands with fgets() from an event-loop fd handler, so a buffered stdin would strand
// commands, and a buffered stdout would hold back completions. The bench keeps 8 writes
// outstanding by sending one new `aio_write` per completion it reads; the pipe round trip
// between completion and refill means the depth briefly dips below 8 (the same for every
// target, and qemu-io's own timing does not include it). The first second is not measured.
// Rejected: iscsi-perf (IOPS only), qemu-img bench (total time only), fio (Debian's build has
// no libiscsi engine; no kernel initiator in a container).
//
// Also printed, to explain what the percentiles show: the writes of the migrating phase split
// by whether their page was in transit when they completed; the CPU the peers and the clients
// used per phase (/proc); and per peer, V8 GC pauses and event-loop delay, from a probe the
// bench loads into each peer process (bench/peer-probe.js, via NODE_OPTIONS=--require).
//
// Needs root (tgtd), etcd, qemu-io/qemu-img with the iscsi driver, stdbuf. Results also go to
// bench/results/migration-latency-<time>.json (bench/results is git-ignored).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const {
  peersanBin, work, sleep, parseArgs, run, startTgt: startTgtAt, startPeersan: startGroup, fillRandom,
  hostWrites: hostWritesAt, summarize, pausesInWindow, cpuMs, round2, median, loadNow, machine: machineInfo, saveResults, cleanup, runBench,
} = require('./lib/group');

const args = parseArgs({ seconds: 10, repeat: 3, sizeMib: 1024, blockSize: 4096, movers: 2, depth: 8 },
  { '--seconds': 'seconds', '--repeat': 'repeat', '--size-mib': 'sizeMib', '--block-size': 'blockSize', '--movers': 'movers', '--depth': 'depth' });
if (args.blockSize !== 512 && args.blockSize !== 4096) throw new Error('--block-size is 512 or 4096');

const moveMsMax = 120_000;

const startTgt = (sizeBytes) => startTgtAt(sizeBytes, args.blockSize);

/** The group of three peers (bench/lib/group.js) with this bench's block size. */
const startPeersan = (sizeBytes) => startGroup(sizeBytes, args.blockSize);

/** One phase of host writes at this bench's depth. */
const hostWrites = (url, sizeBytes, seconds) => hostWritesAt(url, sizeBytes, seconds, { depth: args.depth });

// ---- the movers: `peersan page move … --wait`, back to back ------------------------------------

/** Background loops moving pages of the volume round the group until stop() is called. */
function startMovers(pc, owners) {
  const ids = pc.peers.map((p) => p.id);
  const pages = owners.map((_, page) => page);
  let stopping = false;
  const failures = [];
  const cliMoves = [];
  const loop = async (k) => {
    // Mover k takes every movers-th page, shuffled: no two movers ever touch the same page.
    const mine = shuffle(pages.filter((p) => p % args.movers === k));
    for (let i = 0; !stopping; i++) {
      const page = mine[i % mine.length];
      const to = ids[(ids.indexOf(owners[page]) + 1) % ids.length];
      const t = Date.now();
      try {
        await run(process.execPath, [peersanBin, '--config', path.join(work, 'cluster.yaml'), '--json', 'page', 'move', 'bench', String(page), '--to', to, '--wait'], moveMsMax);
        owners[page] = to;
        cliMoves.push({ page, to, cliMs: Date.now() - t });
      } catch (err) {
        failures.push(err.message);
        await sleep(500);
      }
    }
  };
  const loops = Array.from({ length: args.movers }, (_, k) => loop(k));
  return {
    stop: async () => {
      stopping = true;
      await Promise.all(loops);
      return { failures, cliMoves };
    },
  };
}

function shuffle(xs) {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = crypto.randomInt(i + 1);
    [xs[i], xs[j]] = [xs[j], xs[i]];
  }
  return xs;
}

/** Resolves once the peers have logged more than `before` starts of page moves (bounded). */
async function movesStarted(peers, before) {
  for (let i = 0; i < 600; i++) {
    if (countLogged(peers, 'page move started') > before) return;
    await sleep(50);
  }
  throw new Error('no page move started within 30 s');
}

function countLogged(peers, msg) {
  return peers.reduce((n, p) => n + fs.readFileSync(p.log, 'utf8').split(`"msg":"${msg}"`).length - 1, 0);
}

/** Moves as the source peers logged them: [{page, from, to, startMs, endMs, bytes}], committed ones only. */
function movesFromLogs(peers) {
  const started = new Map();
  const moves = [];
  for (const p of peers) {
    for (const line of fs.readFileSync(p.log, 'utf8').split('\n')) {
      if (!line.startsWith('{')) continue;
      let e;
      try {
        e = JSON.parse(line);
      } catch {
        continue;
      }
      if (e.msg === 'page move started') started.set(`${p.id}/${e.page}`, e.time);
      if (e.msg === 'page move committed') {
        const startMs = started.get(`${p.id}/${e.page}`);
        if (startMs !== undefined) moves.push({ page: e.page, from: p.id, to: e.to, startMs, endMs: e.time, bytes: e.bytesCopied });
      }
    }
  }
  return moves;
}

/**
 * The measured writes of a migrating phase in two groups: those whose page was being moved when
 * they completed (dual write, forward to the destination, or waiting for the copier's chunk
 * lock) and the rest (slowed, if at all, only by the CPU and disks the copy shares).
 */
function splitByMovingPage(r, moves, pageBytes) {
  const onMoving = [];
  const others = [];
  for (let i = 0; i < r.latenciesUs.length; i++) {
    const page = Math.floor(r.offsets[i] / pageBytes);
    const t = r.doneAtMs[i];
    const moving = moves.some((m) => m.page === page && m.startMs <= t && t <= m.endMs);
    (moving ? onMoving : others).push(r.latenciesUs[i]);
  }
  const brief = (xs) => {
    if (xs.length === 0) return { requests: 0 };
    const { requests, p50Us, p99Us, maxUs } = summarize({ latenciesUs: xs, errors: [], windowMs: 1 });
    return { requests, p50Us, p99Us, maxUs };
  };
  return { onMovingPages: brief(onMoving), onOtherPages: brief(others) };
}

/** Within a measured window: share of the time some page was in transit, pages committed, MB/s copied. */
function migrationInWindow(moves, fromMs, toMs) {
  const clipped = moves.map((m) => [Math.max(m.startMs, fromMs), Math.min(m.endMs, toMs), m]).filter(([a, b]) => b > a).sort((x, y) => x[0] - y[0]);
  let covered = 0;
  let reach = fromMs;
  let bytes = 0;
  for (const [a, b, m] of clipped) {
    if (b > reach) covered += b - Math.max(a, reach);
    reach = Math.max(reach, b);
    // Bytes copied in the window, pro rata over each move's own duration.
    bytes += (m.bytes * (b - a)) / Math.max(1, m.endMs - m.startMs);
  }
  const committed = moves.filter((m) => m.endMs >= fromMs && m.endMs < toMs).length;
  const seconds = (toMs - fromMs) / 1000;
  return { inTransitPct: Math.round((covered / (toMs - fromMs)) * 100), pagesMoved: committed, copiedMBps: Math.round(bytes / 1e6 / seconds) };
}

// ---- the run ------------------------------------------------------------------------------------

async function main() {
  const sizeBytes = args.sizeMib * 1024 * 1024;
  const pc = await startPeersan(sizeBytes);
  const tgt = await startTgt(sizeBytes);
  const owners = pc.map.pages.map((p) => p.owner);
  const pageMib = (pc.map.pageBlocks * args.blockSize) / 2 ** 20;
  console.log(`volume: ${args.sizeMib} MiB, ${args.blockSize}-byte blocks, ${owners.length} pages of ${pageMib} MiB on ${[...new Set(owners)].sort().join(', ')}; filling both LUNs with random data…`);
  await fillRandom([pc.url, tgt], args.sizeMib);

  const phases = {
    idle: async () => ({ run: await hostWrites(pc.url, sizeBytes, args.seconds) }),
    migrating: async () => {
      const before = countLogged(pc.peers, 'page move started');
      const movers = startMovers(pc, owners);
      await movesStarted(pc.peers, before);
      const r = await hostWrites(pc.url, sizeBytes, args.seconds);
      return { run: r, movers: await movers.stop() };
    },
    tgt: async () => ({ run: await hostWrites(tgt, sizeBytes, args.seconds) }),
  };
  const names = Object.keys(phases);
  const samples = { idle: [], migrating: [], tgt: [] };
  const failures = [];
  const migratingRuns = [];
  for (let i = 0; i < args.repeat; i++) {
    // Rotate the order so no phase always runs first (page cache, CPU frequency, others' load).
    for (let k = 0; k < names.length; k++) {
      const name = names[(i + k) % names.length];
      const load = loadNow();
      // CPU over the whole phase: the peers, and the bench's children that exited in it
      // (qemu-io; in the migrating phase also every `peersan page move` CLI).
      const cpu0 = { peers: pc.peers.map((p) => cpuMs(p.pid).self), clients: cpuMs().children, at: performance.now() };
      const { run: r, movers } = await phases[name]();
      const wallMs = performance.now() - cpu0.at;
      const peersCores = pc.peers.map((p, j) => (cpuMs(p.pid).self - cpu0.peers[j]) / wallMs);
      const cores = { peers: round2(peersCores.reduce((a, b) => a + b, 0)), perPeer: peersCores.map(round2), clients: round2((cpuMs().children - cpu0.clients) / wallMs) };
      const s = { ...summarize(r), load, cores, pauses: pausesInWindow(pc.peers, r.measureStart, r.measureEnd), measureStart: r.measureStart, measureEnd: r.measureEnd };
      if (movers) {
        failures.push(...movers.failures);
        migratingRuns.push({ s, r });
      }
      samples[name].push(s);
      console.log(`  run ${i + 1} ${name.padEnd(9)} p50 ${s.p50Us} µs  p99 ${s.p99Us} µs  max ${s.maxUs} µs  ${s.iops} IOPS${s.errors ? `  ${s.errors} ERRORS` : ''}  (load ${load}; cores busy: peers ${cores.peers}, clients ${cores.clients})`);
    }
  }
  // The peers' logs are complete once every mover has stopped.
  const moves = movesFromLogs(pc.peers);
  const pageBytes = pc.map.pageBlocks * args.blockSize;
  for (const { s, r } of migratingRuns) Object.assign(s, migrationInWindow(moves, s.measureStart, s.measureEnd), splitByMovingPage(r, moves, pageBytes));
  for (const s of samples.idle) s.pagesMoved = migrationInWindow(moves, s.measureStart, s.measureEnd).pagesMoved;

  const keys = ['p50Us', 'p90Us', 'p99Us', 'maxUs', 'iops'];
  const rows = names.map((name) => ({ phase: name, ...Object.fromEntries(keys.map((k) => [k, median(samples[name].map((s) => s[k]))])) }));
  const mig = rows[1];
  const migration = Object.fromEntries(['inTransitPct', 'pagesMoved', 'copiedMBps'].map((k) => [k, median(samples.migrating.map((s) => s[k]))]));
  const split = (group) => Object.fromEntries(['requests', 'p50Us', 'p99Us', 'maxUs'].map((k) => [k, median(samples.migrating.map((s) => s[group][k] ?? 0))]));
  migration.onMovingPages = split('onMovingPages');
  migration.onOtherPages = split('onOtherPages');
  const coresOf = (name) => ({ peers: median(samples[name].map((s) => s.cores.peers)), clients: median(samples[name].map((s) => s.cores.clients)) });
  const cores = { idle: coresOf('idle'), migrating: coresOf('migrating'), tgt: coresOf('tgt') };
  const ratio = mig.p99Us / rows[0].p99Us;
  console.log('');
  console.log(`${'4 KiB random write, QD' + args.depth}`.padEnd(24) + ['p50 µs', 'p90 µs', 'p99 µs', 'max µs', 'IOPS'].map((h) => h.padStart(9)).join(''));
  for (const r of rows) console.log(`${r.phase === 'tgt' ? 'tgt (idle)' : `peersan ${r.phase}`}`.padEnd(24) + keys.map((k) => String(r[k]).padStart(9)).join(''));
  console.log(`migrating: a page in transit ${migration.inTransitPct}% of the time, ${migration.pagesMoved} pages (${pageMib} MiB each) moved per ${args.seconds} s phase, ${migration.copiedMBps} MB/s copied (default: at most 64 MB/s per source peer, pausing for host I/O at dutyPercent 10); idle phases saw ${samples.idle.map((s) => s.pagesMoved).join('/')} moves`);
  const { onMovingPages: mv, onOtherPages: ot } = migration;
  console.log(`migrating, by the page written: to a page in transit ${mv.requests} writes, p50 ${mv.p50Us} µs, p99 ${mv.p99Us} µs, max ${mv.maxUs} µs; to other pages ${ot.requests} writes, p50 ${ot.p50Us} µs, p99 ${ot.p99Us} µs`);
  console.log(`cores busy (of ${os.cpus().length}): idle peers ${cores.idle.peers} + clients ${cores.idle.clients}; migrating peers ${cores.migrating.peers} + clients ${cores.migrating.clients} (incl. the page move CLIs); tgt run: peers ${cores.tgt.peers} + clients ${cores.tgt.clients}`);
  for (const name of ['idle', 'migrating']) {
    const per = pc.peers.map((p, j) => {
      const m = (k) => median(samples[name].map((s) => s.pauses[j][k]));
      return `${p.id} ${m('gcMsPerSec')} ms/s (major ${m('majorGcsPerSec')}/s, ${m('majorGcMsPerSec')} ms/s), longest ${m('gcMaxMs')} ms, loop delay max ${m('loopDelayMaxMs')} ms`;
    });
    console.log(`GC pauses ${name.padEnd(9)}: ${per.join('; ')}`);
  }
  console.log(`p99 migrating / idle = ${ratio.toFixed(2)} (aim ≤ 2): ${ratio <= 2 ? 'met' : 'NOT met'};  peersan idle p99 / tgt p99 = ${(rows[0].p99Us / rows[2].p99Us).toFixed(2)}`);
  if (failures.length > 0) console.log(`page moves that failed: ${failures.length}; first: ${failures[0]}`);
  const machine = machineInfo();
  console.log(`machine: ${machine.cpus} x ${machine.cpu}, ${machine.memGiB} GiB, node ${machine.node}; medians of ${args.repeat}, ${args.seconds} s measured each (after 1 s warm-up), host on p1's portal, ${args.movers} move loop(s)`);
  console.log(`results: ${saveResults('migration-latency', { args, machine, rows, ratio, migration, cores, samples, moves, failures })}`);
}

if (require.main === module) runBench(main);
// For one-off experiments (profiling a move): the group, the host and the log readers.
module.exports = { args, work, run, startPeersan, startTgt, hostWrites, summarize, movesFromLogs, cleanup, peersanBin };
