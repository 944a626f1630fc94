#!/usr/bin/env node
// peersan vs tgt (Debian tgt, file-backed LUN of the same size), same machine, same run.
//
//   npm run build && node bench/vs-tgt.js [--size-mib 1024] [--seconds 5] [--repeat 3]
//
// Both LUNs are filled completely first (a thin volume reads unwritten blocks without I/O,
// which would flatter peersan). Then, alternating between the two targets, each figure is
// measured --repeat times and the median printed:
//   4 KiB random read, depth 32     iscsi-perf -r -b 8 -m 32
//   4 KiB writes, depth 32          qemu-img bench -w -t none -d 32 -s 4096
//   128 KiB sequential read, d 16   iscsi-perf -b 256 -m 16
// Needs root (tgtd), iscsi-perf, qemu-img with the iscsi driver. Results also go to
// bench/results/vs-tgt-<time>.json.
'use strict';

const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const net = require('node:net');

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
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'peersan-bench-'));
const children = [];
const cleanups = [];

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

async function waitPort(port) {
  for (let i = 0; i < 150; i++) {
    const ok = await new Promise((r) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        r(true);
      });
      s.on('error', () => r(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`port ${port} never opened`);
}

function run(cmd, argv, timeoutMs = 600_000) {
  const r = spawnSync(cmd, argv, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`${cmd} ${argv.join(' ')} failed: ${r.stderr || r.stdout}`);
  return `${r.stdout}${r.stderr}`;
}

async function startTgt(sizeBytes) {
  const port = await freePort();
  const control = 1000 + Math.floor(Math.random() * 5000);
  const img = path.join(work, 'tgt.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, sizeBytes);
  const child = spawn('tgtd', ['-f', '-C', String(control), '--iscsi', `portal=127.0.0.1:${port}`], { stdio: 'ignore' });
  children.push(child);
  await waitPort(port);
  const adm = (...a) => run('tgtadm', ['-C', String(control), '--lld', 'iscsi', ...a]);
  adm('--op', 'new', '--mode', 'target', '--tid', '1', '-T', 'iqn.2001-04.com.example:bench');
  adm('--op', 'new', '--mode', 'logicalunit', '--tid', '1', '--lun', '1', '-b', img);
  adm('--op', 'bind', '--mode', 'target', '--tid', '1', '-I', 'ALL');
  return `iscsi://127.0.0.1:${port}/iqn.2001-04.com.example:bench/1`;
}

async function startPeersan(sizeBytes) {
  const [iscsi, rpc] = [await freePort(), await freePort()];
  const child = spawn(process.execPath, [path.join(root, 'bin', 'peersan.js'), 'demo', '--data', path.join(work, 'peersan'),
    '--iscsi-port', String(iscsi), '--rpc-port', String(rpc), '--http-port', String(await freePort()), '--size', `${sizeBytes}`], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(child);
  await new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      if (out.includes('\nready')) resolve();
    });
    child.on('exit', (code) => reject(new Error(`peersan demo exited (${code}): ${out}`)));
  });
  return `iscsi://127.0.0.1:${iscsi}/iqn.2026-11.io.peersan:demo/0`;
}

function iscsiPerf(url, extra) {
  const out = run('iscsi-perf', [...extra, '-t', String(args.seconds), url], (args.seconds + 30) * 1000);
  const m = /iops average (\d+) \((\d+) MB\/s\)\s*$/m.exec(out.replace(/\r/g, '\n').trim()) || [...out.matchAll(/iops average (\d+) \((\d+) MB\/s\)/g)].pop();
  if (!m) throw new Error(`cannot read iscsi-perf output: ${out.slice(-300)}`);
  return { iops: Number(m[1]), mbps: Number(m[2]) };
}

function qemuWrite(url) {
  const count = 200_000;
  const out = run('qemu-img', ['bench', '-f', 'raw', '-w', '-t', 'none', '-d', '32', '-s', '4096', '-c', String(count), url]);
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  if (!m) throw new Error(`cannot read qemu-img bench output: ${out}`);
  const iops = count / Number(m[1]);
  return { iops: Math.round(iops), mbps: Math.round((iops * 4096) / 1e6) };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function main() {
  const sizeBytes = args.sizeMib * 1024 * 1024;
  const targets = { peersan: await startPeersan(sizeBytes), tgt: await startTgt(sizeBytes) };
  const fill = path.join(work, 'fill.img');
  run('dd', ['if=/dev/urandom', `of=${fill}`, 'bs=1M', `count=${args.sizeMib}`, 'status=none']);
  for (const url of Object.values(targets)) run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', fill, url]);
  fs.rmSync(fill);

  const figures = [
    { name: '4 KiB random read, QD32 (IOPS)', unit: 'iops', measure: (u) => iscsiPerf(u, ['-r', '-b', '8', '-m', '32']) },
    { name: '4 KiB write, QD32 (IOPS)', unit: 'iops', measure: qemuWrite },
    { name: '128 KiB sequential read, QD16 (MB/s)', unit: 'mbps', measure: (u) => iscsiPerf(u, ['-b', '256', '-m', '16']) },
  ];
  const results = [];
  for (const f of figures) {
    const samples = { peersan: [], tgt: [] };
    for (let i = 0; i < args.repeat; i++) {
      for (const name of i % 2 === 0 ? ['peersan', 'tgt'] : ['tgt', 'peersan']) samples[name].push(f.measure(targets[name])[f.unit]);
    }
    const row = { figure: f.name, peersan: median(samples.peersan), tgt: median(samples.tgt), samples };
    row.ratio = row.peersan / row.tgt;
    results.push(row);
    console.log(`${row.figure.padEnd(40)} peersan ${String(row.peersan).padStart(7)}  tgt ${String(row.tgt).padStart(7)}  ratio ${row.ratio.toFixed(2)}`);
  }
  const machine = { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, memGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version };
  console.log(`machine: ${machine.cpus} x ${machine.cpu}, ${machine.memGiB} GiB, node ${machine.node}; medians of ${args.repeat}, ${args.seconds} s each, ${args.sizeMib} MiB LUNs filled with random data`);
  const dir = path.join(__dirname, 'results');
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, `vs-tgt-${Date.now()}.json`), JSON.stringify({ args, machine, results }, null, 2));
}

function cleanup() {
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  for (const f of cleanups) f();
  fs.rmSync(work, { recursive: true, force: true });
}
process.on('SIGINT', () => {
  cleanup();
  process.exit(130);
});
main()
  .catch((err) => {
    console.error(`bench failed: ${err.message}`);
    process.exitCode = 1;
  })
  .finally(cleanup);
