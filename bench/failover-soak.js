#!/usr/bin/env node
// Failover soak (issue 17, acceptance 3): kill -9 of a random peer, again and again, under a
// verifying host load; opt-in, not part of `npm test`.
//
//   npm run build && node bench/failover-soak.js [--cycles 20] [--size-mib 256] [--sessions 2]
//        [--down-s 5] [--healthy-s 120] [--minutes 60] [--replicas 2] [--timeout-s 30] [--tls 1]
//
// Three `peersan peer` processes on etcd (balancer and host balancing off), one volume with
// --replicas copies of each page. The host is the test suite's raw initiator
// (test/helpers/fuzz-iscsi.ts): --sessions sessions through every peer's portal, each writing
// 4 KiB blocks one at a time at random slots of its own, every block saying which write it is
// (test/helpers/replicas.ts). --tls 1 gives the group `cluster.tls` (mutual TLS between peers,
// block data streams included), as `peersan demo` and a secure group run. Each cycle waits
// until `volume show` says the volume is healthy, SIGKILLs a random peer, lets the load run
// --down-s seconds, restarts the peer, and waits for healthy again. The sessions through the
// killed peer wait for its restart and log in again; their failures do not count. Counted:
//   host errors   a write through a live peer that did not end GOOD within --timeout-s (the
//                 Linux SCSI default command timeout is 30 s); failed logins to a live peer
//                 (a restarted one included) are counted apart
//   lost writes   at the end, every slot is read back: one holding anything but its last
//                 acknowledged write (or the write whose outcome its host never learned, after
//                 which the slot is not written again) is a lost acknowledged write
//   pause         per cycle, from the last completion before the kill until the volume is healthy
//                 again: the longest time with no completed write at all on the sessions through
//                 live peers (the acceptance's figure), and the longest time one of those
//                 sessions went without one (the worst stall a host saw; printed, not judged)
// Prints each cycle, then max and median pause; exits 1 when a write was lost, a host saw an
// error, or the pauses miss the aims (max ≤ 3 s, median ≤ 1.5 s). Bounded: every wait has a
// bound and the whole soak stops cycling after --minutes (reporting what it did). Results also
// go to bench/results/failover-soak-<time>.json.
'use strict';

require('./lib/ts-require');
const { waitProtection } = require('../test/helpers/replicas.ts');
const { parseArgs, median, machine, loadNow, saveResults } = require('./lib/group');
const { startSoak, runSoak, longestGap } = require('./lib/host-load');

const args = parseArgs({ cycles: 20, sizeMib: 256, sessions: 2, downS: 5, healthyS: 120, minutes: 60, replicas: 2, timeoutS: 30, tls: 0 }, {
  '--cycles': 'cycles', '--size-mib': 'sizeMib', '--sessions': 'sessions', '--down-s': 'downS', '--healthy-s': 'healthyS',
  '--minutes': 'minutes', '--replicas': 'replicas', '--timeout-s': 'timeoutS', '--tls': 'tls',
});
const volume = 'soak';
const pauseMsAim = 3_000;
const medianPauseMsAim = 1_500;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main(teardowns) {
  const deadline = Date.now() + args.minutes * 60_000;
  const soak = await startSoak({
    volume, count: 3, sizeMib: args.sizeMib, replicas: args.replicas, sessions: args.sessions, timeoutS: args.timeoutS, tls: args.tls > 0, teardowns,
    yaml: { clusterYaml: ['hostBalance: { enabled: false }'], rootYaml: ['balancer: { enabled: false }'] },
  });
  const { peers, live, livePeers, errors, loginFailures, writers } = soak;
  console.log(`failover soak: ${peers.length} peers, volume of ${args.sizeMib} MiB with ${args.replicas} copies, ${writers.length} sessions (${args.sessions} per portal), ${args.cycles} cycles, down ${args.downS} s${args.tls ? ', cluster.tls (mutual TLS between peers)' : ''}; load ${loadNow()}`);

  const cycles = [];
  await waitProtection(livePeers, volume, 'healthy', args.healthyS * 1000);
  for (let n = 1; n <= args.cycles && Date.now() < deadline; n++) {
    const victim = peers[Math.floor(Math.random() * peers.length)];
    const killAt = performance.now();
    const errorsBefore = errors.length;
    live.down(victim.id);
    await victim.kill('SIGKILL');
    await sleep(args.downS * 1000);
    await victim.start();
    live.back(victim.id);
    const restartedMs = Math.round(performance.now() - killAt);
    let healthyMs;
    try {
      healthyMs = await waitProtection(livePeers, volume, 'healthy', args.healthyS * 1000);
    } catch (err) {
      console.log(`cycle ${n}: ${err.message}; stopping`);
      cycles.push({ n, victim: victim.id, pauseMs: NaN, healthy: false });
      break;
    }
    const healthyAt = performance.now();
    const through = writers.filter((w) => w.peer !== victim);
    const pauseMs = Math.round(longestGap(through.flatMap((w) => w.completions).sort((x, y) => x - y), killAt, healthyAt));
    const stallMs = Math.round(Math.max(...through.map((w) => longestGap(w.completions, killAt, healthyAt))));
    const writes = writers.reduce((a, w) => a + w.completions.filter((t) => t > killAt && t <= healthyAt).length, 0);
    const cycle = { n, victim: victim.id, pauseMs, stallMs, restartedMs, healthyMs, writes, hostErrors: errors.length - errorsBefore };
    cycles.push(cycle);
    const cycleErrors = errors.slice(errorsBefore).map((e) => `${e.peer} session ${e.writer} at +${Math.round(e.atMs - killAt)} ms: ${e.what}`);
    console.log(`cycle ${String(n).padStart(2)}: kill -9 ${victim.id}, pause ${pauseMs} ms (worst session ${stallMs} ms), restarted at +${restartedMs} ms, healthy ${healthyMs} ms after, ${writes} writes, ${cycle.hostErrors} host errors; load ${loadNow()}`);
    for (const e of cycleErrors.slice(0, 5)) console.log(`  ${e}`);
  }
  if (Date.now() >= deadline) console.log(`stopped cycling at the --minutes bound (${args.minutes} min) after ${cycles.length} cycles`);

  const { acknowledged, lost } = await soak.finish();
  const pauses = cycles.map((c) => c.pauseMs).filter(Number.isFinite);
  const summary = {
    cycles: cycles.length, acknowledged, lost: lost.length, hostErrors: errors.length, loginFailures: loginFailures.length,
    pauseMsMax: pauses.length ? Math.max(...pauses) : NaN, pauseMsMedian: pauses.length ? median(pauses) : NaN,
    stallMsMax: pauses.length ? Math.max(...cycles.map((c) => c.stallMs).filter(Number.isFinite)) : NaN,
  };
  console.log(`${summary.cycles} cycles, ${acknowledged} acknowledged writes: ${summary.lost} lost, ${summary.hostErrors} host errors on sessions through live peers, ${summary.loginFailures} failed logins to live peers; failover pause max ${summary.pauseMsMax} ms (aim ≤ ${pauseMsAim}), median ${summary.pauseMsMedian} ms (aim ≤ ${medianPauseMsAim}); worst session stall ${summary.stallMsMax} ms`);
  for (const l of lost.slice(0, 10)) console.log(`  lost: ${l}`);
  for (const e of [...errors, ...loginFailures].slice(0, 10)) console.log(`  ${e.peer} session ${e.writer} at ${new Date(e.at).toISOString()}: ${e.what}`);
  console.log(`results: ${saveResults('failover-soak', { args, machine: machine(), cycles, summary, lost: lost.slice(0, 100), errors: errors.slice(0, 100), loginFailures: loginFailures.slice(0, 100) })}`);
  const met = summary.lost === 0 && summary.hostErrors === 0 && cycles.every((c) => c.healthy !== false) && summary.pauseMsMax <= pauseMsAim && summary.pauseMsMedian <= medianPauseMsAim;
  if (!met) process.exitCode = 1;
}

runSoak('soak', main);
