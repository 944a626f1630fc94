// The peer's RSS under the hostile loads of issue 15 items 2-4, next to its idle RSS, with a
// normal host doing I/O (and new hosts logging in) meanwhile (acceptance 3):
//
//   reads K        K sessions each queue 128 READs of 8 MiB and 256 immediate READs beyond
//                  the CmdSN window, and never read the answers (K = 1, 3, 8)
//   out-of-window  400,000 READs whose CmdSN lies outside the window
//   login-slots    64 connections stalled mid-header, 64 logins that never finish,
//                  256 Discovery sessions
//
// Each load runs on a fresh `peersan peer` process (dist/, via bin/peersan.js) for --hold-s
// seconds. Prints idle, peak, end and after-close RSS per load and how the host fared; exits
// 1 when a peak is more than --bound-mib above idle (default 512) or the host was not served.
// A load that passes twice the bound is ended there (the rest is not worth the machine's memory).
//
//   node bench/hostile-rss.js [--hold-s 8] [--sessions 1,3,8] [--commands 400000] [--bound-mib 512]
//
// The raw iSCSI clients are the test suite's (test/helpers/fuzz-hostile.ts), loaded with the
// project's TypeScript compiler (transpile only): one client for the test and the bench.
'use strict';

require('./lib/ts-require');

const { startFuzzGroup, rssOf } = require('../test/helpers/fuzz-group.ts');
const { formatReport, loginSlots, outOfWindow, readFlood, runLoad, waitServing } = require('../test/helpers/fuzz-hostile.ts');

const mib = 2 ** 20;

function parseArgs(argv) {
  const args = { holdS: 8, sessions: [1, 3, 8], commands: 400_000, boundMib: 512 };
  const flags = { '--hold-s': 'holdS', '--sessions': 'sessions', '--commands': 'commands', '--bound-mib': 'boundMib' };
  for (let i = 0; i < argv.length; i += 2) {
    const k = flags[argv[i]];
    if (!k) throw new Error(`unknown argument ${argv[i]} (known: ${Object.keys(flags).join(', ')})`);
    const v = k === 'sessions' ? argv[i + 1].split(',').map(Number) : Number(argv[i + 1]);
    if (![v].flat().every((n) => Number.isInteger(n) && n >= 1)) throw new Error(`${argv[i]} needs whole numbers ≥ 1, got ${argv[i + 1]}`);
    args[k] = v;
  }
  return args;
}

/** Everything started here, stopped in reverse order on exit, failure or Ctrl-C. */
const teardowns = [];
async function cleanup() {
  for (const fn of teardowns.splice(0).reverse()) await Promise.resolve(fn()).catch(() => undefined);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const boundBytes = args.boundMib * mib;
  const volumeBytes = 256 * mib;
  const g = await startFuzzGroup((fn) => teardowns.push(fn), 1, { hostile: { size: '256M' } });
  const target = { peer: g.peers[0], volume: 'hostile', volumeBytes };
  const loads = [
    ...args.sessions.map((k) => [`item 2: ${k} session(s) x 128 READs of 8 MiB unread + 256 immediate`, readFlood(k)]),
    [`item 3: ${args.commands} READs outside the CmdSN window`, outOfWindow(args.commands)],
    ['item 4: 64 half headers, 64 unfinished logins, 256 Discovery sessions', loginSlots(64, 64, 256)],
  ];
  console.log(`hostile-rss: one peer process, bound ${args.boundMib} MiB above idle, ${args.holdS} s per load`);
  const failed = [];
  for (const [i, [name, start]] of loads.entries()) {
    if (i > 0) {
      await target.peer.kill('SIGKILL');
      await target.peer.start();
    }
    if (!(await waitServing(target, 30_000))) throw new Error(`the peer does not serve before load ${name}`);
    const idleBytes = rssOf(target.peer.process.pid).rssBytes;
    const r = await runLoad(target, name, start, { idleBytes, holdMs: args.holdS * 1000, abortAboveBytes: 2 * boundBytes, loginEveryMs: 1000 });
    console.log(formatReport(r));
    const above = r.peakBytes - r.idleBytes;
    if (!r.alive) failed.push(`${name}: the peer exited`);
    if (above > boundBytes) failed.push(`${name}: peak ${Math.round(above / mib)} MiB above idle > ${args.boundMib} MiB`);
    if (r.host.ops === 0 || r.host.failures > 0 || r.host.loginsOk < r.host.logins) failed.push(`${name}: the normal host was not served (${r.host.ops} ok, ${r.host.failures} failed, logins ${r.host.loginsOk}/${r.host.logins})`);
  }
  console.log(failed.length === 0 ? 'hostile-rss: PASS' : `hostile-rss: FAIL\n  ${failed.join('\n  ')}`);
  if (failed.length > 0) process.exitCode = 1;
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    void cleanup().finally(() => process.exit(130));
  });
}
main()
  .catch((err) => {
    console.error(`bench failed: ${err.message}`);
    process.exitCode = 1;
  })
  .finally(async () => {
    await cleanup();
    // Sockets of a load the peer never answered may still be open: nothing left to wait for.
    process.exit();
  });
