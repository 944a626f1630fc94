// Shared by the benches that run a group of `peersan peer` processes on etcd and a qemu-io
// host against it (migration-latency.js, snapshot.js, replication.js, vs-tgt.js): child processes, ports, the group, the
// host's timed writes, percentiles, CPU and load readings, clean-up on exit and on Ctrl-C.
'use strict';

const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const net = require('node:net');
const { parseStat, ticksPerSec } = require('./cpu');

const root = path.join(__dirname, '..', '..');
const peersanBin = path.join(root, 'bin', 'peersan.js');
/** Scratch directory of this bench run (data dirs, logs, config); removed by cleanup(). */
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'peersan-bench-'));
const children = new Set();
/** Bounds: no client step may hang the bench. */
const commandMsMax = 600_000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Parse `--flag N` pairs into `defaults` (whole numbers ≥ 1); `flags` maps a flag to its key. */
function parseArgs(defaults, flags, argv = process.argv.slice(2)) {
  const args = { ...defaults };
  for (let i = 0; i < argv.length; i += 2) {
    const k = flags[argv[i]];
    const v = Number(argv[i + 1]);
    if (!k) throw new Error(`unknown argument ${argv[i]} (known: ${Object.keys(flags).join(', ')})`);
    if (!Number.isInteger(v) || v < 1) throw new Error(`${argv[i]} needs a whole number, got ${argv[i + 1]}`);
    args[k] = v;
  }
  return args;
}

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
  for (let i = 0; i < 300; i++) {
    const ok = await new Promise((r) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        r(true);
      });
      s.on('error', () => r(false));
    });
    if (ok) return;
    await sleep(100);
  }
  throw new Error(`port ${port} never opened`);
}

/** Start a long-lived child that cleanup() kills. */
function daemon(cmd, argv, opts = {}) {
  const child = spawn(cmd, argv, { stdio: 'ignore', ...opts });
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}

/** Run a command to completion without blocking the event loop (other clients run meanwhile). */
function run(cmd, argv, timeoutMs = commandMsMax) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      children.delete(child);
      if (code === 0) resolve(out);
      else reject(new Error(`${path.basename(cmd)} ${argv.join(' ')} failed (${signal ?? code}): ${out.trim().slice(-500)}`));
    });
  });
}

async function startEtcd() {
  const [client, peer] = [await freePort(), await freePort()];
  daemon('etcd', ['--name', 'bench', '--data-dir', path.join(work, `etcd-${client}`),
    '--listen-client-urls', `http://127.0.0.1:${client}`, '--advertise-client-urls', `http://127.0.0.1:${client}`,
    '--listen-peer-urls', `http://127.0.0.1:${peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`,
    '--initial-cluster', `bench=http://127.0.0.1:${peer}`, '--log-level', 'error']);
  await waitPort(client);
  return `http://127.0.0.1:${client}`;
}

/** tgtd with one file-backed LUN of `sizeBytes` (the reference target, same machine); its iSCSI URL and tgtd's pid. */
async function startTgtProcess(sizeBytes, blockSize = 512) {
  const port = await freePort();
  const control = 1000 + Math.floor(Math.random() * 5000);
  const img = path.join(work, 'tgt.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, sizeBytes);
  const tgtd = daemon('tgtd', ['-f', '-C', String(control), '--iscsi', `portal=127.0.0.1:${port}`]);
  await waitPort(port);
  const adm = (...a) => run('tgtadm', ['-C', String(control), '--lld', 'iscsi', ...a]);
  await adm('--op', 'new', '--mode', 'target', '--tid', '1', '-T', 'iqn.2001-04.com.example:bench');
  await adm('--op', 'new', '--mode', 'logicalunit', '--tid', '1', '--lun', '1', '-b', img, '--blocksize', String(blockSize));
  await adm('--op', 'bind', '--mode', 'target', '--tid', '1', '-I', 'ALL');
  return { url: `iscsi://127.0.0.1:${port}/iqn.2001-04.com.example:bench/1`, pid: tgtd.pid };
}

/** startTgtProcess's iSCSI URL alone. */
const startTgt = async (sizeBytes, blockSize) => (await startTgtProcess(sizeBytes, blockSize)).url;

/**
 * Peer processes `ids` on etcd, default migration settings, no automatic page or host moves,
 * each with the GC / event-loop probe (bench/peer-probe.js) unless `probe` is false (the benches
 * that count CPU per operation leave it out); volume `bench` spread over them, or as
 * `volumeArgs` (more `volume create` flags, e.g. --peers p1) says. With `tls`, the group has
 * `cluster.tls` (`peersan init` makes the CA and the peers' certificates): peer calls and block
 * data streams run over mutual TLS.
 */
async function startPeersan(sizeBytes, blockSize, { ids = ['p1', 'p2', 'p3'], volumeArgs = [], probe = true, tls = false } = {}) {
  const etcd = await startEtcd();
  const peers = [];
  for (const id of ids) peers.push({ id, iscsi: await freePort(), rpc: await freePort(), http: await freePort(), log: path.join(work, `${id}.log`), probe: path.join(work, `${id}.probe`) });
  const config = path.join(work, 'cluster.yaml');
  fs.writeFileSync(config, ['cluster:', '  name: bench', '  adminToken: bench-token', '  secret: bench-secret', `  catalog: { backend: etcd, endpoints: [${etcd}] }`,
    '  hostBalance: { enabled: false }', 'balancer: { enabled: false }', 'peers:',
    ...peers.map((p) => `  - { id: ${p.id}, iscsi: 127.0.0.1:${p.iscsi}, rpc: 127.0.0.1:${p.rpc}, http: 127.0.0.1:${p.http}, data: ./${p.id} }`), ''].join('\n'));
  if (tls) await run(process.execPath, [peersanBin, 'init', '--dir', work]);
  for (const p of peers) {
    // The peers log JSON to stderr: kept, for the benches that read events from it.
    const fd = fs.openSync(p.log, 'a');
    const env = probe ? { ...process.env, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --require ${path.join(__dirname, '..', 'peer-probe.js')}`, PEERSAN_PROBE_FILE: p.probe } : process.env;
    p.pid = daemon(process.execPath, [peersanBin, 'peer', '--config', config, '--id', p.id], { stdio: ['ignore', 'ignore', fd], env }).pid;
    fs.closeSync(fd);
    await waitPort(p.iscsi);
  }
  const cli = (...a) => run(process.execPath, [peersanBin, '--config', config, ...a]);
  await cli('volume', 'create', 'bench', '--size', String(sizeBytes), '--block-size', String(blockSize), ...volumeArgs);
  const map = JSON.parse(await cli('--json', 'page', 'map', 'bench'));
  // Each peer says in its 'peer started' line whether it runs with cluster.tls: a bench that
  // asked for TLS and got a plain group would measure the wrong path.
  for (const p of peers) {
    let started;
    for (let i = 0; i < 100 && !started; i++) {
      started = fs.readFileSync(p.log, 'utf8').split('\n').filter((l) => l.includes('"msg":"peer started"')).map((l) => JSON.parse(l)).pop();
      if (!started) await sleep(100);
    }
    if (started?.peerTls !== tls) throw new Error(`peer ${p.id} started with peerTls ${started?.peerTls}, the bench asked for ${tls}`);
  }
  return { peers, cli, config, map, url: `iscsi://127.0.0.1:${peers[0].iscsi}/iqn.2026-11.io.peersan:bench/0` };
}

/** Fill a LUN (or several) completely with the same random data, so no grain is thin. */
async function fillRandom(urls, sizeMib) {
  const fill = path.join(work, 'fill.img');
  await run('dd', ['if=/dev/urandom', `of=${fill}`, 'bs=1M', `count=${sizeMib}`, 'status=none']);
  for (const url of urls) await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', fill, url]);
  fs.rmSync(fill);
}

// ---- the host: iscsi-perf and qemu-img bench -------------------------------------------------------

/**
 * iscsi-perf (reads only) for `seconds` against `url`, with its flags `extra`: its average IOPS
 * and MB/s, and the operations done (its average over its run time, `seconds`).
 */
async function iscsiPerf(url, extra, seconds) {
  const out = await run('iscsi-perf', [...extra, '-t', String(seconds), url], (seconds + 30) * 1000);
  const m = /iops average (\d+) \((\d+) MB\/s\)\s*$/m.exec(out.replace(/\r/g, '\n').trim()) || [...out.matchAll(/iops average (\d+) \((\d+) MB\/s\)/g)].pop();
  if (!m) throw new Error(`cannot read iscsi-perf output: ${out.slice(-300)}`);
  return { iops: Number(m[1]), mbps: Number(m[2]), ops: Number(m[1]) * seconds };
}

/**
 * A qemu-img bench step (-S, bytes) that scatters `bytes`-sized writes over a LUN of
 * `sizeBytes`: qemu-img adds the step to the offset and wraps it modulo (size - bytes), so a
 * step of k slots with k prime to the slot count visits every slot once per cycle, and with k
 * near the golden section of the LUN no two writes in flight together are adjacent (a target
 * cannot merge them, as with random offsets).
 */
function scatteredStep(sizeBytes, bytes) {
  const slots = sizeBytes / bytes - 1;
  const gcd = (a, b) => (b ? gcd(b, a % b) : a);
  let k = Math.round(slots * 0.381966);
  while (gcd(k, slots) !== 1) k++;
  return k * bytes;
}

/**
 * `qemu-img bench -w`: writes of `bytes`, `depth` outstanding, `count` of them, each `step` bytes
 * after the one before (sequential when absent; see scatteredStep), wrapping at the end. IOPS,
 * MB/s, operations done.
 */
async function qemuImgWrites(url, { bytes, depth, count, step }) {
  const out = await run('qemu-img', ['bench', '-f', 'raw', '-w', '-t', 'none', '-d', String(depth), '-s', String(bytes), '-c', String(count), ...(step ? ['-S', String(step)] : []), url]);
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  if (!m) throw new Error(`cannot read qemu-img bench output: ${out}`);
  const iops = count / Number(m[1]);
  return { iops: Math.round(iops), mbps: Math.round((iops * bytes) / 1e6), ops: count };
}

// ---- the host: qemu-io, random writes at a fixed depth -----------------------------------------

/**
 * One phase of host writes (qemu-io driven interactively, see migration-latency.js's header):
 * `depth` writes of `writeBytes` at random offsets kept outstanding for `seconds` after a
 * `warmupMs` warm-up. Returns each measured request's latency (µs), offset and completion time
 * (epoch ms), and the window. `onMeasureStart` is called when the measured window begins.
 */
function hostWrites(url, sizeBytes, seconds, { depth = 8, writeBytes = 4096, warmupMs = 1000, onMeasureStart } = {}) {
  return new Promise((resolve, reject) => {
    const q = spawn('stdbuf', ['-i0', '-oL', 'qemu-io', '-f', 'raw', '-t', 'none', url], { stdio: ['pipe', 'pipe', 'pipe'] });
    children.add(q);
    const slots = sizeBytes / writeBytes;
    const latenciesUs = [];
    const offsets = [];
    const doneAtMs = [];
    let offset = -1;
    const errors = [];
    let stderr = '';
    let pending = '';
    let started = false;
    let measuring = false;
    let sent = 0;
    let done = 0;
    let tMeasure = 0;
    let tEnd = 0;
    let finished = false;
    const guard = setTimeout(() => q.kill('SIGKILL'), (seconds + 60) * 1000);
    const send = (n) => {
      let s = '';
      for (let i = 0; i < n; i++, sent++) s += `aio_write -P ${1 + (sent % 255)} ${crypto.randomInt(slots) * writeBytes} ${writeBytes}\n`;
      q.stdin.write(s);
    };
    q.stderr.on('data', (d) => (stderr += d));
    q.stdout.on('data', (d) => {
      pending += d;
      if (!started) {
        // The first prompt: the image is open (logged in); start the clock.
        if (!pending.includes('qemu-io> ')) return;
        started = true;
        tMeasure = performance.now() + warmupMs;
        tEnd = tMeasure + seconds * 1000;
        send(depth);
      }
      // Whole lines only; the prompt "qemu-io> " precedes each report without a newline.
      const lines = pending.split('\n');
      pending = lines.pop();
      for (const line of lines) {
        const at = /wrote \d+\/\d+ bytes at offset (\d+)/.exec(line);
        if (at) offset = Number(at[1]);
        const ok = /([\d.]+) ops\/sec\)/.exec(line);
        const failed = /aio_write failed: .*/.exec(line);
        if (!ok && !failed) continue;
        done++;
        const now = performance.now();
        if (!measuring && now >= tMeasure) {
          measuring = true;
          onMeasureStart?.(performance.timeOrigin + tMeasure);
        }
        if (failed) errors.push({ atMs: performance.timeOrigin + now, message: failed[0] });
        else if (now >= tMeasure && now < tEnd) {
          latenciesUs.push(1e6 / Number(ok[1]));
          offsets.push(offset);
          doneAtMs.push(performance.timeOrigin + now);
        }
        if (now < tEnd) send(1);
      }
      if (done === sent && performance.now() >= tEnd && !finished) {
        finished = true;
        q.stdin.end('quit\n');
      }
    });
    q.on('error', reject);
    q.on('close', (code) => {
      clearTimeout(guard);
      children.delete(q);
      if (!finished) return reject(new Error(`qemu-io ${url} ended early (${code}): ${stderr.trim().slice(-300)}`));
      resolve({ completed: done, latenciesUs, offsets, doneAtMs, errors, windowMs: tEnd - tMeasure, measureStart: performance.timeOrigin + tMeasure, measureEnd: performance.timeOrigin + tEnd });
    });
  });
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))];
}

function summarize(r) {
  const s = Float64Array.from(r.latenciesUs).sort();
  const round = (x) => Math.round(x);
  if (s.length === 0) throw new Error('no request completed in the measured window');
  return { iops: Math.round(s.length / (r.windowMs / 1000)), p50Us: round(percentile(s, 0.5)), p90Us: round(percentile(s, 0.9)), p99Us: round(percentile(s, 0.99)), maxUs: round(s[s.length - 1]), requests: s.length, errors: r.errors.length };
}

/** Per peer, over a window: GC pause ms per second (all, major), the longest pause, the worst event-loop delay. */
function pausesInWindow(peers, fromMs, toMs) {
  return peers.map((p) => {
    const lines = fs.readFileSync(p.probe, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)).filter((l) => l.t > fromMs && l.t <= toMs + 1000);
    const seconds = Math.max(1, lines.length);
    const sum = (k) => lines.reduce((a, l) => a + l[k], 0);
    const max = (k) => lines.reduce((a, l) => Math.max(a, l[k]), 0);
    return { peer: p.id, gcMsPerSec: Math.round(sum('gcMs') / seconds), majorGcsPerSec: round2(sum('majorGcs') / seconds), majorGcMsPerSec: Math.round(sum('majorGcMs') / seconds), gcMaxMs: Math.round(max('gcMaxMs')), loopDelayMaxMs: Math.round(max('loopMaxMs')) };
  });
}

/** CPU time (ms) of a process (all its threads) and of its children it has waited for, from /proc (bench/lib/cpu.js). */
function cpuMs(pid = process.pid) {
  const s = parseStat(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  return { self: (s.ticks * 1000) / ticksPerSec, children: (s.childTicks * 1000) / ticksPerSec };
}

const round2 = (x) => Math.round(x * 100) / 100;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function loadNow() {
  return os.loadavg().map((x) => x.toFixed(2)).join(' ');
}

function machine() {
  return { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, memGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version };
}

/** Write a bench's results to bench/results/<name>-<time>.json; the path, for printing. */
function saveResults(name, results) {
  const dir = path.join(__dirname, '..', 'results');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}-${Date.now()}.json`);
  fs.writeFileSync(file, JSON.stringify(results, null, 2));
  return path.relative(process.cwd(), file);
}

let cleaned = false;
function cleanup() {
  if (cleaned) return;
  cleaned = true;
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  fs.rmSync(work, { recursive: true, force: true });
}

/** Run a bench's main(): one line on failure, every child killed and the scratch dir removed on exit or Ctrl-C. */
function runBench(main) {
  for (const sig of ['SIGINT', 'SIGTERM']) {
    process.on(sig, () => {
      cleanup();
      process.exit(130);
    });
  }
  main()
    .catch((err) => {
      console.error(`bench failed: ${err.message}`);
      process.exitCode = 1;
    })
    .finally(cleanup);
}

module.exports = {
  peersanBin, work, children, sleep, parseArgs, freePort, waitPort, daemon, run, startEtcd, startTgt, startTgtProcess, startPeersan, fillRandom,
  iscsiPerf, qemuImgWrites, scatteredStep, hostWrites, percentile, summarize, pausesInWindow, cpuMs, round2, median, loadNow, machine, saveResults, cleanup, runBench,
};
