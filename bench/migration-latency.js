#!/usr/bin/env node
// Host write latency while pages of the same volume migrate (issue 4, acceptance 5).
//
//   npm run build && node bench/migration-latency.js [--seconds 10] [--repeat 3]
//        [--size-mib 1024] [--block-size 4096] [--movers 2] [--depth 8]
//
// A group of three `peersan peer` processes on an etcd catalog (as three machines would), with
// the default migration settings (no `migration:` section: rateMBps 64, pieceKiB 256). The
// balancer and host balancing are switched off so that the only page moves are the ones this
// bench makes and the host stays on the portal it chose. One volume, its pages spread over all
// three peers, filled completely with random data first, so a move copies real data (a thin
// page would be copied as UNMAP). Then, --repeat times, in alternating order:
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

const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const net = require('node:net');

const args = { seconds: 10, repeat: 3, sizeMib: 1024, blockSize: 4096, movers: 2, depth: 8 };
const flags = { '--seconds': 'seconds', '--repeat': 'repeat', '--size-mib': 'sizeMib', '--block-size': 'blockSize', '--movers': 'movers', '--depth': 'depth' };
for (let i = 2; i < process.argv.length; i += 2) {
  const k = flags[process.argv[i]];
  const v = Number(process.argv[i + 1]);
  if (!k) throw new Error(`unknown argument ${process.argv[i]} (known: ${Object.keys(flags).join(', ')})`);
  if (!Number.isInteger(v) || v < 1) throw new Error(`${process.argv[i]} needs a whole number, got ${process.argv[i + 1]}`);
  args[k] = v;
}
if (args.blockSize !== 512 && args.blockSize !== 4096) throw new Error('--block-size is 512 or 4096');

const root = path.join(__dirname, '..');
const peersanBin = path.join(root, 'bin', 'peersan.js');
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'peersan-bench-'));
const children = new Set();
const writeBytes = 4096;
const warmupMs = 1000;
/** Bounds: no client step may hang the bench. */
const commandMsMax = 600_000;
const moveMsMax = 120_000;

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

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Start a long-lived child that cleanup() kills. */
function daemon(cmd, argv, opts = {}) {
  const child = spawn(cmd, argv, { stdio: 'ignore', ...opts });
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}

/** Run a command to completion without blocking the event loop (the movers run meanwhile). */
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

async function startTgt(sizeBytes) {
  const port = await freePort();
  const control = 1000 + Math.floor(Math.random() * 5000);
  const img = path.join(work, 'tgt.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, sizeBytes);
  daemon('tgtd', ['-f', '-C', String(control), '--iscsi', `portal=127.0.0.1:${port}`]);
  await waitPort(port);
  const adm = (...a) => run('tgtadm', ['-C', String(control), '--lld', 'iscsi', ...a]);
  await adm('--op', 'new', '--mode', 'target', '--tid', '1', '-T', 'iqn.2001-04.com.example:bench');
  await adm('--op', 'new', '--mode', 'logicalunit', '--tid', '1', '--lun', '1', '-b', img, '--blocksize', String(args.blockSize));
  await adm('--op', 'bind', '--mode', 'target', '--tid', '1', '-I', 'ALL');
  return `iscsi://127.0.0.1:${port}/iqn.2001-04.com.example:bench/1`;
}

async function startEtcd() {
  const [client, peer] = [await freePort(), await freePort()];
  daemon('etcd', ['--name', 'bench', '--data-dir', path.join(work, 'etcd'),
    '--listen-client-urls', `http://127.0.0.1:${client}`, '--advertise-client-urls', `http://127.0.0.1:${client}`,
    '--listen-peer-urls', `http://127.0.0.1:${peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`,
    '--initial-cluster', `bench=http://127.0.0.1:${peer}`, '--log-level', 'error']);
  await waitPort(client);
  return `http://127.0.0.1:${client}`;
}

/** Three peer processes on etcd, default migration settings, no automatic page or host moves. */
async function startPeersan(sizeBytes) {
  const etcd = await startEtcd();
  const peers = [];
  for (const id of ['p1', 'p2', 'p3']) peers.push({ id, iscsi: await freePort(), rpc: await freePort(), http: await freePort(), log: path.join(work, `${id}.log`), probe: path.join(work, `${id}.probe`) });
  const config = path.join(work, 'cluster.yaml');
  fs.writeFileSync(config, ['cluster:', '  name: bench', '  adminToken: bench-token', '  secret: bench-secret', `  catalog: { backend: etcd, endpoints: [${etcd}] }`,
    '  hostBalance: { enabled: false }', 'balancer: { enabled: false }', 'peers:',
    ...peers.map((p) => `  - { id: ${p.id}, iscsi: 127.0.0.1:${p.iscsi}, rpc: 127.0.0.1:${p.rpc}, http: 127.0.0.1:${p.http}, data: ./${p.id} }`), ''].join('\n'));
  for (const p of peers) {
    // The peers log JSON to stderr: kept, for the moves' start and commit times.
    const fd = fs.openSync(p.log, 'a');
    const env = { ...process.env, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --require ${path.join(__dirname, 'peer-probe.js')}`, PEERSAN_PROBE_FILE: p.probe };
    p.pid = daemon(process.execPath, [peersanBin, 'peer', '--config', config, '--id', p.id], { stdio: ['ignore', 'ignore', fd], env }).pid;
    fs.closeSync(fd);
    await waitPort(p.iscsi);
  }
  const cli = (...a) => run(process.execPath, [peersanBin, '--config', config, ...a]);
  await cli('volume', 'create', 'bench', '--size', String(sizeBytes), '--block-size', String(args.blockSize));
  const map = JSON.parse(await cli('--json', 'page', 'map', 'bench'));
  return { peers, cli, map, url: `iscsi://127.0.0.1:${peers[0].iscsi}/iqn.2026-11.io.peersan:bench/0` };
}

// ---- the host: qemu-io, 4 KiB random writes at a fixed depth ------------------------------------

/** One phase of host writes: returns each measured request's latency (µs) and the window. */
function hostWrites(url, sizeBytes, seconds) {
  return new Promise((resolve, reject) => {
    const q = spawn('stdbuf', ['-i0', '-oL', 'qemu-io', '-f', 'raw', '-t', 'none', url], { stdio: ['pipe', 'pipe', 'pipe'] });
    children.add(q);
    const slots = sizeBytes / writeBytes;
    const latenciesUs = [];
    /** Per measured request: its offset and completion time (epoch ms), to tell writes to moving pages apart. */
    const offsets = [];
    const doneAtMs = [];
    let offset = -1;
    const errors = [];
    let stderr = '';
    let pending = '';
    let started = false;
    let sent = 0;
    let done = 0;
    let t0 = 0;
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
        t0 = performance.now();
        tMeasure = t0 + warmupMs;
        tEnd = tMeasure + seconds * 1000;
        send(args.depth);
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
        if (failed) errors.push(failed[0]);
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
      resolve({ latenciesUs, offsets, doneAtMs, errors, windowMs: tEnd - tMeasure, measureStart: performance.timeOrigin + tMeasure, measureEnd: performance.timeOrigin + tEnd });
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

/** CPU time (ms) of a process and of its children it has waited for, from /proc. */
function cpuMs(pid = process.pid) {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  const tick = 10; // USER_HZ = 100 on Linux
  return { self: (Number(f[11]) + Number(f[12])) * tick, children: (Number(f[13]) + Number(f[14])) * tick };
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

const round2 = (x) => Math.round(x * 100) / 100;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function loadNow() {
  return os.loadavg().map((x) => x.toFixed(2)).join(' ');
}

async function main() {
  const sizeBytes = args.sizeMib * 1024 * 1024;
  const pc = await startPeersan(sizeBytes);
  const tgt = await startTgt(sizeBytes);
  const owners = pc.map.pages.map((p) => p.owner);
  const pageMib = (pc.map.pageBlocks * args.blockSize) / 2 ** 20;
  console.log(`volume: ${args.sizeMib} MiB, ${args.blockSize}-byte blocks, ${owners.length} pages of ${pageMib} MiB on ${[...new Set(owners)].sort().join(', ')}; filling both LUNs with random data…`);
  const fill = path.join(work, 'fill.img');
  await run('dd', ['if=/dev/urandom', `of=${fill}`, 'bs=1M', `count=${args.sizeMib}`, 'status=none']);
  for (const url of [pc.url, tgt]) await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', fill, url]);
  fs.rmSync(fill);

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
  console.log(`migrating: a page in transit ${migration.inTransitPct}% of the time, ${migration.pagesMoved} pages (${pageMib} MiB each) moved per ${args.seconds} s phase, ${migration.copiedMBps} MB/s copied (default rate 64 MB/s per source peer); idle phases saw ${samples.idle.map((s) => s.pagesMoved).join('/')} moves`);
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
  const machine = { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, memGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version };
  console.log(`machine: ${machine.cpus} x ${machine.cpu}, ${machine.memGiB} GiB, node ${machine.node}; medians of ${args.repeat}, ${args.seconds} s measured each (after 1 s warm-up), host on p1's portal, ${args.movers} move loop(s)`);
  const dir = path.join(__dirname, 'results');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `migration-latency-${Date.now()}.json`);
  fs.writeFileSync(file, JSON.stringify({ args, machine, rows, ratio, migration, cores, samples, moves, failures }, null, 2));
  console.log(`results: ${path.relative(process.cwd(), file)}`);
}

let cleaned = false;
function cleanup() {
  if (cleaned) return;
  cleaned = true;
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  fs.rmSync(work, { recursive: true, force: true });
}
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    cleanup();
    process.exit(130);
  });
}
if (require.main === module) {
  main()
    .catch((err) => {
      console.error(`bench failed: ${err.message}`);
      process.exitCode = 1;
    })
    .finally(cleanup);
}
// For one-off experiments (profiling a move): the group, the host and the log readers.
module.exports = { args, work, run, startPeersan, startTgt, hostWrites, summarize, movesFromLogs, cleanup, peersanBin };
