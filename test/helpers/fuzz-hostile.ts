// The hostile loads of issue 15 items 2-4, against one peer process, with its RSS sampled
// and a normal host doing I/O meanwhile (the loads from 127.0.0.2, the host from 127.0.0.1): used by test/hostile-load.test.ts (small numbers)
// and bench/hostile-rss.js (the issue's numbers). Each load runs for a bounded time, then
// closes every connection it opened; a load that takes the peer past `abortAboveBytes`
// over idle is ended early and the peer process with it (the bound is already broken, and
// the machine is shared): the caller starts it again.
//
//   reads          K sessions each queue 128 READs of 8 MiB (and immediate READs beyond the
//                  CmdSN window) and never read the answers (item 2)
//   out-of-window  READs whose CmdSN lies outside the window (item 3)
//   login-slots    connections that stall mid-header, logins that never finish, and
//                  Discovery sessions (item 4)

import { Socket } from 'node:net';
import { alive, blockBytes, resetPeak, rssOf } from './fuzz-group';
import { hostileAddress, openSession, RawIscsi, rw16, type ScsiResult } from './fuzz-iscsi';
import { Rng } from './fuzz-rng';
import type { TestPeer } from './processes';

export interface LoadTarget {
  peer: TestPeer;
  volume: string;
  volumeBytes: number;
}

export interface HostReport {
  /** Write-and-read-back rounds that completed with the right bytes. */
  ops: number;
  failures: number;
  p50Ms: number;
  maxMs: number;
  /** New logins tried during the load (a host arriving) and how many succeeded. */
  logins: number;
  loginsOk: number;
  /** How the first failed round failed. */
  firstFailure?: string;
}

export interface LoadReport {
  name: string;
  /** The peer's RSS before any load, and when this one started. */
  idleBytes: number;
  startBytes: number;
  peakBytes: number;
  /** RSS when the load's connections were closed, and a moment after. */
  endBytes: number;
  afterBytes: number;
  aborted: boolean;
  /** How long the load ran (until its hold time, or until it passed the abort bound). */
  ranMs: number;
  alive: boolean;
  host: HostReport;
}

/** What a load opened, to close at its end. */
type Load = { close(): void };

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Start load `name` against the target; resolves once it is in place (commands sent, connections open). */
export type LoadStarter = (t: LoadTarget) => Promise<Load>;

function closeAll(conns: Array<{ close(): void } | Socket>): Load {
  return { close: () => conns.forEach((c) => (c instanceof Socket ? c.destroy() : c.close())) };
}

/**
 * `sessions` sessions, each sending `reads` READs of `readBytes` in CmdSN order and
 * `immediateReads` more with the I bit (outside the window's count), then not reading.
 */
export function readFlood(sessions: number, reads = 128, readBytes = 8 * 2 ** 20, immediateReads = 256): LoadStarter {
  return async (t) => {
    const conns: RawIscsi[] = [];
    const blocks = readBytes / blockBytes;
    try {
      // Every session logs in before any floods: the flood may rightly slow logins down.
      for (let s = 0; s < sessions; s++) conns.push(await openSession(t.peer.iscsiPort, t.volume, undefined, hostileAddress));
    } catch (err) {
      closeAll(conns).close();
      throw err;
    }
    for (const c of conns) {
      // Not reading: the answers pile up in the target, not here.
      c.socket.pause();
      const pdus: Buffer[] = [];
      for (let i = 0; i < reads + immediateReads; i++) {
        const lba = (i * blocks) % (t.volumeBytes / blockBytes - blocks);
        pdus.push(RawIscsi.encode(c.command(rw16(0x88, lba, blocks), { read: true, edtl: readBytes, immediate: i >= reads })));
      }
      c.writeRaw(Buffer.concat(pdus));
    }
    return closeAll(conns);
  };
}

/** `commands` READs with CmdSNs far outside the window (to be dropped, and nothing kept for them). */
export function outOfWindow(commands: number): LoadStarter {
  return async (t) => {
    const c = await openSession(t.peer.iscsiPort, t.volume, undefined, hostileAddress);
    const chunk: Buffer[] = [];
    const far = (c.cmdSN + 0x4000_0000) >>> 0;
    for (let i = 0; i < commands; i++) {
      chunk.push(RawIscsi.encode(c.command(rw16(0x88, 0, 8), { read: true, edtl: 8 * blockBytes, cmdSN: (far + i) >>> 0 })));
      if (chunk.length === 10_000 || i === commands - 1) {
        // Wait for the socket to drain now and then: the load is on the peer, not in our buffers.
        if (!c.socket.write(Buffer.concat(chunk.splice(0)))) await new Promise((r) => c.socket.once('drain', r));
      }
    }
    return closeAll([c]);
  };
}

/** Connections that stop half-way through a header, logins left in the security stage, Discovery sessions kept open. */
export function loginSlots(halfHeaders: number, unfinished: number, discovery: number): LoadStarter {
  return async (t) => {
    const conns: Array<RawIscsi | Socket> = [];
    const port = t.peer.iscsiPort;
    // Opened in parallel, each bounded: a target that refuses them is doing its job.
    const open = async <T>(n: number, one: () => Promise<T | undefined>): Promise<void> => {
      for (let i = 0; i < n; i += 32) await Promise.all(Array.from({ length: Math.min(32, n - i) }, () => one().catch(() => undefined)));
    };
    await open(halfHeaders, async () => {
      const c = await RawIscsi.connect(port, hostileAddress);
      conns.push(c);
      c.writeRaw(RawIscsi.encode(c.loginPdu([['InitiatorName', 'iqn.x:half']], { csg: 0, nsg: 1, transit: true })).subarray(0, 20));
      return c;
    });
    await open(unfinished, async () => {
      const c = await RawIscsi.connect(port, hostileAddress);
      conns.push(c);
      await c.login({ volume: t.volume, initiator: 'iqn.2026-11.io.peersan.test:unfinished', securityOnly: true }, 1_000);
      return c;
    });
    await open(discovery, async () => {
      const c = await RawIscsi.connect(port, hostileAddress);
      conns.push(c);
      await c.login({ initiator: 'iqn.2026-11.io.peersan.test:discovery' }, 1_000);
      return c;
    });
    return closeAll(conns);
  };
}

/**
 * The normal host during a load: a session opened before it writes 4 KiB at a random place and
 * reads it back, again and again; every `loginEveryMs` a new host also logs in (and does one round).
 */
function normalHost(target: LoadTarget, session: RawIscsi, rng: Rng, loginEveryMs: number): { freeze(): void; stop(): Promise<HostReport> } {
  const latencies: number[] = [];
  const report: HostReport = { ops: 0, failures: 0, p50Ms: 0, maxMs: 0, logins: 0, loginsOk: 0 };
  let stopping = false;
  let counting = true;
  const round = async (c: RawIscsi): Promise<boolean> => {
    const lba = rng.int(target.volumeBytes / blockBytes - 8);
    const data = rng.bytes(8 * blockBytes);
    const started = performance.now();
    const w = await c.writeBlocks(lba, data, blockBytes, 10_000);
    const r = w?.status === 0 ? await c.readBlocks(lba, 8, blockBytes, 10_000) : undefined;
    const ok = r?.status === 0 && r.data.equals(data);
    if (!counting) return ok;
    if (ok) latencies.push(performance.now() - started);
    else report.firstFailure ??= describe(c, w, r, performance.now() - started);
    return ok;
  };
  const io = (async () => {
    while (!stopping) {
      const ok = await round(session);
      if (!counting) break;
      if (ok) {
        report.ops++;
        continue;
      }
      report.failures++;
      // A session the target closed fails at once: no busy loop.
      await sleep(100);
    }
  })();
  const logins = (async () => {
    while (!stopping) {
      const c = await openSession(target.peer.iscsiPort, target.volume).catch((err: Error) => {
        if (counting) report.firstFailure ??= `new login: ${err.message}`;
        return undefined;
      });
      const ok = c !== undefined && (await round(c));
      c?.close();
      if (!counting) break;
      report.logins++;
      if (ok) report.loginsOk++;
      for (let waited = 0; waited < loginEveryMs && !stopping; waited += 100) await sleep(100);
    }
  })();
  return {
    // Count nothing from now on: what happens to the host after this (the peer is being
    // stopped) is not the load's doing.
    freeze: () => {
      counting = false;
    },
    stop: async () => {
      stopping = true;
      await Promise.all([io, logins]);
      latencies.sort((a, b) => a - b);
      report.p50Ms = Math.round((latencies[Math.floor(latencies.length / 2)] ?? 0) * 10) / 10;
      report.maxMs = Math.round(latencies[latencies.length - 1] ?? 0);
      return report;
    },
  };
}

function describe(c: RawIscsi, w: ScsiResult | undefined, r: ScsiResult | undefined, ms: number): string {
  const what = (x: ScsiResult | undefined): string => (!x ? 'no answer' : x.sense ? `status ${x.status} sense ${x.sense.key}/${x.sense.asc.toString(16)}/${x.sense.ascq.toString(16)}` : `status ${x.status}`);
  if (c.closed) return `session closed by the target after ${Math.round(ms)} ms`;
  return w?.status !== 0 ? `write: ${what(w)} after ${Math.round(ms)} ms` : `read: ${what(r)}${r?.status === 0 ? ' (different bytes)' : ''} after ${Math.round(ms)} ms`;
}

/** Wait (at most `timeoutMs`) until a new session logs in and completes a round trip: the peer is past the last load. */
export async function waitServing(target: LoadTarget, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline && alive(target.peer)) {
    const c = await openSession(target.peer.iscsiPort, target.volume).catch(() => undefined);
    const ok = c !== undefined && (await c.ping(2_000));
    c?.close();
    if (ok) return true;
    await sleep(500);
  }
  return false;
}

/**
 * Run one load for `holdMs` with the normal host going, sampling RSS every 100 ms; then close
 * its connections and read RSS again after `settleMs`.
 */
export async function runLoad(target: LoadTarget, name: string, start: LoadStarter, o: { idleBytes: number; holdMs: number; settleMs?: number; abortAboveBytes: number; loginEveryMs?: number; seed?: number }): Promise<LoadReport> {
  const pid = target.peer.process.pid!;
  const idleBytes = o.idleBytes;
  const session = await openSession(target.peer.iscsiPort, target.volume);
  const startBytes = rssOf(pid)!.rssBytes;
  resetPeak(pid);
  let peakBytes = startBytes;
  let aborted = false;
  let peerAlive = true;
  let loadStarted = Date.now();
  let ranMs = 0;
  const host = normalHost(target, session, new Rng(o.seed ?? 1, 2), o.loginEveryMs ?? 1_000);
  let load: Load | undefined;
  let endBytes = 0;
  let hostReport: HostReport;
  try {
    load = await start(target);
    loadStarted = Date.now();
    const until = Date.now() + o.holdMs;
    while (Date.now() < until && alive(target.peer)) {
      const rss = rssOf(pid);
      if (!rss) break;
      peakBytes = Math.max(peakBytes, rss.rssBytes, rss.peakBytes);
      if (rss.rssBytes - idleBytes > o.abortAboveBytes) {
        aborted = true;
        break;
      }
      await sleep(100);
    }
    endBytes = rssOf(pid)?.rssBytes ?? 0;
    ranMs = Date.now() - loadStarted;
  } finally {
    // Past the abort bound the process is ended at once: the answers still in flight would
    // take it gigabytes further while the host's round times out (the caller restarts it).
    peerAlive = alive(target.peer);
    if (aborted) {
      host.freeze();
      await target.peer.kill('SIGKILL');
    }
    // Whatever happened, nothing this load opened outlives it.
    load?.close();
    hostReport = await host.stop();
    session.close();
  }
  if (!aborted) await sleep(o.settleMs ?? 2_000);
  const after = aborted ? undefined : rssOf(pid);
  peakBytes = Math.max(peakBytes, after?.peakBytes ?? 0);
  return { name, idleBytes, startBytes, peakBytes, endBytes, afterBytes: after?.rssBytes ?? 0, aborted, ranMs, alive: peerAlive && (aborted || alive(target.peer)), host: hostReport };
}

/** One line per load: RSS next to idle, and how the normal host fared. */
export function formatReport(r: LoadReport): string {
  const m = (b: number): string => `${Math.round(b / 2 ** 20)} MiB`;
  const h = r.host;
  return `${r.name}: idle ${m(r.idleBytes)}, at start ${m(r.startBytes)}, peak ${m(r.peakBytes)} (+${m(r.peakBytes - r.idleBytes)}${r.aborted ? `, stopped at the abort bound after ${(r.ranMs / 1000).toFixed(1)} s` : ''}), end ${m(r.endBytes)}, after close ${r.aborted ? '- (process stopped)' : m(r.afterBytes)}${r.alive ? '' : ', PEER EXITED'}; `
    + `normal host: ${h.ops} rounds ok, ${h.failures} failed, p50 ${h.p50Ms} ms, max ${h.maxMs} ms, new logins ${h.loginsOk}/${h.logins}${h.firstFailure ? ` (first failure: ${h.firstFailure})` : ''}`;
}
