// The activity log, dirty grains and resync (src/replication/activity.ts, resync.ts) with no
// sockets: a real catalog (embedded), the page store's records as a fake that knows what a crash
// keeps, and each peer's replicated layer as a fake ReplicaPort over a memory backend whose sends
// land in the other peer's memory. The write path is a small model of A1's (range lock, change
// tracker, dual writes to resyncing copies) so that changes during a resync can be interleaved.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import t from 'tap';
import { Catalog, type VolumeRecord } from '../src/cluster/catalog';
import { EmbeddedMetaStore } from '../src/cluster/embedded';
import { ManualEnv } from '../src/env/manual';
import { activityQuietMs, dirtyPersistMs, resyncRetryMsMin, resyncRunsInFlightMax, resyncRunsPerPageMax } from '../src/limits';
import { ActivityLog, type RecordKv } from '../src/replication/activity';
import type { ReplicaPort } from '../src/replication/hooks';
import { checkResyncAsk, type ResyncAsk } from '../src/replication/messages';
import { GrainSet, nextRun, Resyncer, ResyncTracker, RunPacer, runExtent } from '../src/replication/resync';
import { copiesOf, inSyncOf, RouteTable, type Route } from '../src/routing/table';
import { MemoryBackend } from './helpers/memory-backend';
import { fixedMembers } from '../src/cluster/members';

const log = pino({ level: process.env.TEST_LOG ?? 'silent' });
const volumeId = '0123456789abcdef';
const pageBlocks = 1024; // 8 grains of 128 blocks (64 KiB) at 512-byte blocks
const grainBlocks = 128;
const grainsPerPage = 8;

interface Op {
  op: 'put' | 'del' | 'sync';
  key: string;
  value?: Buffer;
  sync: boolean;
}

/** The page store's records: every op logged; a crash keeps the ops up to the last synced one (LevelDB's log). */
class FakeKv implements RecordKv {
  readonly ops: Op[] = [];
  readonly data = new Map<string, Buffer>();
  /** When set, puts wait for it (a slow disk). */
  gate: Promise<void> | undefined;

  async putRecord(key: string, value: Buffer, sync: boolean): Promise<void> {
    this.ops.push({ op: 'put', key, value, sync });
    await this.gate;
    this.data.set(key, value);
  }

  async deleteRecord(key: string): Promise<void> {
    this.ops.push({ op: 'del', key, sync: true });
    this.data.delete(key);
  }

  async listRecords(prefix: string): Promise<{ key: string; value: Buffer }[]> {
    return [...this.data].filter(([k]) => k.startsWith(prefix)).sort(([a], [b]) => a.localeCompare(b)).map(([key, value]) => ({ key, value }));
  }

  /** A flush of the store: one synced write. */
  sync(): void {
    this.ops.push({ op: 'sync', key: '', sync: true });
  }

  /** What a crash now leaves. */
  crashed(): FakeKv {
    const kept = new FakeKv();
    const last = this.ops.map((o) => o.sync).lastIndexOf(true);
    for (const o of this.ops.slice(0, last + 1)) {
      if (o.op === 'put') kept.data.set(o.key, o.value!);
      if (o.op === 'del') kept.data.delete(o.key);
    }
    return kept;
  }

  keys(prefix: string): string[] {
    return [...this.data.keys()].filter((k) => k.startsWith(prefix)).sort();
  }
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

function settled(p: Promise<unknown>): { done: boolean } {
  const s = { done: false };
  void p.then(() => (s.done = true), () => (s.done = true));
  return s;
}

/** One turn of the event loop: promise continuations run. */
const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

t.test('activity log: a page is logged durably before beforeChange resolves; concurrent callers share the put', async (t) => {
  const env = new ManualEnv();
  const kv = new FakeKv();
  const activity = await ActivityLog.open({ kv, env, recentGrains: () => 0, settle: async () => kv.sync(), exists: () => true });
  const slow = deferred();
  kv.gate = slow.promise;
  const first = activity.beforeChange(volumeId, 3);
  const second = activity.beforeChange(volumeId, 3);
  t.ok(first, 'not logged yet: a promise');
  t.equal(second, first, 'a second change of the page waits for the same put');
  t.same(kv.ops.map((o) => `${o.op} ${o.key} ${o.sync}`), [`put activity/${volumeId}/0000000003 true`], 'one synced put');
  const s = settled(first!);
  await tick();
  t.notOk(s.done, 'not resolved while the put is not done');
  slow.resolve();
  await first;
  t.equal(activity.beforeChange(volumeId, 3), undefined, 'logged: nothing to wait for');
  t.equal(kv.ops.length, 1, 'no second put');
});

t.test('activity log: the sweep removes only quiet, flushed, recent-free pages; the rest is suspect after a crash', async (t) => {
  const env = new ManualEnv();
  let kv = new FakeKv();
  const recent = new Map<number, number>([[1, 2]]);
  let flushGate: Promise<void> | undefined;
  const activity = await ActivityLog.open({
    kv, env, recentGrains: (_v, page) => recent.get(page) ?? 0,
    settle: async () => {
      await flushGate;
      kv.sync();
    },
    exists: () => true,
  });
  activity.start();
  t.teardown(() => activity.close());
  for (const page of [0, 1, 2, 4]) await activity.beforeChange(volumeId, page);
  await env.run(activityQuietMs - 500);
  activity.noteChanged(volumeId, 2); // page 2 changed again: not quiet yet
  // Page 4: a change comes while the sweep's flush runs: it must stay.
  const flushing = deferred();
  flushGate = flushing.promise;
  await env.run(500);
  t.same(activity.logged(volumeId), [0, 1, 2, 4], 'nothing removed before the flush ended');
  await activity.beforeChange(volumeId, 4);
  flushGate = undefined;
  flushing.resolve();
  await tick();
  await tick();
  t.same(activity.logged(volumeId), [1, 2, 4], 'page 0 removed; 1 has recent grains, 2 is not quiet, 4 changed during the flush');
  const del = kv.ops.findIndex((o) => o.op === 'del');
  t.ok(del > 0 && kv.ops.slice(0, del).some((o) => o.op === 'sync'), 'the flush comes before the delete');
  t.equal(kv.ops[del].key, `activity/${volumeId}/0000000000`);

  // A crash now: the synced records survive; every page still logged is suspect at the next start.
  kv = kv.crashed();
  const again = await ActivityLog.open({ kv, env, recentGrains: () => 0, settle: async () => kv.sync(), exists: () => true });
  t.same([...again.suspect(volumeId)].sort(), [1, 2, 4], 'suspect: the pages logged at the crash');
  t.equal(again.beforeChange(volumeId, 1), undefined, 'a suspect page is logged already');
  await env.run(activityQuietMs);
  await again.sweep();
  t.same(again.logged(volumeId), [1, 2, 4], 'a suspect page stays logged, however quiet');
  again.trusted(volumeId, 1);
  await env.run(activityQuietMs);
  await again.sweep();
  t.same(again.logged(volumeId), [2, 4], 'once trusted (resynced whole) and quiet, it goes');
  t.same([...again.suspect(volumeId)].sort(), [2, 4]);
});

t.test('activity log: a change after a removal logs the page again, after the delete', async (t) => {
  const env = new ManualEnv();
  const kv = new FakeKv();
  const activity = await ActivityLog.open({ kv, env, recentGrains: () => 0, settle: async () => kv.sync(), exists: () => true });
  await activity.beforeChange(volumeId, 7);
  await env.run(activityQuietMs);
  const sweep = activity.sweep();
  await tick();
  const p = activity.beforeChange(volumeId, 7);
  await sweep;
  await p;
  t.same(kv.keys('activity/'), [`activity/${volumeId}/0000000007`], 'logged again');
  t.same(kv.ops.map((o) => o.op), ['put', 'sync', 'del', 'put'], 'the new put after the delete');
});

t.test('activity log: pages of a volume deleted meanwhile leave it, suspect or not', async (t) => {
  const env = new ManualEnv();
  const kv = new FakeKv();
  const gone = 'fedcba9876543210';
  kv.data.set(`activity/${gone}/0000000001`, Buffer.alloc(0));
  kv.data.set(`activity/${volumeId}/0000000001`, Buffer.alloc(0));
  const activity = await ActivityLog.open({ kv, env, recentGrains: () => 0, settle: async () => kv.sync(), exists: (id) => id !== gone });
  t.same([...activity.suspect(gone)], [1]);
  await env.run(activityQuietMs);
  await activity.sweep();
  t.same(activity.logged(gone), [], 'the deleted volume\'s page left');
  t.same(activity.logged(volumeId), [1], 'a suspect page of a live volume stays');
});

// ---- dirty grains and resync ------------------------------------------------------------------

/** A range lock (the write path's, A1 range-lock.ts): waits while an overlapping range is held. */
class RangeLock {
  private held: { lba: number; end: number }[] = [];
  private waiters: (() => void)[] = [];

  async run<T>(lba: number, blocks: number, fn: () => Promise<T>): Promise<T> {
    const r = { lba, end: lba + blocks };
    while (this.held.some((h) => h.lba < r.end && r.lba < h.end)) await new Promise<void>((w) => this.waiters.push(w));
    this.held.push(r);
    try {
      return await fn();
    } finally {
      this.held.splice(this.held.indexOf(r), 1);
      for (const w of this.waiters.splice(0)) w();
    }
  }
}

interface Sent {
  to: string;
  op: 'write' | 'unmap';
  lba: number;
  blocks: number;
  epoch: number;
  fua: boolean;
}

interface Peer {
  id: string;
  kv: FakeKv;
  mem: MemoryBackend;
  activity: ActivityLog;
  tracker: ResyncTracker;
  resyncer: Resyncer;
  port: ReplicaPort;
  recent: number[];
  /** Sends this peer made. */
  sent: Sent[];
  /** A send to a copy fails when this says so. */
  fail?: (s: Sent) => boolean;
  /** A send waits for this first (a slow link). */
  gate?: (s: Sent) => Promise<void> | undefined;
  /** As primary: its in-sync copies may differ (a takeover reconciling): no copy is admitted. */
  unsettled?: boolean;
  /** As primary: a snapshot holds the volume here until this resolves (src/snapshot/service.ts hold). */
  snapshotHold?: Promise<void> | (() => Promise<void> | undefined);
  /** Runs when a primary's answer to this peer's resync ask is on its way back, before this peer has it. */
  onAnswer?: () => Promise<void>;
  lock: RangeLock;
  /** This peer's start token, answered to the changes it applies as a copy (page-service.ts). */
  startToken: number;
}

async function group(t: Tap.Test, opts: { replicas: number; peers: string[] }) {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-resync-'));
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const env = new ManualEnv();
  const catalog = await Catalog.open(meta, { members: fixedMembers(['p1', 'p2', 'p3']), pageBlocks, env });
  const created = await catalog.createVolume({ name: 'vol', size: 4 * pageBlocks * 512, peers: opts.peers, replicas: opts.replicas });
  // The record as the watch delivers it (the test's volume id is random).
  for (let i = 0; i < 20 && !catalog.volume('vol'); i++) await tick();
  const volume: VolumeRecord = catalog.volume('vol') ?? created;
  const peers = new Map<string, Peer>();
  /** Resync asks in flight (the catalog's store works in real time: tests wait for them). */
  const asking = new Set<Promise<unknown>>();
  /** Let `ms` of simulated time pass, and every resync ask started meanwhile end. */
  const run = async (ms: number): Promise<void> => {
    await env.run(ms);
    while (asking.size > 0) {
      await Promise.all([...asking]);
      for (let i = 0; i < 10; i++) await tick();
    }
  };
  /** Run until `done` (bounded): the catalog's reads and writes take real time, which a run of simulated time does not wait for. */
  const until = async (done: () => boolean): Promise<void> => {
    for (let i = 0; i < 200 && !done(); i++) {
      await run(1);
      await new Promise((r) => setTimeout(r, 2));
    }
  };
  t.teardown(async () => {
    for (const p of peers.values()) {
      p.resyncer.close();
      p.tracker.close();
      p.activity.close();
    }
    catalog.close();
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  /** A peer; `view`: its own catalog (its routes learned only from the watch and MOVED answers). */
  const make = async (id: string, kv = new FakeKv(), view = catalog): Promise<Peer> => {
    const mem = new MemoryBackend(512, 4 * pageBlocks, grainBlocks);
    const peer = { id, kv, mem, recent: [] as number[], sent: [] as Sent[], lock: new RangeLock(), startToken: 1 } as Peer;
    peer.port = {
      recentGrains: () => [...peer.recent],
      exclusive: (_page, lba, blocks, fn) => peer.lock.run(lba, blocks, fn),
      send: async (to, route, op, lba, blocks, data, fua) => {
        const s: Sent = { to, op, lba, blocks, epoch: route.version, fua };
        peer.sent.push(s);
        await peer.gate?.(s);
        if (peer.fail?.(s)) throw new Error(`send to ${to} failed`);
        // The copy's side (A1's ReplicaReceiver): log, apply, track.
        const dst = peers.get(to)!;
        const page = Math.floor(lba / pageBlocks);
        await dst.tracker.beforeChange(volume.id, page);
        if (op === 'write') await dst.mem.write(lba, data!);
        else await dst.mem.unmap(lba, blocks);
        dst.tracker.changed(volume.id, page, route, lba, blocks, []);
        return dst.startToken;
      },
      local: mem,
    };
    peer.activity = await ActivityLog.open({ kv, env, recentGrains: () => peer.recent.length, settle: async () => kv.sync(), exists: () => true });
    peer.tracker = await ResyncTracker.open({ self: id, kv, activity: peer.activity, env, log, volume: (vid) => view.volumeById(vid), port: () => peer.port });
    peer.resyncer = new Resyncer({
      self: id, env, catalog: view, tracker: peer.tracker, activity: peer.activity, port: () => peer.port, log,
      settings: { rateBytesPerSec: 0, pieceBytes: 64 * 1024 },
      unsettled: () => peer.unsettled === true,
      snapshotHold: () => (typeof peer.snapshotHold === 'function' ? peer.snapshotHold() : peer.snapshotHold),
      ask: (primary, ask) => {
        const answer = peers.get(primary)!.resyncer.handle(id, checkResyncAsk(JSON.parse(JSON.stringify(ask)) as Record<string, unknown>)).then(async (a) => {
          await peer.onAnswer?.();
          return a;
        });
        const seen = answer.catch(() => undefined).finally(() => asking.delete(seen));
        asking.add(seen);
        return answer;
      },
    });
    peers.set(id, peer);
    return peer;
  };
  const table = catalog.routes(volume);
  /** Drop `copy` from the page's in-sync set (what the write path does when a copy does not answer). */
  const drop = async (page: number, copy: string): Promise<Route> =>
    catalog.casRoute(volume, page, table.route(page), (now) => ({ owner: now.owner, copies: [...copiesOf(now)], inSync: inSyncOf(now).filter((p) => p !== copy) }));
  /** A host write through the primary, as the write path does it: lock, log, apply, send to in-sync and resyncing copies, track. */
  const write = async (primary: Peer, lba: number, data: Buffer | undefined, blocks = data ? data.length / 512 : 0): Promise<void> => {
    const page = Math.floor(lba / pageBlocks);
    await primary.lock.run(lba, blocks, async () => {
      const route = table.route(page);
      await primary.tracker.beforeChange(volumeId, page);
      if (data) await primary.mem.write(lba, data);
      else await primary.mem.unmap(lba, blocks);
      const to = [...inSyncOf(route).filter((p) => p !== primary.id), ...primary.tracker.resyncing(volume.id, page)];
      const missed: string[] = [];
      await Promise.all(to.map((c) => primary.port.send(c, route, data ? 'write' : 'unmap', lba, blocks, data, false).catch(() => void missed.push(c))));
      primary.tracker.changed(volume.id, page, route, lba, blocks, missed);
    });
  };
  /** Another peer's view of the catalog (closed with the group). */
  const view = async (): Promise<Catalog> => {
    const c = await Catalog.open(meta, { members: fixedMembers(['p1', 'p2', 'p3']), pageBlocks, env });
    t.teardown(() => c.close());
    return c;
  };
  return { env, run, until, view, catalog, volume, table, peers, make, drop, write };
}

const fill = (blocks: number, byte: number): Buffer => Buffer.alloc(blocks * 512, byte);
const grainLba = (page: number, g: number): number => page * pageBlocks + g * grainBlocks;
const dirtyList = (s: GrainSet | undefined): number[] | undefined => (s ? Array.from({ length: s.grains }, (_, i) => i).filter((i) => s.has(i)) : undefined);

t.test('dirty grains: kept for stale copies only, from the moment they leave the in-sync set', async (t) => {
  const g = await group(t, { replicas: 3, peers: ['p1', 'p2', 'p3'] });
  const vid = g.volume.id;
  const p1 = await g.make('p1');
  const p2 = await g.make('p2');
  p1.tracker.watch(vid, g.table);
  p2.tracker.watch(vid, g.table);
  // Page 0: p1 primary, p2 and p3 in sync. p3 leaves while p1 has a change in flight at grain 5.
  p1.recent = [5];
  const route = await g.drop(0, 'p3');
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p3')), [5], 'the grains in flight when p3 left');
  t.same(dirtyList(p2.tracker.dirtyOf(vid, 0, 'p3')), [], 'p2 (in sync) keeps a set for p3 too');
  p1.tracker.changed(vid, 0, route, grainLba(0, 3), 10, []);
  p2.tracker.changed(vid, 0, route, grainLba(0, 3), 10, []);
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p3')), [3, 5], 'a change marks its grains for the stale copy');
  t.same(dirtyList(p2.tracker.dirtyOf(vid, 0, 'p3')), [3]);
  t.equal(p1.tracker.dirtyOf(vid, 0, 'p2'), undefined, 'nothing for an in-sync copy');
  t.equal(p1.tracker.dirtyOf(vid, 0, 'p1'), undefined, 'nothing for itself');
  // A change spanning two grains, missed by in-sync p2 (the write path then drops it).
  p1.tracker.changed(vid, 0, route, grainLba(0, 6) + 100, 60, ['p2']);
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p2')), [6, 7], 'a copy that missed the change gets its grains');
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p3')), [3, 5, 6, 7]);
  // p2 falls out of sync: its sets are worthless now (it misses changes).
  const route2 = await g.drop(0, 'p2');
  t.equal(p2.tracker.dirtyOf(vid, 0, 'p3'), undefined, 'a stale peer keeps no sets');
  p2.tracker.changed(vid, 0, route2, grainLba(0, 1), 1, []);
  t.equal(p2.tracker.dirtyOf(vid, 0, 'p3'), undefined, 'and marks nothing');
  // A stale copy nobody here saw leave: p3 starts watching after p1 left page 1 (p2 primary, p3 in sync).
  const route1 = await g.drop(1, 'p1');
  const p3 = await g.make('p3');
  p3.tracker.watch(vid, g.table);
  p3.tracker.changed(vid, 1, route1, grainLba(1, 0), 1, []);
  t.same(dirtyList(p3.tracker.dirtyOf(vid, 1, 'p1')), [0, 1, 2, 3, 4, 5, 6, 7], 'unseen stale copy: whole page');
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 1, 'p3')), undefined, 'p1 stale on page 1: nothing');
  // The copy back in sync ends its set.
  await g.catalog.casRoute(g.volume, 0, g.table.route(0), (now) => ({ owner: now.owner, copies: [...copiesOf(now)], inSync: [...inSyncOf(now), 'p3'] }));
  t.equal(p1.tracker.dirtyOf(vid, 0, 'p3'), undefined, 'p3 back in sync: its set is gone');
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p2')), [5, 6, 7], 'p2 still stale (grain 5 was in flight when it left)');
});

// Seed 22024: p3, primary of page 2, served p4's resync (p4 registered: the write path sends it
// every change) and waited to admit it while a snapshot held the volume; meanwhile p1 became the
// primary and wrote #41, which p3 applied as a copy and p4 never got; p3 took the page back and
// admitted p4 without it. A registered copy is left unmarked only by the primary that sent the change.
t.test('dirty grains: a copy being resynced from here is marked by changes this peer applies as a copy', async (t) => {
  const g = await group(t, { replicas: 3, peers: ['p1', 'p2', 'p3'] });
  const vid = g.volume.id;
  const p1 = await g.make('p1');
  p1.tracker.watch(vid, g.table);
  const route = await g.drop(0, 'p3');
  p1.tracker.register(vid, 0, 'p3', grainsPerPage, []);
  p1.tracker.changed(vid, 0, route, grainLba(0, 2), 1, []);
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p3')), [], 'as the primary: the change went to p3 too, nothing marked');
  // Another primary's change, applied here as a copy (p1 in sync, p3 still stale): it did not go to p3.
  const other = { ...route, owner: 'p2', copies: ['p2', 'p1', 'p3'], inSync: ['p2', 'p1'] };
  p1.tracker.changed(vid, 0, other, grainLba(0, 4), 1, []);
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p3')), [4], "another primary's change is marked for p3");
});

t.test('dirty grains: written unsynced, read back at open; whole for a page suspect after a crash', async (t) => {
  const g = await group(t, { replicas: 2, peers: ['p1', 'p2'] });
  const vid = g.volume.id;
  const p1 = await g.make('p1');
  p1.tracker.watch(vid, g.table);
  await g.drop(0, 'p2');
  await g.drop(2, 'p2');
  await p1.tracker.beforeChange(vid, 0);
  p1.tracker.changed(vid, 0, g.table.route(0), grainLba(0, 2), 1, []);
  await p1.tracker.beforeChange(vid, 2);
  p1.tracker.changed(vid, 2, g.table.route(2), grainLba(2, 4), 1, []);
  await g.env.run(dirtyPersistMs);
  const puts = p1.kv.ops.filter((o) => o.key.startsWith('dirty/'));
  t.same(puts.map((o) => `${o.op} ${o.sync}`), ['put false', 'put false'], 'one unsynced put per page, debounced');
  // The volume's flush (the activity sweep's) makes them durable; page 0 leaves the log, page 2 stays (recent).
  p1.recent = [];
  await g.env.run(activityQuietMs);
  await p1.activity.beforeChange(vid, 2);
  await p1.activity.sweep();
  t.same(p1.activity.logged(vid), [2], 'page 0 left the log after a flush; page 2 changed again');
  // Crash: page 0's record and its removal from the log were synced; page 2 is still logged.
  const kept = p1.kv.crashed();
  const again = await g.make('p1', kept);
  t.same(dirtyList(again.tracker.dirtyOf(vid, 0, 'p2')), [2], 'page 0 read back as it was');
  t.same(dirtyList(again.tracker.dirtyOf(vid, 2, 'p2')), [0, 1, 2, 3, 4, 5, 6, 7], 'page 2 is suspect: its set counts whole');
});

// Seed 187549: p3, page 2's primary, applied a COMPARE AND WRITE that never reached p1 (down), and
// crashed. Back, with the page suspect (in its activity log), it dropped p1 (unreachable) and
// kept the page as its only in-sync copy; the set it began for p1 held its recent grains, none
// after the crash, and p1's resync missed the write.
t.test('dirty grains: a copy that leaves the in-sync set of a page suspect here (after a crash) gets a whole set', async (t) => {
  const g = await group(t, { replicas: 2, peers: ['p1', 'p2'] });
  const vid = g.volume.id;
  const p1 = await g.make('p1');
  p1.tracker.watch(vid, g.table);
  // Page 0 (p1 primary, p2 in sync) and page 2 are changed; p1 crashes with both in its log.
  await p1.tracker.beforeChange(vid, 0);
  p1.tracker.changed(vid, 0, g.table.route(0), grainLba(0, 3), 1, []);
  await p1.tracker.beforeChange(vid, 2);
  const again = await g.make('p1', p1.kv.crashed());
  again.tracker.watch(vid, g.table);
  t.ok(again.activity.isSuspect(vid, 0) && again.activity.isSuspect(vid, 2), 'pages 0 and 2 are suspect after the restart');
  again.recent = [];
  await g.drop(0, 'p2');
  t.same(dirtyList(again.tracker.dirtyOf(vid, 0, 'p2')), allGrains, 'p2 left page 0 after the restart: whole (the grains p1 changed before the crash are not known)');
  // A change p2 misses on a suspect page begins its set whole too (before the drop that follows).
  again.tracker.changed(vid, 2, g.table.route(2), grainLba(2, 1), 1, ['p2']);
  t.same(dirtyList(again.tracker.dirtyOf(vid, 2, 'p2')), allGrains, 'a missed change on suspect page 2: whole');
  // Once trusted again (resynced whole), sets begin from the recent grains as before.
  again.activity.trusted(vid, 2);
  again.tracker.forget(vid, 2, 'p2');
  again.tracker.changed(vid, 2, g.table.route(2), grainLba(2, 4), 1, ['p2']);
  t.same(dirtyList(again.tracker.dirtyOf(vid, 2, 'p2')), [4], 'not suspect: the missed grain only');
});

/** Page 0's copies without `copy` (it leaves the page: drained, evacuated), or with it again as a new, stale copy. */
const withoutCopy = (copy: string) => (now: Route): Omit<Route, 'version'> => ({ owner: now.owner, copies: copiesOf(now).filter((p) => p !== copy), inSync: inSyncOf(now).filter((p) => p !== copy) });
const withNewCopy = (copy: string) => (now: Route): Omit<Route, 'version'> => ({ owner: now.owner, copies: [...copiesOf(now), copy], inSync: [...inSyncOf(now)] });
const allGrains = Array.from({ length: grainsPerPage }, (_, i) => i);

t.test('dirty grains: a change that ends after a copy left the page marks nothing for it; back as a new copy, it is whole', async (t) => {
  // Simulator, seed 22031: a write held up by a partition ended after p1 had left page 0's
  // copies (and freed its page). The primary began a set for p1 with that write's grain alone;
  // when p1 came back as a copy, its resync copied that grain and nothing else, and p1 was
  // admitted in sync without the page's earlier writes.
  const g = await group(t, { replicas: 3, peers: ['p1', 'p2', 'p3'] });
  const vid = g.volume.id;
  const p1 = await g.make('p1');
  p1.tracker.watch(vid, g.table);
  const held = g.table.route(0);
  t.same(inSyncOf(held), ['p1', 'p2', 'p3'], 'page 0: p1 primary, p2 and p3 in sync');
  await g.catalog.casRoute(g.volume, 0, held, withoutCopy('p3'));
  p1.tracker.changed(vid, 0, held, grainLba(0, 3), 1, ['p3']);
  t.equal(p1.tracker.dirtyOf(vid, 0, 'p3'), undefined, 'a change by the old route that p3 missed: no set for a peer that is no copy');
  await g.catalog.casRoute(g.volume, 0, g.table.route(0), withNewCopy('p3'));
  t.equal(p1.tracker.dirtyOf(vid, 0, 'p3'), undefined, 'p3 back as a new copy: no set, so its resync is whole');
  p1.tracker.changed(vid, 0, held, grainLba(0, 5), 1, ['p3']);
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p3')), allGrains, 'another held-up change by the old route: the set it begins is whole');
  // The ordinary case is unchanged: an in-sync copy that misses a change gets that change's grains.
  p1.tracker.changed(vid, 0, g.table.route(0), grainLba(0, 6), 1, ['p2']);
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p2')), [6], 'p2 (in sync) missed one change: its grain');
});

/**
 * p1 keeps a set for stale p3 (grain 2) and stops; `whileDown` changes page 0's route in the
 * catalog; p1 starts again and reads the set back. Its tracker watches the routes again.
 */
async function setReadBackAtOpen(t: Tap.Test, whileDown: (g: Awaited<ReturnType<typeof group>>) => Promise<unknown>) {
  const g = await group(t, { replicas: 3, peers: ['p1', 'p2', 'p3'] });
  const vid = g.volume.id;
  const p1 = await g.make('p1');
  const unwatch = p1.tracker.watch(vid, g.table);
  await g.drop(0, 'p3');
  p1.tracker.changed(vid, 0, g.table.route(0), grainLba(0, 2), 1, []);
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p3')), [2], 'p3 stale: one grain since');
  await g.env.run(dirtyPersistMs);
  unwatch();
  p1.tracker.close();
  await whileDown(g);
  const again = await g.make('p1', p1.kv);
  t.same(dirtyList(again.tracker.dirtyOf(vid, 0, 'p3')), [2], 'read back at open');
  again.tracker.watch(vid, g.table);
  return { g, vid, again };
}

t.test('dirty grains: a set read back at open is dropped when its peer comes back as a new copy', async (t) => {
  // Meanwhile p3 leaves page 0 (its page freed there); then p3 is made a copy again: it holds
  // nothing of the page, whatever that set says.
  const { g, vid, again } = await setReadBackAtOpen(t, (g) => g.catalog.casRoute(g.volume, 0, g.table.route(0), withoutCopy('p3')));
  await g.catalog.casRoute(g.volume, 0, g.table.route(0), withNewCopy('p3'));
  t.equal(again.tracker.dirtyOf(vid, 0, 'p3'), undefined, 'p3 is a new copy: the old set is gone, its resync is whole');
});

t.test('dirty grains: sets read back at open by a peer already out of sync are dropped when it comes back in sync (seed 34913)', async (t) => {
  // p1 is dropped while down (no route it learns shows it leaving); it misses changes until
  // resynced, then is back in sync.
  const { g, vid, again } = await setReadBackAtOpen(t, (g) => g.catalog.casRoute(g.volume, 0, g.table.route(0), (now) => ({ owner: 'p2', copies: ['p2', 'p1', 'p3'], inSync: inSyncOf(now).filter((p) => p !== 'p1') })));
  await g.catalog.casRoute(g.volume, 0, g.table.route(0), (now) => ({ owner: now.owner, copies: [...copiesOf(now)], inSync: [...inSyncOf(now), 'p1'] }));
  t.ok(inSyncOf(g.table.route(0)).includes('p1'), 'p1 back in sync');
  t.equal(again.tracker.dirtyOf(vid, 0, 'p3'), undefined, 'its old set for p3 is gone: p3 counts whole here');
});

/** Page 0 of a 2-copy volume on p1 (primary) and p2, with 8 grains of distinct data on both. */
async function staleP2(t: Tap.Test) {
  const g = await group(t, { replicas: 2, peers: ['p1', 'p2'] });
  const p1 = await g.make('p1');
  const p2 = await g.make('p2');
  for (let k = 0; k < grainsPerPage; k++) {
    await p1.mem.write(grainLba(0, k), fill(grainBlocks, 0x10 + k));
    await p2.mem.write(grainLba(0, k), fill(grainBlocks, 0x10 + k));
  }
  p1.resyncer.start();
  await g.drop(0, 'p2');
  return { ...g, p1, p2, vid: g.volume.id };
}

const pageOf = (m: MemoryBackend, page = 0): Buffer => m.data.subarray(page * pageBlocks * 512, (page + 1) * pageBlocks * 512);

t.test('resync: copies exactly the dirty and the asked grains, unmaps unmapped ones, and CASes the copy back in', async (t) => {
  const g = await staleP2(t);
  const { p1, p2, vid } = g;
  await g.write(p1, grainLba(0, 2) + 5, fill(3, 0xaa)); // p2 misses it: it is out of sync
  await g.write(p1, grainLba(0, 4), undefined, grainBlocks); // an unmap
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p2')), [2, 4]);
  // p2 applied a change as primary that never got anywhere (grain 6): it asks for it back.
  await p2.mem.write(grainLba(0, 6), fill(1, 0xee));
  p2.recent = [6];
  const before = g.table.route(0);
  p2.resyncer.start();
  await g.run(10);
  const after = g.table.route(0);
  t.same(inSyncOf(after), ['p1', 'p2'], 'p2 is in sync again');
  t.equal(after.version, before.version + 1, 'one epoch later');
  t.same(p1.sent.map((s) => `${s.to} ${s.op} ${(s.lba - grainLba(0, 0)) / grainBlocks}+${s.blocks} e${s.epoch}`).sort(), [
    `p2 unmap 4+${grainBlocks} e${before.version}`,
    `p2 write 2+${grainBlocks} e${before.version}`,
    `p2 write 6+${grainBlocks} e${before.version}`,
  ], 'grains 2 (dirty), 4 (unmapped: an unmap) and 6 (asked), nothing else (runs of one grain each, sent at once)');
  t.ok(p1.sent.every((s) => s.fua), 'each run ends with a FUA send: durable on the copy before it is admitted (seed 5169)');
  t.equal(p1.resyncer.counters.resyncBytes, 2 * grainBlocks * 512, 'bytes of data sent');
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)), 'the copies agree');
  t.equal(p1.tracker.dirtyOf(vid, 0, 'p2'), undefined, 'no set for an in-sync copy');
  t.same(p1.tracker.resyncing(vid, 0), [], 'no longer resyncing');
});

t.test('resync: a suspect copy asks for the whole page, and is trusted after', async (t) => {
  const g = await staleP2(t);
  const { p1, p2, vid } = g;
  // p2 restarted after a crash with page 0 in its activity log.
  const kv = new FakeKv();
  kv.data.set(`activity/${vid}/0000000000`, Buffer.alloc(0));
  const again = await g.make('p2', kv);
  again.mem.data.set(p2.mem.data);
  t.same([...again.activity.suspect(vid)], [0]);
  again.resyncer.start();
  await g.run(10);
  t.same(p1.sent.map((s) => `${s.op} ${s.lba}+${s.blocks}`), [`write 0+${pageBlocks}`], 'every grain copied, in one run');
  t.equal(p1.resyncer.counters.resyncBytes, pageBlocks * 512);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2']);
  t.same([...again.activity.suspect(vid)], [], 'trusted again');
});

t.test('resync: a change during the resync reaches the copy, or marks its grain again', async (t) => {
  const g = await staleP2(t);
  const { p1, p2, vid } = g;
  for (const k of [1, 2, 3]) await g.write(p1, grainLba(0, k), fill(grainBlocks, 0xa0 + k));
  // The copy of grains 1 to 3 (one run) is slow: changes run meanwhile.
  const slow = deferred();
  p1.gate = (s) => (s.op === 'write' && s.lba === grainLba(0, 1) && s.blocks === 3 * grainBlocks ? slow.promise : undefined);
  p2.resyncer.start();
  await g.env.run(10);
  for (let i = 0; i < 20 && p1.sent.length === 0; i++) await tick();
  t.same(p1.tracker.resyncing(vid, 0), ['p2'], 'p2 registered');
  // Grain 5 (clean for p2): the change is sent to p2 as well, and stays clean.
  await g.write(p1, grainLba(0, 5) + 7, fill(2, 0xb5));
  t.notOk(p1.tracker.dirtyOf(vid, 0, 'p2')!.has(5), 'delivered: not dirty');
  // Grain 6: p2 misses it: marked again, copied by the resync.
  p1.fail = (s) => s.lba === grainLba(0, 6) + 1;
  await g.write(p1, grainLba(0, 6) + 1, fill(1, 0xb6));
  p1.fail = undefined;
  t.ok(p1.tracker.dirtyOf(vid, 0, 'p2')!.has(6), 'missed: dirty again');
  // Grain 1 again, while it is being copied: it waits for the grain's copy, then goes to p2 too.
  const late = g.write(p1, grainLba(0, 1) + 9, fill(1, 0xc1));
  slow.resolve();
  await late;
  await g.run(10);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'back in sync');
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)), 'the copies agree');
  const copied = p1.sent.filter((s) => s.blocks % grainBlocks === 0).map((s) => `${(s.lba - grainLba(0, 0)) / grainBlocks}+${s.blocks / grainBlocks}`);
  t.same(copied, ['1+3', '6+1'], 'grain 5 never copied: its change went to p2 directly');
});

t.test('resync: a change the copy misses while the resync waits to admit it is copied before the copy is admitted', async (t) => {
  const g = await staleP2(t);
  const { p1, p2 } = g;
  await g.write(p1, grainLba(0, 1), fill(grainBlocks, 0xa1));
  const copy1 = deferred();
  const dual5 = deferred();
  const isDual5 = (s: Sent): boolean => s.lba === grainLba(0, 5) + 3 && s.blocks === 1;
  p1.gate = (s) => (isDual5(s) ? dual5.promise : s.lba === grainLba(0, 1) ? copy1.promise : undefined);
  p1.fail = isDual5;
  p2.resyncer.start();
  await g.env.run(10);
  for (let i = 0; i < 20 && p1.sent.length === 0; i++) await tick();
  // A change of grain 5 is sent to p2 (resyncing) and hangs there; grain 1's copy ends meanwhile.
  const w = g.write(p1, grainLba(0, 5) + 3, fill(1, 0xb5));
  for (let i = 0; i < 20 && !p1.sent.some(isDual5); i++) await tick();
  copy1.resolve();
  for (let i = 0; i < 20; i++) await tick();
  t.same(inSyncOf(g.table.route(0)), ['p1'], 'not admitted while a change is in flight');
  dual5.resolve(); // … and p2 missed it
  await w;
  await g.run(10);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'admitted after');
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)), 'with the missed change');
  t.same(p1.sent.filter((s) => s.blocks === grainBlocks).map((s) => (s.lba - grainLba(0, 0)) / grainBlocks), [1, 5], 'grain 5 copied after it was missed');
});

t.test('resync: the dirty grains survive a change of primary and a restart of the primary', async (t) => {
  const g = await group(t, { replicas: 3, peers: ['p1', 'p2', 'p3'] });
  const [p1, p2, p3] = [await g.make('p1'), await g.make('p2'), await g.make('p3')];
  for (const p of [p1, p2, p3]) for (let k = 0; k < grainsPerPage; k++) await p.mem.write(grainLba(0, k), fill(grainBlocks, 0x10 + k));
  p1.resyncer.start();
  p2.resyncer.start();
  await g.drop(0, 'p3');
  await g.write(p1, grainLba(0, 2), fill(1, 0x22)); // p2 applies it too, and marks it for p3
  // p1 dies; p2 takes over (B: owner p2, p1 last and out of sync, epoch + 1).
  p1.resyncer.close();
  const r = g.table.route(0);
  await g.catalog.casRoute(g.volume, 0, r, () => ({ owner: 'p2', copies: ['p2', 'p3', 'p1'], inSync: ['p2'] }));
  await g.write(p2, grainLba(0, 5), fill(1, 0x55));
  t.same(dirtyList(p2.tracker.dirtyOf(g.volume.id, 0, 'p3')), [2, 5], 'p2 kept p3\'s set through its promotion');
  t.same(dirtyList(p2.tracker.dirtyOf(g.volume.id, 0, 'p1')), [5], 'and began one for p1 when it left');
  // Writes stop; the page leaves p2's activity log (records written and flushed), then p2 crashes.
  await g.env.run(activityQuietMs);
  await p2.activity.sweep();
  t.same(p2.activity.logged(g.volume.id), [], 'page 0 left the log');
  p2.resyncer.close();
  const again = await g.make('p2', p2.kv.crashed());
  again.mem.data.set(p2.mem.data);
  again.mem.mapped.set(p2.mem.mapped);
  again.resyncer.start();
  p3.resyncer.start();
  await g.run(10);
  t.same(inSyncOf(g.table.route(0)), ['p2', 'p3'], 'p3 resynced from the new primary after its restart');
  t.same(again.sent.map((s) => `${s.op} ${(s.lba - grainLba(0, 0)) / grainBlocks}`), ['write 2', 'write 5'], 'exactly the grains p3 missed');
  t.ok(pageOf(p3.mem).equals(pageOf(again.mem)), 'the copies agree');
});

t.test('resync: a copy that restarts between two sends of a run (the first not synced there) gets the run again', async (t) => {
  const g = await staleP2(t);
  const { p1, p2, vid } = g;
  // One run of two grains, two sends: a write (grain 1) and, FUA, an unmap (grain 2).
  await g.write(p1, grainLba(0, 1), fill(grainBlocks, 0xa1));
  await g.write(p1, grainLba(0, 2), undefined, grainBlocks);
  t.same(dirtyList(p1.tracker.dirtyOf(vid, 0, 'p2')), [1, 2]);
  // Before the unmap goes: p2 lost power and is back, without the write (not synced), under
  // another start token.
  let restarted = false;
  p1.gate = async (s) => {
    if (restarted || s.op !== 'unmap') return;
    restarted = true;
    await p2.mem.write(grainLba(0, 1), fill(grainBlocks, 0x11));
    p2.startToken = 2;
  };
  p2.resyncer.start();
  await g.run(1);
  t.ok(restarted, 'p2 restarted mid-run');
  t.same(inSyncOf(g.table.route(0)), ['p1'], 'the run failed: p2 is not admitted');
  await g.run(resyncRetryMsMin);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'p2 is in sync again');
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)), 'the copies agree: the run was sent again');
  t.same(p1.sent.map((s) => `${s.op} ${(s.lba - grainLba(0, 0)) / grainBlocks}${s.fua ? ' FUA' : ''}`), ['write 1', 'unmap 2 FUA', 'write 1', 'unmap 2 FUA']);
});

t.test('resync: a failed ask is asked again after a backoff; a repeated ask joins the running resync', async (t) => {
  const g = await staleP2(t);
  const { p1, p2 } = g;
  await g.write(p1, grainLba(0, 3), fill(1, 0x33));
  let failures = 1;
  p1.fail = () => failures-- > 0;
  p2.resyncer.start();
  await g.run(1);
  t.same(inSyncOf(g.table.route(0)), ['p1'], 'the first ask failed');
  await g.run(resyncRetryMsMin);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'the second one, a backoff later, succeeded');
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)));

  p2.resyncer.close(); // asked by hand from here on
  await g.drop(0, 'p2');
  await g.write(p1, grainLba(0, 4), fill(1, 0x44));
  const slow = deferred();
  p1.gate = () => slow.promise;
  const route = g.table.route(0);
  const ask: ResyncAsk = { volumeId: g.vid, page: 0, version: route.version, full: false, grains: [] };
  const a = p1.resyncer.handle('p2', ask);
  const b = p1.resyncer.handle('p2', { ...ask, grains: [7] });
  slow.resolve();
  t.same(await b, await a, 'the same run');
  t.same(p1.sent.slice(-2).map((s) => (s.lba - grainLba(0, 0)) / grainBlocks), [4, 7], 'with the grains of both asks');
});

t.test('resync: a copy that falls out of sync while its peer runs asks at once; a deleted volume\'s sets go', async (t) => {
  const g = await group(t, { replicas: 2, peers: ['p1', 'p2'] });
  const p1 = await g.make('p1');
  const p2 = await g.make('p2');
  p1.resyncer.start();
  p2.resyncer.start();
  await g.drop(0, 'p2');
  await g.write(p1, grainLba(0, 2), fill(1, 0x22));
  await g.run(10);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'back in sync with no restart');
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)));
  // p2 leaves page 2 (p1 primary) and p1 keeps its set; then the volume is deleted.
  p2.resyncer.close();
  await g.drop(2, 'p2');
  await g.write(p1, grainLba(2, 1), fill(1, 0x21));
  await g.run(dirtyPersistMs);
  t.same(p1.kv.keys('dirty/'), [`dirty/${g.volume.id}/0000000002`], 'a set recorded');
  await g.catalog.deleteVolume('vol');
  for (let i = 0; i < 50 && g.catalog.volume('vol'); i++) await tick();
  await g.run(dirtyPersistMs);
  t.equal(p1.tracker.dirtyOf(g.volume.id, 2, 'p2'), undefined, 'the volume\'s sets are gone');
  t.same(p1.kv.keys('dirty/'), [], 'and their record');
});

t.test('resync: a copy dropped again while the answer to its ask is on its way asks again', async (t) => {
  const g = await staleP2(t);
  const { p1, p2 } = g;
  await g.write(p1, grainLba(0, 3), fill(1, 0x33));
  // The answer (p2 back in sync) is on its way when a change p2 misses drops it again: p2 hears
  // the newer route while its ask is still running.
  let dropped = false;
  p2.onAnswer = async () => {
    if (dropped) return;
    dropped = true;
    await g.drop(0, 'p2');
    await g.write(p1, grainLba(0, 5), fill(1, 0x55));
  };
  p2.resyncer.start();
  await g.run(10);
  t.ok(dropped, 'dropped while answered');
  await g.run(10);
  await g.until(() => inSyncOf(g.table.route(0)).length === 2);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'p2 asked again and is back in sync');
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)), 'with the change it missed');
});

t.test('resync: no copy is admitted while the primary\'s in-sync copies are not settled (a takeover reconciling)', async (t) => {
  const g = await staleP2(t);
  const { p1, p2 } = g;
  await g.write(p1, grainLba(0, 3), fill(1, 0x33));
  p1.unsettled = true;
  p2.resyncer.start();
  await g.run(1);
  t.same(inSyncOf(g.table.route(0)), ['p1'], 'copied, not admitted');
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)), 'the copy has what p1 has');
  await g.run(resyncRetryMsMin);
  t.same(inSyncOf(g.table.route(0)), ['p1'], 'still not, asked again');
  p1.unsettled = false;
  await g.run(4 * resyncRetryMsMin);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'admitted once settled');
});

/** 100 ms of simulated time, with the catalog's real time in between, while resync asks may still wait (g.run waits for them to end). */
async function whileAsking(g: { env: ManualEnv }): Promise<void> {
  for (let i = 0; i < 100; i++) {
    await g.env.run(1);
    await new Promise((r) => setTimeout(r, 2));
  }
}

// Seed 26461: p4 was dropped from page 2's in-sync set and froze its layer of a barrier snapshot
// while stale; its resync admitted it again before the snapshot read its routes at the cut. In
// sync both before anything froze and at the cut, it was named a holder, and its layer lacked
// the write it had missed. While a snapshot holds the volume on the primary, no copy is admitted.
t.test('resync: no copy is admitted while a snapshot holds the volume on the primary', async (t) => {
  const g = await staleP2(t);
  const { p1, p2 } = g;
  await g.write(p1, grainLba(0, 3), fill(1, 0x33));
  let letGo!: () => void;
  p1.snapshotHold = new Promise<void>((r) => (letGo = r));
  p2.resyncer.start();
  // The ask waits for the hold: time passes without waiting for asks to end (g.run would).
  await whileAsking(g);
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)), 'the copy has what p1 has');
  t.same(inSyncOf(g.table.route(0)), ['p1'], 'copied, not admitted while the snapshot holds the volume');
  p1.snapshotHold = undefined;
  letGo();
  await g.until(() => inSyncOf(g.table.route(0)).length === 2);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'admitted once the snapshot let go');
});

t.test('resync: a snapshot that takes hold after the admission looked, before the page\'s lock, still stops it', async (t) => {
  const g = await staleP2(t);
  const { p1, p2 } = g;
  await g.write(p1, grainLba(0, 3), fill(1, 0x33));
  let letGo!: () => void;
  const held = new Promise<void>((r) => (letGo = r));
  let looks = 0;
  let released = false;
  p1.snapshotHold = () => (++looks === 1 || released ? undefined : held);
  p2.resyncer.start();
  await whileAsking(g);
  t.ok(looks >= 2, 'looked again under the lock');
  t.same(inSyncOf(g.table.route(0)), ['p1'], 'not admitted');
  released = true;
  letGo();
  await g.until(() => inSyncOf(g.table.route(0)).length === 2);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'admitted once the snapshot let go');
});

t.test('resync: a stale copy that hears its route without copies (MOVED) reads the catalog\'s record and asks', async (t) => {
  const g = await group(t, { replicas: 2, peers: ['p1', 'p2'] });
  const p1 = await g.make('p1');
  const own = await g.view();
  const p2 = await g.make('p2', new FakeKv(), own);
  own.holdRouteEvents(); // p2's watch lags
  p1.resyncer.start();
  p2.resyncer.start();
  await g.write(p1, grainLba(0, 3), fill(1, 0x33));
  const route = await g.drop(0, 'p2');
  await g.write(p1, grainLba(0, 4), fill(1, 0x44));
  t.ok(own.routes(own.volume('vol')!).learn(0, { owner: route.owner, version: route.version }), 'p2 hears the epoch in a MOVED answer');
  await g.run(10);
  await g.until(() => inSyncOf(g.table.route(0)).length === 2);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'p2 asked and is back in sync');
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)));
});

t.test('resync: a copy dropped again while its last ask still ends (its route read waits) asks again (seed 1786)', async (t) => {
  const g = await group(t, { replicas: 2, peers: ['p1', 'p2'] });
  const p1 = await g.make('p1');
  const own = await g.view();
  const p2 = await g.make('p2', new FakeKv(), own);
  // p2's route read after an answer waits for a catalog out of reach, until the test lets it go.
  let reachable: { promise: Promise<void>; resolve: () => void } | undefined;
  const fetchRoute = own.fetchRoute.bind(own);
  own.fetchRoute = async (volume, page) => {
    await reachable?.promise;
    return fetchRoute(volume, page);
  };
  p1.resyncer.start();
  p2.resyncer.start();
  reachable = deferred();
  await g.drop(0, 'p2');
  await g.write(p1, grainLba(0, 3), fill(1, 0x33));
  await g.run(10);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'p2 resynced and is back in sync');
  const again = await g.drop(0, 'p2');
  await g.write(p1, grainLba(0, 5), fill(1, 0x55));
  for (let i = 0; i < 50 && own.routes(own.volume('vol')!).route(0).version < again.version; i++) await tick();
  t.equal(own.routes(own.volume('vol')!).route(0).version, again.version, 'p2 learned the new drop while its ask was still ending');
  reachable.resolve();
  await g.until(() => inSyncOf(g.table.route(0)).length === 2);
  t.same(inSyncOf(g.table.route(0)), ['p1', 'p2'], 'p2 asked again and is back in sync');
  t.ok(pageOf(p2.mem).equals(pageOf(p1.mem)));
});

t.test('resync runs: the first dirty grains not taken yet, contiguous, at most so many; within the volume', (t) => {
  const dirty = new GrainSet(16);
  for (const g of [1, 2, 3, 4, 5, 7, 8, 15]) dirty.add(g);
  const taken = new GrainSet(16);
  t.same(nextRun(dirty, taken, 4), { first: 1, count: 4 }, 'a run stops at its bound');
  for (const g of [1, 2, 3, 4]) taken.add(g);
  t.same(nextRun(dirty, taken, 4), { first: 5, count: 1 }, 'and at a clean grain');
  taken.add(5);
  t.same(nextRun(dirty, taken, 4), { first: 7, count: 2 });
  taken.add(7);
  taken.add(8);
  t.same(nextRun(dirty, taken, 4), { first: 15, count: 1 }, 'the last grain');
  taken.add(15);
  t.equal(nextRun(dirty, taken, 4), undefined, 'none left');
  t.equal(nextRun(undefined, taken, 4), undefined, 'no set');
  const taken2 = new GrainSet(16);
  taken2.add(2);
  t.same(nextRun(dirty, taken2, 16), { first: 1, count: 1 }, 'a taken grain ends a run');
  // A volume of 2.5 pages of 8 grains of 128 blocks: page 2 ends after grain 3.
  const geo = { blockBytes: 512, pageBlocks: 1024, blockCount: 2560 };
  t.same(runExtent(geo, 1, { first: 2, count: 3 }), { lba: 1024 + 256, blocks: 384 });
  t.same(runExtent(geo, 2, { first: 2, count: 4 }), { lba: 2048 + 256, blocks: 256 }, 'clipped at the volume\'s end');
  t.same(runExtent(geo, 2, { first: 4, count: 2 }), { lba: 2048 + 512, blocks: 0 }, 'empty past it');
  t.end();
});

t.test('resync runs: paced per length class, a run\'s time shared by the runs in flight', (t) => {
  const p = new RunPacer(0.5);
  t.equal(p.pauseAfter(16, 10, 1), 0, 'the first long run');
  t.equal(p.pauseAfter(1, 2, 1), 0, 'a short run is fast: no pause …');
  t.equal(p.pauseAfter(16, 10, 1), 0, '… and it does not make the long ones look slow');
  t.equal(p.pauseAfter(16, 40, 4), 0, 'four at once, each four times as long: no host load');
  t.equal(p.pauseAfter(16, 40, 1), 20, 'alone and that slow: it waited behind other work (40 − 2 × 10, at duty 1/2)');
  t.equal(p.pauseAfter(2, 4, 1), 0, 'lengths 2 and 3 share a class …');
  t.equal(p.pauseAfter(3, 9, 1), 1, '… where 9 ms is 1 ms beyond twice 4');
  t.equal(new RunPacer(1).pauseAfter(16, 1000, 1), 0, 'duty 1: never');
  t.end();
});

t.test('resync: the runs of a page go at once, within the peer\'s window over every page it serves', async (t) => {
  const g = await group(t, { replicas: 2, peers: ['p1', 'p2'] });
  const [p1, p2] = [await g.make('p1'), await g.make('p2')];
  p1.tracker.watch(g.volume.id, g.table);
  p1.resyncer.start();
  // Pages 0 to 2: p1 primary, p2 stale and missing grains 0, 2, 4 and 6 of each (four runs a page).
  for (const page of [0, 1, 2]) {
    await g.catalog.casRoute(g.volume, page, g.table.route(page), () => ({ owner: 'p1', copies: ['p1', 'p2'], inSync: ['p1'] }));
    for (const k of [0, 2, 4, 6]) await g.write(p1, grainLba(page, k), fill(grainBlocks, 0x40 + 8 * page + k));
  }
  const held = deferred();
  p1.gate = () => held.promise;
  p2.resyncer.start();
  await g.env.run(10);
  for (let i = 0; i < 50; i++) await tick();
  const perPage = [0, 1, 2].map((page) => p1.sent.filter((s) => Math.floor(s.lba / pageBlocks) === page).length);
  t.equal(p1.sent.length, resyncRunsInFlightMax, `${resyncRunsInFlightMax} runs in flight, no more (12 wanted)`);
  t.ok(perPage.every((n) => n <= resyncRunsPerPageMax), `at most ${resyncRunsPerPageMax} of one page (${perPage.join(', ')})`);
  held.resolve();
  p1.gate = undefined;
  await g.run(10);
  for (const page of [0, 1, 2]) t.same(inSyncOf(g.table.route(page)), ['p1', 'p2'], `page ${page} back in sync`);
  t.equal(p1.sent.length, 12, 'each run sent once');
  t.ok(p2.mem.data.subarray(0, 3 * pageBlocks * 512).equals(p1.mem.data.subarray(0, 3 * pageBlocks * 512)), 'the copies agree');
});

t.test('resync: refused by a peer that is not the primary, or for a peer that holds no copy', async (t) => {
  const g = await staleP2(t);
  const route = g.table.route(0);
  const ask: ResyncAsk = { volumeId: g.vid, page: 0, version: route.version, full: false, grains: [] };
  await t.rejects(g.p2.resyncer.handle('p1', ask), { code: 'PEERSAN_ERR_CONFLICT' }, 'p2 is not the primary');
  await t.rejects(g.p1.resyncer.handle('p3', ask), { code: 'PEERSAN_ERR_CONFLICT' }, 'p3 holds no copy');
  t.same(g.p1.sent, [], 'nothing sent');
});

t.test('route table: a route heard without copies is completed by the same epoch from the catalog; recorded() lists changed pages', async (t) => {
  const table = new RouteTable(['p1', 'p2'], pageBlocks, new Map(), 2);
  const heard: Route[] = [];
  table.onLearn((_page, r) => heard.push(r));
  t.ok(table.learn(0, { owner: 'p2', version: 3 }), 'a MOVED answer: owner and epoch only');
  t.notOk(table.learn(0, { owner: 'p2', version: 3, copies: ['p2', 'p1'], inSync: ['p2'] }), 'the same epoch with its copies: nothing newer learned…');
  t.same(table.route(0).copies, ['p2', 'p1'], '… but its copies are taken (and the listeners hear them)');
  t.notOk(table.learn(0, { owner: 'p2', version: 3, copies: ['p2', 'p1'], inSync: ['p2', 'p1'] }), 'but only once');
  t.notOk(table.learn(0, { owner: 'p2', version: 3 }), 'and never loses them again');
  t.same(heard.map((r) => r.copies ?? null), [null, ['p2', 'p1']]);
  t.same(table.recorded(), [[0, { owner: 'p2', version: 3, copies: ['p2', 'p1'], inSync: ['p2'] }]]);
});

t.test('the resync message: shapes and bounds checked', async (t) => {
  const good = { volumeId, page: 3, version: 2, full: false, grains: [1, 1, 5] };
  t.same(checkResyncAsk(good), { ...good, grains: [1, 5] });
  for (const bad of [
    { ...good, volumeId: 'nope' },
    { ...good, page: -1 },
    { ...good, page: 1.5 },
    { ...good, version: 0 },
    { ...good, full: 'yes' },
    { ...good, grains: [512] },
    { ...good, grains: 'all' },
    { ...good, grains: Array.from({ length: 513 }, () => 0) },
  ]) t.throws(() => checkResyncAsk(bad as Record<string, unknown>), { code: 'PEERSAN_ERR_INVALID_ARGUMENT' }, JSON.stringify(bad).slice(0, 80));
});
