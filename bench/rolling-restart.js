#!/usr/bin/env node
// Rolling restart (issue 18, acceptance 3): every peer in turn stopped gracefully (SIGTERM),
// started again and waited for until the volume is healthy, under a verifying host load, as an
// upgrade would do it; opt-in, not part of `npm test` (test/rolling-restart.test.ts runs a short one).
//
//   npm run build && node bench/rolling-restart.js [--rounds 1] [--peers 3] [--size-mib 256]
//        [--sessions 2] [--replicas 2] [--healthy-s 120] [--timeout-s 30] [--minutes 30] [--tls 1]
//
// --peers `peersan peer` processes on etcd (host balancing off, so each session stays on the
// portal it chose; the balancer on, so roles come back), one volume with --replicas copies of
// each page. The host (bench/lib/host-load.js): --sessions sessions through every portal, each
// writing verified 4 KiB blocks. Each step SIGTERMs one peer (a graceful stop: it hands its
// primary roles to in-sync copies and asks its hosts to log out first), starts it again once it
// exited, and waits until `volume show` says healthy. Sessions through the restarting peer wait
// for it and log in again (a single-path host whose portal restarts); their failures while it is
// down do not count. Counted:
//   host errors   a write through a peer that stays up that did not end GOOD within --timeout-s
//   lost writes   at the end every slot is read back (bench/lib/host-load.js, the ledger)
//   pause         per step, from the SIGTERM until healthy again: the longest time with no
//                 completed write at all on the sessions whose portal stays up (aim ≤ 500 ms),
//                 and the longest one of those sessions went without one (printed)
//   stop          how long the graceful stop took (SIGTERM to exit); a stop past 15 s is killed
// Exits 1 when a write was lost, a host saw an error, a step never got healthy, or the longest
// pause misses its aim. Results also go to bench/results/rolling-restart-<time>.json.
'use strict';

require('./lib/ts-require');
const { waitProtection } = require('../test/helpers/replicas.ts');
const { parseArgs, median, machine, loadNow, saveResults } = require('./lib/group');
const { startSoak, runSoak, longestGap, longestGapAt } = require('./lib/host-load');

const args = parseArgs({ rounds: 1, peers: 3, sizeMib: 256, sessions: 2, replicas: 2, healthyS: 120, timeoutS: 30, minutes: 30, tls: 0 }, {
  '--rounds': 'rounds', '--peers': 'peers', '--size-mib': 'sizeMib', '--sessions': 'sessions', '--replicas': 'replicas',
  '--healthy-s': 'healthyS', '--timeout-s': 'timeoutS', '--minutes': 'minutes', '--tls': 'tls',
});
const volume = 'rolling';
const pauseMsAim = 500;

async function main(teardowns) {
  const deadline = Date.now() + args.minutes * 60_000;
  const soak = await startSoak({
    volume, count: args.peers, sizeMib: args.sizeMib, replicas: args.replicas, sessions: args.sessions, timeoutS: args.timeoutS, tls: args.tls > 0, teardowns,
    yaml: { clusterYaml: ['hostBalance: { enabled: false }'] },
  });
  const { peers, live, livePeers, errors, loginFailures, writers } = soak;
  console.log(`rolling restart: ${peers.length} peers, volume of ${args.sizeMib} MiB with ${args.replicas} copies, ${writers.length} sessions (${args.sessions} per portal), ${args.rounds} round(s)${args.tls ? ', cluster.tls (mutual TLS between peers)' : ''}; load ${loadNow()}`);

  const steps = [];
  await waitProtection(livePeers, volume, 'healthy', args.healthyS * 1000);
  outer: for (let round = 1; round <= args.rounds; round++) {
    for (const peer of peers) {
      if (Date.now() >= deadline) {
        console.log(`stopped at the --minutes bound (${args.minutes} min) after ${steps.length} restarts`);
        break outer;
      }
      const errorsBefore = errors.length;
      const stopAt = performance.now();
      live.down(peer.id);
      await peer.kill('SIGTERM');
      const stopMs = Math.round(performance.now() - stopAt);
      await peer.start();
      live.back(peer.id);
      const restartedMs = Math.round(performance.now() - stopAt);
      let healthyMs;
      try {
        healthyMs = await waitProtection(livePeers, volume, 'healthy', args.healthyS * 1000);
      } catch (err) {
        console.log(`restart of ${peer.id}: ${err.message}; stopping`);
        steps.push({ round, peer: peer.id, healthy: false });
        break outer;
      }
      const healthyAt = performance.now();
      const through = writers.filter((w) => w.peer !== peer);
      const pause = longestGapAt(through.flatMap((w) => w.completions).sort((x, y) => x - y), stopAt, healthyAt);
      const pauseMs = Math.round(pause.gapMs);
      const pauseAtMs = Math.round(pause.fromMs - stopAt);
      const stallMs = Math.round(Math.max(...through.map((w) => longestGap(w.completions, stopAt, healthyAt))));
      const writes = writers.reduce((a, w) => a + w.completions.filter((t) => t > stopAt && t <= healthyAt).length, 0);
      const step = { round, peer: peer.id, pauseMs, pauseAtMs, stallMs, stopMs, restartedMs, healthyMs, writes, hostErrors: errors.length - errorsBefore };
      steps.push(step);
      console.log(`${peer.id}: stopped in ${stopMs} ms, back at +${restartedMs} ms, healthy ${healthyMs} ms after; pause ${pauseMs} ms from +${pauseAtMs} ms (worst session ${stallMs} ms), ${writes} writes, ${step.hostErrors} host errors; load ${loadNow()}`);
      for (const e of errors.slice(errorsBefore, errorsBefore + 5)) console.log(`  ${e.peer} session ${e.writer} at +${Math.round(e.atMs - stopAt)} ms: ${e.what}`);
    }
  }

  const { acknowledged, lost } = await soak.finish();
  const pauses = steps.map((s) => s.pauseMs).filter(Number.isFinite);
  const summary = {
    restarts: pauses.length, acknowledged, lost: lost.length, hostErrors: errors.length, loginFailures: loginFailures.length,
    pauseMsMax: pauses.length ? Math.max(...pauses) : NaN, pauseMsMedian: pauses.length ? median(pauses) : NaN,
    stallMsMax: pauses.length ? Math.max(...steps.map((s) => s.stallMs).filter(Number.isFinite)) : NaN,
    stopMsMax: pauses.length ? Math.max(...steps.map((s) => s.stopMs).filter(Number.isFinite)) : NaN,
  };
  console.log(`${summary.restarts} graceful restarts, ${acknowledged} acknowledged writes: ${summary.lost} lost, ${summary.hostErrors} host errors on sessions through peers that stayed up, ${summary.loginFailures} failed logins to up peers; longest pause ${summary.pauseMsMax} ms (aim ≤ ${pauseMsAim}), median ${summary.pauseMsMedian} ms; worst session stall ${summary.stallMsMax} ms; longest stop ${summary.stopMsMax} ms`);
  for (const l of lost.slice(0, 10)) console.log(`  lost: ${l}`);
  for (const e of [...errors, ...loginFailures].slice(0, 10)) console.log(`  ${e.peer} session ${e.writer} at ${new Date(e.at).toISOString()}: ${e.what}`);
  console.log(`results: ${saveResults('rolling-restart', { args, machine: machine(), steps, summary, lost: lost.slice(0, 100), errors: errors.slice(0, 100), loginFailures: loginFailures.slice(0, 100) })}`);
  const met = summary.lost === 0 && summary.hostErrors === 0 && steps.every((s) => s.healthy !== false) && summary.pauseMsMax <= pauseMsAim;
  if (!met) process.exitCode = 1;
}

runSoak('rolling restart', main);
