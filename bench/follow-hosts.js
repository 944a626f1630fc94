#!/usr/bin/env node
// Pages follow their hosts (issue 19, acceptance 3); opt-in, not part of `npm test`.
//
//   npm run build && node bench/follow-hosts.js [--replicas 1] [--follow-s 120] [--quiet-s 120]
//        [--interval-ms 2000] [--sessions 2] [--sample-ms 5000]
//
// Three `peersan peer` processes on etcd, one volume of 192 MiB (48 pages of 4 MiB, placed over
// the three peers as `volume create` places them) with --replicas copies. Host balancing is off
// (a session stays on the peer it logged in to); the balancer is on, its round every
// --interval-ms (cluster.yaml `balancer: { intervalMs }`, nothing else changed). Three hosts,
// host i logged in to peer i only, each writing its own 64 MiB region (64 KiB writes at random
// offsets, --sessions sessions of the test suite's raw initiator, one write at a time each), so
// about two thirds of each host's I/O starts out forwarded. Every --sample-ms each peer's
// /metrics is read:
//   forwarded share   peersan_routed_runs_total{path="forwarded"} ÷ all routed runs, summed over
//                     the peers, over the last sample
//   page moves        peersan_page_moves_total (committed and cancelled, by the source peer) plus
//                     peersan_page_moves_in_flight: data moves started so far. A role switch (a
//                     replicated page's primary role handed to an in-sync copy) copies nothing
//                     and is no migration: the quiet window's verdict therefore compares the
//                     volume's `page map --json` (each page's primary and route version) at its
//                     start and end too, and counts every page whose route changed
// Prints the share over time and when it first fell below 20 %; the balancer may finish its
// last follow moves after that, so the quiet window starts once the share is under 20 % through
// a whole sample in which no route changed ("settled"); then the same load runs --quiet-s and
// every page whose route changed in that time counts. PASS/FAIL lines for "forwarded < 20 %
// within --follow-s" and "no moves for --quiet-s after"; exit 1 on a FAIL or a host error.
// Bounded: at most --follow-s + 60 + --quiet-s seconds of load after the group is up;
// everything started is stopped at the end, on a failure and on Ctrl-C.
'use strict';

require('./lib/ts-require');
const { openSession } = require('../test/helpers/fuzz-iscsi.ts');
const { hasTool, startEtcd, startPeers } = require('../test/helpers/processes.ts');
const { parseArgs, loadNow } = require('./lib/group');
const { runSoak } = require('./lib/host-load');

const args = parseArgs({ replicas: 1, followS: 120, quietS: 120, intervalMs: 2000, sessions: 2, sampleMs: 5000 }, {
  '--replicas': 'replicas', '--follow-s': 'followS', '--quiet-s': 'quietS', '--interval-ms': 'intervalMs', '--sessions': 'sessions', '--sample-ms': 'sampleMs',
});
const volume = 'follow';
const regionMib = 64;
const writeBytes = 64 * 1024;
const blockBytes = 512;
const shareAim = 0.2;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Each page's primary and route version (`page map --json`); a role switch changes them as a move does. */
async function routes(peer) {
  const r = await peer.cliAsync('--json', 'page', 'map', volume);
  if (r.status !== 0) throw new Error(`page map: ${r.out.trim()}`);
  return new Map(JSON.parse(r.out).pages.map((p) => [p.page, `${p.owner}@${p.version}`]));
}

/** Pages of each host's region by primary, e.g. "p1:6 p2:5 p3:5 | …". */
function regions(map) {
  const pages = [...map.keys()].sort((a, b) => a - b);
  const per = pages.length / 3;
  return [0, 1, 2].map((i) => {
    const by = new Map();
    for (const p of pages.slice(i * per, (i + 1) * per)) {
      const owner = map.get(p).split('@')[0];
      by.set(owner, (by.get(owner) ?? 0) + 1);
    }
    return `host ${i + 1} (via p${i + 1}): ${[...by].sort().map(([o, n]) => `${o}:${n}`).join(' ')}`;
  }).join(' | ');
}

/** One session through `peer` writing 64 KiB at random offsets of region `index` until stopped. */
function startHost(peer, index, stats) {
  let stopping = false;
  const data = Buffer.alloc(writeBytes, index + 1);
  const regionBlocks = (regionMib * 1024 * 1024) / blockBytes;
  const step = writeBytes / blockBytes;
  const loop = (async () => {
    const c = await openSession(peer.iscsiPort, volume);
    try {
      while (!stopping) {
        const lba = index * regionBlocks + Math.floor(Math.random() * (regionBlocks / step)) * step;
        const r = await c.writeBlocks(lba, data, blockBytes, 30_000);
        if (r && r.status === 0) stats.writes++;
        else stats.errors++;
      }
    } finally {
      c.close();
    }
  })();
  return {
    loop,
    async stop() {
      stopping = true;
      await loop.catch(() => undefined);
    },
  };
}

/** The sum over `peers` of the counters this bench reads from /metrics. */
async function readMetrics(peers) {
  const sum = { local: 0, forwarded: 0, moves: 0 };
  for (const p of peers) {
    const text = await (await fetch(`http://127.0.0.1:${p.httpPort}/metrics`)).text();
    for (const line of text.split('\n')) {
      const m = /^(peersan_routed_runs_total|peersan_page_moves_total|peersan_page_moves_in_flight)(\{[^}]*\})? ([0-9.e+]+)$/.exec(line);
      if (!m) continue;
      const v = Number(m[3]);
      if (m[1] === 'peersan_routed_runs_total') sum[/path="local"/.test(m[2] ?? '') ? 'local' : 'forwarded'] += v;
      else sum.moves += v;
    }
  }
  return sum;
}

async function main(teardowns) {
  const missing = ['etcd'].filter((x) => !hasTool(x));
  if (missing.length) throw new Error(`missing ${missing.join(', ')}`);
  const { endpoint } = await startEtcd((fn) => teardowns.push(fn));
  const peers = await startPeers((fn) => teardowns.push(fn), {
    count: 3, etcd: endpoint, clusterYaml: ['hostBalance: { enabled: false }'], rootYaml: [`balancer: { intervalMs: ${args.intervalMs} }`],
  });
  const created = await peers[0].cliAsync('volume', 'create', volume, '--size', `${3 * regionMib}M`, '--replicas', String(args.replicas));
  if (created.status !== 0) throw new Error(`volume create: ${created.out.trim()}`);
  console.log(`follow-hosts: 3 peers, a volume of ${3 * regionMib} MiB with ${args.replicas} cop${args.replicas > 1 ? 'ies' : 'y'}, 3 hosts × ${args.sessions} sessions (host i through peer i, its own ${regionMib} MiB), 64 KiB random writes, balancer round every ${args.intervalMs} ms; load ${loadNow()}`);

  const first = await routes(peers[0]);
  console.log(`  pages at first: ${regions(first)}`);
  const stats = { writes: 0, errors: 0 };
  const hosts = peers.flatMap((p, i) => Array.from({ length: args.sessions }, () => startHost(p, i, stats)));
  teardowns.push(() => Promise.all(hosts.map((h) => h.stop())));
  const startMs = performance.now();
  const at = () => ((performance.now() - startMs) / 1000).toFixed(0);
  let prev = await readMetrics(peers);
  let prevRoutes = first;
  let prevWrites = 0;
  // below: the share first fell under the aim. settled: under the aim through a whole sample in
  // which no page's route changed (the balancer may still finish its last follow moves after
  // `below`); the quiet window runs from there.
  let below;
  let settled;
  const endMs = () => (settled === undefined ? startMs + Math.max(args.followS * 1000, below ? below.ms - startMs + 60_000 : 0) : settled.ms + args.quietS * 1000);
  while (performance.now() < endMs()) {
    await sleep(Math.min(args.sampleMs, Math.max(0, endMs() - performance.now())));
    const now = await readMetrics(peers);
    const nowRoutes = await routes(peers[0]);
    const local = now.local - prev.local;
    const forwarded = now.forwarded - prev.forwarded;
    const share = forwarded / Math.max(1, local + forwarded);
    const writes = stats.writes - prevWrites;
    const routeChanges = [...nowRoutes].filter(([p, r]) => prevRoutes.get(p) !== r).length;
    console.log(`  +${at()} s  forwarded ${(share * 100).toFixed(1)} % of ${local + forwarded} runs, ${writes} writes (${(writes / (args.sampleMs / 1000)).toFixed(0)}/s), routes changed ${routeChanges}, data moves so far ${now.moves}, host errors ${stats.errors}`);
    if (below === undefined && share < shareAim && local + forwarded > 0) {
      below = { ms: performance.now(), s: Number(at()) };
      console.log(`  forwarded share below ${shareAim * 100} % at +${below.s} s`);
    }
    if (below !== undefined && settled === undefined && share < shareAim && routeChanges === 0 && now.moves === prev.moves) {
      settled = { ms: performance.now(), s: Number(at()), moves: now.moves, routes: nowRoutes };
      console.log(`  settled at +${settled.s} s (forwarded under ${shareAim * 100} %, no route changed in the last sample); the same load for ${args.quietS} s more`);
    }
    prev = now;
    prevRoutes = nowRoutes;
    prevWrites = stats.writes;
  }
  const final = await readMetrics(peers);
  const last = await routes(peers[0]);
  for (const h of hosts) await h.stop();
  console.log(`  pages at the end: ${regions(last)}`);
  const followed = below !== undefined && below.s <= args.followS;
  const changed = settled ? [...last].filter(([p, r]) => settled.routes.get(p) !== r).map(([p, r]) => `${p}:${settled.routes.get(p)}→${r}`) : [];
  const quietMoves = settled === undefined ? NaN : Math.max(final.moves - settled.moves, changed.length);
  if (changed.length) console.log(`  routes changed in the quiet window: ${changed.join(' ')}`);
  console.log(`${followed ? 'PASS' : 'FAIL'} forwarded < ${shareAim * 100} % within ${args.followS} s: ${below ? `at +${below.s} s` : 'never'}`);
  console.log(`${quietMoves === 0 ? 'PASS' : 'FAIL'} no moves for ${args.quietS} s after: ${Number.isNaN(quietMoves) ? 'never settled' : `${quietMoves} pages moved or switched roles from +${settled.s} s to the end`} (${final.moves} data moves in all)`);
  console.log(`host writes ${stats.writes}, host errors ${stats.errors}`);
  if (!followed || quietMoves !== 0 || stats.errors > 0) process.exitCode = 1;
}

runSoak('follow-hosts', main);
