// Host balancing end to end: an in-process group of three peers (one embedded catalog, real
// gRPC and iSCSI on loopback) and libiscsi clients (qemu-io, qemu-img, iscsi-perf, iscsi-ls,
// iscsi-inq). Logins aimed at one portal spread by login redirect (0x0101); discovery and
// logins to the best peer stay; an async logout (AsyncEvent 1) moves a running client to
// another peer and its I/O goes on without error, with its data intact.

import t from 'tap';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AdminClient } from '../src/server/admin';
import type { HostBalanceConfig } from '../src/server/config';
import { PeerServer } from '../src/server/peer';
import { startGroup } from './helpers/group';
import { hasTool, qemuImg } from './helpers/processes';

const tools = ['qemu-img', 'qemu-io', 'iscsi-perf', 'iscsi-ls', 'iscsi-inq'];
const missing = tools.filter((x) => !hasTool(x));
const qemuInitiator = 'iqn.2008-11.org.linux-kvm'; // what qemu's iscsi driver calls itself
// Clients that stand for different hosts log in under names of their own: one initiator with
// sessions to a target through several peers is a multipath host, which is never moved.
const hostPrefix = 'iqn.2026-11.io.peersan.test:host';
const perfInitiator = 'iqn.2026-11.io.peersan.test:perf';

async function startHostGroup(t: { teardown(fn: () => unknown): void }, hostBalance?: HostBalanceConfig) {
  const g = await startGroup(t, 3, { hostBalance });
  const { dir, config, servers } = g;
  const peer = (id: string): PeerServer => servers.get(id)!;
  const portal = (id: string): string => config.peers.find((p) => p.id === id)!.iscsi;
  const url = (id: string, volume: string): string => `iscsi://${portal(id)}/iqn.2026-11.io.peersan:${volume}/0`;
  /** qemu's options for the volume through a peer, logged in as `initiator` (a host of its own). */
  const imageOpts = (id: string, volume: string, initiator: string): string => `driver=iscsi,transport=tcp,portal=${portal(id)},target=iqn.2026-11.io.peersan:${volume},lun=0,initiator-name=${initiator}`;
  /** Normal sessions per peer, as `status` reports them (optionally of the initiators whose names begin so). */
  const sessionsPerPeer = async (initiator?: string): Promise<Record<string, number>> => {
    const s = await peer('p1').admin.status();
    return Object.fromEntries(s.peers.map((p) => [p.id, p.sessions.filter((x) => x.sessionType === 'Normal' && (!initiator || x.initiatorName.startsWith(initiator))).length]));
  };
  const counters = (): Record<string, { redirects: number; plannedRedirects: number; logoutRequests: number }> =>
    Object.fromEntries([...servers].map(([id, s]) => [id, { ...s.hostBalancer!.counters }]));
  return { dir, config, peer, url, imageOpts, sessionsPerPeer, counters };
}

/** Poll until `ok` holds (bounded); returns the last value seen. */
async function until<T>(read: () => Promise<T>, ok: (v: T) => boolean, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let v = await read();
  while (!ok(v) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 100));
    v = await read();
  }
  return v;
}

const total = (perPeer: Record<string, number>): number => Object.values(perPeer).reduce((a, b) => a + b, 0);

/** A tool run asynchronously (peers live in this process), its output kept, killed by the teardown. */
function runAsync(t: Tap.Test, cmd: string, args: string[]): { done: Promise<{ code: number | null; signal: string | null; out: string }>; stop(): void } {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr.on('data', (b: Buffer) => (out += b.toString()));
  const done = new Promise<{ code: number | null; signal: string | null; out: string }>((resolve) => child.once('exit', (code, signal) => setImmediate(() => resolve({ code, signal, out }))));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return { done, stop: () => child.kill('SIGINT') };
}

t.test('host balancing in a group of three', { skip: missing.length ? `missing ${missing.join(', ')} (.ci/run installs libiscsi-bin, qemu-utils, qemu-block-extra)` : false }, async (t) => {
  // No automatic moves here: the test decides when a host moves.
  const g = await startHostGroup(t, { autoMove: false });
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '256M' });
  const admin = new AdminClient(g.config.peers[1].rpc, 'admin-token');
  t.teardown(() => admin.close());
  // Every peer's poll of the others has run at least once.
  await new Promise((r) => setTimeout(r, 1500));

  await t.test('three libiscsi sessions aimed at p1 end up on three peers, each redirected at most once', async (t) => {
    const before = g.counters();
    // Each client writes its pattern, holds its session open, then reads the pattern back.
    const held = [1, 2, 3].map((i) => runAsync(t, 'qemu-io', ['--image-opts', '-c', `write -P 0x1${i} ${i * 1048576} 65536`, '-c', 'sleep 8000', '-c', `read -P 0x1${i} ${i * 1048576} 65536`, g.imageOpts('p1', 'vol', `${hostPrefix}${i}`)]));
    const spread = await until(() => g.sessionsPerPeer(hostPrefix), (v) => total(v) === 3, 30_000);
    t.same(spread, { p1: 1, p2: 1, p3: 1 }, `one session per peer (${JSON.stringify(spread)})`);
    const results = await Promise.all(held.map((h) => h.done));
    for (const r of results) t.ok(r.code === 0 && !/failed|error|Pattern verification/i.test(r.out), `client read its pattern back: ${r.out.trim().split('\n').pop()}`);
    const after = g.counters();
    t.equal(after.p1.redirects - before.p1.redirects, 2, 'p1 redirected two of the three logins');
    t.equal(after.p2.redirects - before.p2.redirects + after.p3.redirects - before.p3.redirects, 0, 'the peers they were sent to accepted them (no loop)');
  });

  await t.test('a discovery session and a login to the best peer are not redirected', async (t) => {
    await until(() => g.sessionsPerPeer(), (v) => total(v) === 0, 10_000);
    const before = g.counters();
    const ls = await runAsync(t, 'iscsi-ls', [`iscsi://${g.config.peers[0].iscsi}`]).done;
    t.match(ls.out, /peersan:vol Portal/, 'discovery through p1 lists the volume');
    const inq = await runAsync(t, 'iscsi-inq', [g.url('p2', 'vol')]).done;
    t.equal(inq.code, 0, 'iscsi-inq through p2 (an idle group: p2 is as good as any)');
    t.match(inq.out, /Vendor:PEERSAN/);
    t.same(g.counters(), before, 'no redirect anywhere');
  });

  await t.test('a multipath host: discovery lists every peer, it logs in through two, and nobody moves it', async (t) => {
    await until(() => g.sessionsPerPeer(), (v) => total(v) === 0, 10_000);
    const ls = await runAsync(t, 'iscsi-ls', [`iscsi://${g.config.peers[0].iscsi}`]).done;
    const listed = [...ls.out.matchAll(/peersan:vol Portal:(\S+)/g)].map((m) => m[1]).sort();
    t.same(listed, g.config.peers.map((p, i) => `${p.iscsi},${i + 1}`).sort(), 'SendTargets through p1: one TargetAddress per peer, each its own portal group tag');
    const before = g.counters();
    const multipath = 'iqn.2026-11.io.peersan.test:multipath';
    const hold = ['p2', 'p1'].map((id) => runAsync(t, 'qemu-io', ['--image-opts', '-c', `read 0 4096`, '-c', 'sleep 5000', '-c', `read 0 4096`, g.imageOpts(id, 'vol', multipath)]));
    const both = await until(() => g.sessionsPerPeer(multipath), (v) => v.p1 === 1 && v.p2 === 1, 20_000);
    t.same(both, { p1: 1, p2: 1, p3: 0 }, 'one session through p1, one through p2');
    await new Promise((r) => setTimeout(r, 2500)); // every peer's gossip lists both sessions
    await t.rejects(admin.moveSession(multipath, 'p3'), /multipath host/, 'the admin move refuses: ALUA steers a multipath host');
    for (const r of await Promise.all(hold.map((h) => h.done))) t.equal(r.code, 0, `its I/O went on: ${r.out.trim().split('\n').pop()}`);
    const after = g.counters();
    t.same(after, before, 'no redirect, no logout request');
  });

  await t.test('an async logout moves a running iscsi-perf to another peer; its I/O goes on without error', async (t) => {
    await until(() => g.sessionsPerPeer(), (v) => total(v) === 0, 10_000);
    const perf = runAsync(t, 'iscsi-perf', ['-i', perfInitiator, '-m', '8', '-b', '8', '-r', g.url('p1', 'vol')]);
    const on = await until(() => g.sessionsPerPeer(perfInitiator), (v) => v.p1 === 1, 20_000);
    t.same(on, { p1: 1, p2: 0, p3: 0 }, 'iscsi-perf logged in to p1 (nobody else is logged in)');
    await new Promise((r) => setTimeout(r, 2000));
    const moved = await admin.moveSession(perfInitiator, 'p3');
    t.same(moved.map((m) => [m.from, m.to, m.initiatorName]), [['p1', 'p3', perfInitiator]], 'the admin op asked p1 to move it');
    const there = await until(() => g.sessionsPerPeer(perfInitiator), (v) => v.p3 === 1 && v.p1 === 0, 20_000);
    t.same(there, { p1: 0, p2: 0, p3: 1 }, 'it logged out of p1 and in to p3');
    const c = g.counters();
    t.equal(c.p1.logoutRequests, 1, 'one AsyncEvent 1');
    t.equal(c.p1.plannedRedirects, 1, 'libiscsi came back to its original portal (p1), which sent it on to p3');
    await new Promise((r) => setTimeout(r, 3000));
    perf.stop();
    const r = await perf.done;
    const lines = r.out.split(/\r|\n/).filter((l) => l.trim());
    const ticks = lines.filter((l) => /iops current \d+/.test(l));
    t.ok(ticks.length >= 5, `iscsi-perf reported every second (${ticks.length} reports)`);
    // (Its banner says "press CTRL-C to abort": not an error.)
    const bad = lines.filter((l) => /fail|error|abort/i.test(l) && !/press CTRL-C/.test(l));
    t.same(bad, [], `no error: ${lines.slice(-2).join(' | ')}`);
    t.match(r.out, /finished/, 'and it ended on our SIGINT, not on an error');
    t.ok(ticks.slice(-3).every((l) => !/iops current 0 /.test(l)), `I/O still flowing after the move: ${ticks.slice(-1)[0]?.trim()}`);
  });

  await t.test('data written before a move reads back after it; a copy running during a move is intact', async (t) => {
    await until(() => g.sessionsPerPeer(), (v) => total(v) === 0, 10_000);
    const before = g.counters();
    const q = runAsync(t, 'qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', '-c', 'sleep 6000', '-c', 'read -P 0x5a 0 1M', '-c', 'write -P 0x6b 1M 1M', '-c', 'read -P 0x6b 1M 1M', g.url('p1', 'vol')]);
    // The client aims at p1, but p1 may send it on: the previous subtest's iscsi-perf ran on p1
    // seconds ago and the load view still remembers it. Move it from wherever it landed to a
    // peer that is neither there nor p1, so that its next login (whichever portal libiscsi
    // goes back to) is a planned redirect.
    const landed = await until(() => g.sessionsPerPeer(qemuInitiator), (v) => total(v) === 1, 20_000);
    const at = Object.keys(landed).find((k) => landed[k] === 1);
    t.ok(at, `qemu-io logged in (${JSON.stringify(landed)})`);
    if (!at) return;
    const dest = at === 'p2' ? 'p3' : 'p2';
    await new Promise((r) => setTimeout(r, 1000));
    const moved = await admin.moveSession(qemuInitiator, dest, at);
    t.same(moved.map((m) => [m.from, m.to]), [[at, dest]], `asked ${at} to move it to ${dest}`);
    const r = await q.done;
    t.ok(r.code === 0 && !/failed|error|Pattern verification/i.test(r.out), `qemu-io wrote, moved, read back and wrote again: ${r.out.replace(/\n/g, ' | ')}`);
    const planned = (c: ReturnType<typeof g.counters>): number => Object.values(c).reduce((a, x) => a + x.plannedRedirects, 0);
    t.equal(planned(g.counters()) - planned(before), 1, `it logged in again and was sent on to ${dest} as planned, in the middle`);

    const file = join(g.dir, 'random.img');
    writeFileSync(file, randomBytes(192 * 1024 * 1024));
    // Another host than the qemu-io that just ended (a name of its own): as the same initiator it
    // could look like a multipath host for as long as the gossip still shows that session.
    const copier = `${hostPrefix}copy`;
    const copy = runAsync(t, 'qemu-img', ['convert', '-n', '-f', 'raw', '--target-image-opts', file, g.imageOpts('p1', 'vol', copier)]);
    const where = await until(() => g.sessionsPerPeer(copier), (v) => total(v) === 1, 20_000);
    const from = Object.keys(where).find((k) => where[k] === 1)!;
    const mid = g.counters();
    await admin.moveSession(copier, '', from);
    const done = await copy.done;
    t.equal(done.code, 0, `qemu-img convert succeeded across the move: ${done.out.trim()}`);
    const end = g.counters();
    t.equal(end[from].logoutRequests - mid[from].logoutRequests, 1, `the copy was asked to leave ${from} while it ran`);
    t.match(await qemuImg(['compare', '-f', 'raw', '-F', 'raw', file, g.url('p3', 'vol')]), /Images are identical/, 'every byte arrived');
  });
});

t.test('an overloaded peer moves sessions away by itself, one at a time, until the group is even', { skip: missing.length ? `missing ${missing.join(', ')}` : false }, async (t) => {
  // Logins are never redirected here (margin 100), so all three land on p1; the periodic
  // check must then even them out with AsyncEvent 1, each move planned on every peer.
  const g = await startHostGroup(t, { marginSessions: 100, autoMove: true, sessionMinAgeMs: 0, moveIntervalMs: 1000 });
  await g.peer('p1').admin.createVolume({ name: 'vol', size: '64M' });
  await new Promise((r) => setTimeout(r, 1500));
  const held = [1, 2, 3].map((i) => runAsync(t, 'qemu-io', ['--image-opts', '-c', `write -P 0x3${i} ${i * 1048576} 65536`, '-c', 'sleep 14000', '-c', `read -P 0x3${i} ${i * 1048576} 65536`, g.imageOpts('p1', 'vol', `${hostPrefix}${i}`)]));
  const first = await until(() => g.sessionsPerPeer(hostPrefix), (v) => total(v) === 3, 20_000);
  t.equal(first.p1, 3, `all three logged in to p1 first (${JSON.stringify(first)})`);
  const even = await until(() => g.sessionsPerPeer(hostPrefix), (v) => v.p1 === 1 && v.p2 === 1 && v.p3 === 1, 12_000);
  t.same(even, { p1: 1, p2: 1, p3: 1 }, 'then one per peer');
  const c = g.counters();
  t.equal(c.p1.logoutRequests, 2, 'p1 asked exactly two sessions to leave');
  t.equal(c.p2.logoutRequests + c.p3.logoutRequests, 0, 'nobody else moved anything');
  for (const r of await Promise.all(held.map((h) => h.done))) t.ok(r.code === 0 && !/failed|error|Pattern verification/i.test(r.out), `client read its pattern back: ${r.out.trim().split('\n').pop()}`);
});
