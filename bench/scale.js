#!/usr/bin/env node
// Cost grows with data, not with provisioned size (issue 19, acceptance 4).
//
//   npm run build && node bench/scale.js [--volumes 100] [--writes 1000]
//
// A group of three `peersan peer` processes on etcd (bench/lib/group.js: balancer and host
// balancing off), then one thin 64 TiB volume `big` (512-byte blocks: 16 777 216 pages of
// 4 MiB) and --volumes thin volumes of 1 TiB. Printed, in order:
//   idle       each peer's RSS (VmRSS of /proc/PID/status) once the volumes exist
//   admin      wall time of the CLI (a fresh node process each: start-up included, `--help` shows
//              how much) for
//              `page map big` (the summary), `--json page map big` (the first page of the paged
//              answer) and `--json page map big --from <last pages> --count 4096`, `status`,
//              `volume list`, `top --once`; each one's reply size
//   writes     one qemu-io host (through p1's portal) writes 64 KiB at --writes scattered
//              offsets across `big`, the last LBA's 64 KiB included; each peer's RSS after, and
//              its growth over idle
//   again      the admin calls once more (the routes and stores now hold data)
// Targets (the issue): RSS idle ≤ 256 MB per peer, growth ≤ 64 MB, page map ≤ 2 s both forms,
// the others ≤ 1 s. Bounded: --volumes ≤ 200, --writes ≤ 5000, every command has a deadline.
// Results also go to bench/results/scale-<time>.json (git-ignored).
'use strict';

const fs = require('node:fs');
const { peersanBin, parseArgs, run, startPeersan, sleep, loadNow, machine, saveResults, runBench } = require('./lib/group');

const args = parseArgs({ volumes: 100, writes: 1000 }, { '--volumes': 'volumes', '--writes': 'writes' });
if (args.volumes > 200 || args.writes > 5000) throw new Error('--volumes ≤ 200 and --writes ≤ 5000 (the bench stays a few minutes)');
const bigBytes = 64 * 1024 ** 4;
const writeBytes = 64 * 1024;
/** No admin command may take longer than this (a hung peer fails the bench instead of stalling it). */
const adminMsMax = 60_000;

function rssMb(pid) {
  // A peer that died (out of heap) has no /proc entry: -1.
  const text = fs.existsSync(`/proc/${pid}/status`) ? fs.readFileSync(`/proc/${pid}/status`, 'utf8') : '';
  const m = /VmRSS:\s+(\d+) kB/.exec(text);
  return m ? Math.round(Number(m[1]) / 1024) : -1;
}

/** One CLI command timed (a fresh node process: start-up included); its time and reply size. */
async function timed(pc, argv) {
  const t = performance.now();
  const command = `peersan ${argv.join(' ')}`;
  try {
    const out = await run(process.execPath, [peersanBin, '--config', pc.config, ...argv], adminMsMax);
    return { command, ms: Math.round(performance.now() - t), bytes: out.length };
  } catch (err) {
    // Printed and kept: a failing call is a figure of this bench, not the end of it.
    return { command, ms: Math.round(performance.now() - t), bytes: 0, error: err.message.slice(-200) };
  }
}

/** The admin calls of the acceptance, one after another (printed as they come). */
async function adminCalls(pc, phase) {
  const pages = bigBytes / (8192 * 512);
  const calls = [
    // Node's start-up and the CLI's loading, no call: the share of each figure below that is not the peer's.
    ['--help'],
    ['page', 'map', 'big'],
    ['--json', 'page', 'map', 'big'],
    ['--json', 'page', 'map', 'big', '--from', String(pages - 4096), '--count', '4096'],
    ['status'],
    ['volume', 'list'],
    ['top', '--once'],
  ];
  const out = [];
  for (const c of calls) {
    const r = await timed(pc, c);
    console.log(`  ${phase.padEnd(6)} ${r.command.padEnd(64)} ${String(r.ms).padStart(6)} ms  ${r.error ? `FAILED: ${r.error}` : `${r.bytes} bytes`}`);
    out.push(r);
  }
  return out;
}

/** POST /api/volumes on a peer's HTTP port (the admin token of bench/lib/group.js's cluster.yaml). */
async function createOverHttp(peer, name, size) {
  const r = await fetch(`http://127.0.0.1:${peer.http}/api/volumes`, {
    method: 'POST', headers: { authorization: 'Bearer bench-token', 'content-type': 'application/json' },
    body: JSON.stringify({ name, size }), signal: AbortSignal.timeout(adminMsMax),
  });
  if (r.status !== 201) throw new Error(`creating ${name}: HTTP ${r.status} ${await r.text()}`);
}

/** 64 KiB writes at `n` offsets spread over the volume (the last one at its very end), one qemu-io. */
async function scatteredWrites(url, n) {
  const slots = bigBytes / writeBytes;
  const cmds = [];
  for (let i = 0; i < n; i++) {
    const slot = i === n - 1 ? slots - 1 : Math.floor((i * slots) / n) + (i % 7);
    cmds.push('-c', `write -P ${1 + (i % 255)} ${slot * writeBytes} ${writeBytes}`);
  }
  const t = performance.now();
  await run('qemu-io', ['-f', 'raw', '-t', 'none', ...cmds, url], 600_000);
  return Math.round(performance.now() - t);
}

async function main() {
  console.log(`machine: ${JSON.stringify(machine())}, load ${loadNow()}`);
  // The helper's own small volume `bench` stays: one more volume, 1 MiB.
  const pc = await startPeersan(1024 * 1024, 512);
  const rss = (label) => pc.peers.map((p) => ({ peer: p.id, label, rssMb: rssMb(p.pid) }));
  const started = rss('started');
  const t0 = performance.now();
  await pc.cli('volume', 'create', 'big', '--size', String(bigBytes));
  // The 1 TiB volumes through the HTTP admin API (a CLI process each would take minutes on a busy machine).
  for (let i = 0; i < args.volumes; i++) {
    const t1 = performance.now();
    await createOverHttp(pc.peers[i % 3], `v${i}`, '1T');
    if (i % 20 === 19) console.log(`  ${i + 1} volumes of 1 TiB, the last took ${Math.round(performance.now() - t1)} ms; RSS ${rss('').map((x) => `${x.peer} ${x.rssMb} MB`).join(', ')}`);
  }
  console.log(`created big (64 TiB) and ${args.volumes} volumes of 1 TiB in ${Math.round(performance.now() - t0)} ms`);
  await sleep(3000);
  const idle = rss('idle');
  console.log(`RSS started: ${started.map((x) => `${x.peer} ${x.rssMb} MB`).join(', ')}`);
  console.log(`RSS idle:    ${idle.map((x) => `${x.peer} ${x.rssMb} MB`).join(', ')}  (target ≤ 256 MB)`);
  const before = await adminCalls(pc, 'idle');
  const afterAdmin = rss('after admin');
  console.log(`RSS after the admin calls: ${afterAdmin.map((x) => `${x.peer} ${x.rssMb} MB`).join(', ')}`);
  const url = `iscsi://127.0.0.1:${pc.peers[0].iscsi}/iqn.2026-11.io.peersan:big/0`;
  const writesMs = await scatteredWrites(url, args.writes);
  await sleep(2000);
  const written = rss('after writes');
  console.log(`${args.writes} writes of 64 KiB across big (its last LBA included) in ${writesMs} ms`);
  console.log(`RSS after writes: ${written.map((x, i) => `${x.peer} ${x.rssMb} MB (+${x.rssMb - afterAdmin[i].rssMb})`).join(', ')}  (target growth ≤ 64 MB)`);
  const after = await adminCalls(pc, 'again');
  const end = rss('end');
  console.log(`RSS at the end: ${end.map((x) => `${x.peer} ${x.rssMb} MB`).join(', ')}`);
  const file = saveResults('scale', { machine: machine(), args, rss: [...started, ...idle, ...afterAdmin, ...written, ...end], writesMs, admin: { before, after } });
  console.log(`results: ${file}`);
}

runBench(main);
