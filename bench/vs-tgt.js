#!/usr/bin/env node
// peersan vs tgt (Debian tgt, file-backed LUN of the same size), same machine, same run; and
// peersan local vs forwarded.
//
//   npm run build && node bench/vs-tgt.js [--size-mib 1024] [--seconds 5] [--repeat 3]
//
// peersan runs as a group of two `peersan peer` processes sharing an etcd catalog (as two
// machines would; each process gets its own core on a 2-core box). The volume is placed on
// p1 only, so the same volume is measured through two portals:
//   local      p1's portal: p1 owns every page, no RPC
//   forwarded  p2's portal: p2 owns none, every command goes to p1 over their data stream
// Both LUNs (peersan's, tgt's) are filled completely first (a thin volume reads unwritten
// blocks without I/O, which would flatter peersan). Then, rotating between the targets,
// each figure is measured --repeat times and the median printed:
//   4 KiB random read, depth 32     iscsi-perf -r -b 8 -m 32
//   4 KiB writes, depth 32          qemu-img bench -w -t none -d 32 -s 4096
//   128 KiB sequential read, d 16   iscsi-perf -b 256 -m 16
// Needs root (tgtd), etcd, iscsi-perf, qemu-img with the iscsi driver. Results also go to
// bench/results/vs-tgt-<time>.json.
'use strict';

const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const args = { sizeMib: 1024, seconds: 5, repeat: 3 };
for (let i = 2; i < process.argv.length; i += 2) {
  const k = process.argv[i];
  const v = Number(process.argv[i + 1]);
  if (k === '--size-mib') args.sizeMib = v;
  else if (k === '--seconds') args.seconds = v;
  else if (k === '--repeat') args.repeat = v;
  else throw new Error(`unknown argument ${k}`);
}

const root = path.join(__dirname, '..');
// The scratch directory, free ports, port waits and clean-up (children killed, scratch
// directory removed, on exit and on Ctrl-C) are bench/lib/group.js's.
const { work, children, freePort, waitPort, runBench, startEtcd, startTgt, iscsiPerf, qemuImgWrites } = require('./lib/group');

function run(cmd, argv, timeoutMs = 600_000) {
  const r = spawnSync(cmd, argv, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`${cmd} ${argv.join(' ')} failed: ${r.stderr || r.stdout}`);
  return `${r.stdout}${r.stderr}`;
}

/** Two peer processes on etcd, volume `bench` placed on p1 only: returns p1's and p2's URLs. */
async function startPeersan(sizeBytes) {
  const etcd = await startEtcd();
  const peers = [];
  for (const id of ['p1', 'p2']) peers.push({ id, iscsi: await freePort(), rpc: await freePort(), http: await freePort() });
  const config = path.join(work, 'cluster.yaml');
  fs.writeFileSync(config, ['cluster:', '  name: bench', '  adminToken: bench-token', '  secret: bench-secret', `  catalog: { backend: etcd, endpoints: [${etcd}] }`,
    // No page moves, no host redirects: "forwarded" must stay forwarded for the whole run.
    '  hostBalance: { enabled: false }', 'balancer: { enabled: false }', 'peers:',
    ...peers.map((p) => `  - { id: ${p.id}, iscsi: 127.0.0.1:${p.iscsi}, rpc: 127.0.0.1:${p.rpc}, http: 127.0.0.1:${p.http}, data: ./${p.id} }`), ''].join('\n'));
  for (const p of peers) {
    children.add(spawn(process.execPath, [path.join(root, 'bin', 'peersan.js'), 'peer', '--config', config, '--id', p.id], { stdio: 'ignore' }));
    await waitPort(p.iscsi);
  }
  run(process.execPath, [path.join(root, 'bin', 'peersan.js'), '--config', config, 'volume', 'create', 'bench', '--size', String(sizeBytes), '--peers', 'p1']);
  const url = (p) => `iscsi://127.0.0.1:${p.iscsi}/iqn.2026-11.io.peersan:bench/0`;
  return { local: url(peers[0]), forwarded: url(peers[1]) };
}


const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function main() {
  const sizeBytes = args.sizeMib * 1024 * 1024;
  const peersan = await startPeersan(sizeBytes);
  const targets = { peersan: peersan.local, forwarded: peersan.forwarded, tgt: await startTgt(sizeBytes) };
  const fill = path.join(work, 'fill.img');
  run('dd', ['if=/dev/urandom', `of=${fill}`, 'bs=1M', `count=${args.sizeMib}`, 'status=none']);
  for (const url of [targets.peersan, targets.tgt]) run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', fill, url]);
  fs.rmSync(fill);

  const figures = [
    { name: '4 KiB random read, QD32 (IOPS)', unit: 'iops', measure: (u) => iscsiPerf(u, ['-r', '-b', '8', '-m', '32'], args.seconds) },
    { name: '4 KiB write, QD32 (IOPS)', unit: 'iops', measure: (u) => qemuImgWrites(u, { bytes: 4096, depth: 32, count: 200_000 }) },
    { name: '128 KiB sequential read, QD16 (MB/s)', unit: 'mbps', measure: (u) => iscsiPerf(u, ['-b', '256', '-m', '16'], args.seconds) },
  ];
  const results = [];
  const names = Object.keys(targets);
  console.log(`${''.padEnd(40)} ${'local'.padStart(9)} ${'forwarded'.padStart(9)} ${'tgt'.padStart(9)}  local/tgt  fwd/local`);
  for (const f of figures) {
    const samples = { peersan: [], forwarded: [], tgt: [] };
    for (let i = 0; i < args.repeat; i++) {
      // Rotate the order so no target always runs first (page cache, CPU frequency).
      for (let k = 0; k < names.length; k++) {
        const name = names[(i + k) % names.length];
        samples[name].push((await f.measure(targets[name]))[f.unit]);
      }
    }
    const row = { figure: f.name, peersan: median(samples.peersan), forwarded: median(samples.forwarded), tgt: median(samples.tgt), samples };
    row.ratio = row.peersan / row.tgt;
    row.forwardedRatio = row.forwarded / row.peersan;
    results.push(row);
    console.log(`${row.figure.padEnd(40)} ${String(row.peersan).padStart(9)} ${String(row.forwarded).padStart(9)} ${String(row.tgt).padStart(9)}  ${row.ratio.toFixed(2).padStart(9)}  ${row.forwardedRatio.toFixed(2).padStart(9)}`);
  }
  const machine = { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, memGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version };
  console.log(`machine: ${machine.cpus} x ${machine.cpu}, ${machine.memGiB} GiB, node ${machine.node}; medians of ${args.repeat}, ${args.seconds} s each, ${args.sizeMib} MiB LUNs filled with random data`);
  console.log('local = through the portal of the peer that owns every page; forwarded = through a peer that owns none (two peer processes, etcd catalog)');
  const dir = path.join(__dirname, 'results');
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, `vs-tgt-${Date.now()}.json`), JSON.stringify({ args, machine, results }, null, 2));
}

runBench(main);
