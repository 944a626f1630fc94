// A primary whose change reached no copy and whose drop of that copy could not be made (the
// catalog out of reach) tries the drop again later (replicated.ts dropLater), on timers that
// do not keep the process alive: a peer that stops does not wait up to dropRetryMsMax to exit.

import t from 'tap';
import pino from 'pino';
import type { VolumeRecord } from '../src/cluster/catalog';
import type { TimerHandle } from '../src/env/env';
import { ManualEnv } from '../src/env/manual';
import { PeerUnavailableError } from '../src/errors';
import { dropRetryMsMin, replicaAckMsMax } from '../src/limits';
import { ReplicatedVolume } from '../src/replication/replicated';
import { RouteTable, type Route } from '../src/routing/table';
import { passThroughGuard, passThroughTracker } from './helpers/one-copy';
import { MemoryBackend } from './helpers/memory-backend';

/**
 * p1, primary of a 2-copy volume's pages (64 blocks), whose copy p2 cannot be reached; the
 * catalog CASes with `casRoute` (by default it never answers).
 */
function lonePrimary(env: ManualEnv, casRoute: (v: VolumeRecord, page: number) => Promise<Route> = () => Promise.reject(new Error('catalog: no answer'))): { table: RouteTable; volume: ReplicatedVolume } {
  const table = new RouteTable(['p1', 'p2'], 64, new Map(), 2);
  const local = new MemoryBackend(512, 128, 8);
  const record = { id: '0123456789abcdef', name: 'v', replicas: 2 } as VolumeRecord;
  const volume = new ReplicatedVolume({
    self: 'p1', volumeId: record.id, table, local, copy: local, env, log: pino({ level: 'silent' }),
    link: () => ({ send: () => Promise.reject(new PeerUnavailableError('p2', 'connection refused', false)) }),
    refresh: async (p) => table.route(p), volume: () => record, catalog: { casRoute }, tracker: passThroughTracker, guard: passThroughGuard,
  });
  return { table, volume };
}

t.test('the retries of a drop that could not be made are on unref\'d timers', async (t) => {
  const env = new ManualEnv();
  // Every timer armed, and whether it was unref'd.
  const armed: { ms: number; unrefd: boolean }[] = [];
  const setTimeout = env.timers.setTimeout.bind(env.timers);
  env.timers.setTimeout = (fn: () => void, ms: number): TimerHandle => {
    const handle = setTimeout(fn, ms);
    const entry = { ms, unrefd: false };
    armed.push(entry);
    return { unref: () => ((entry.unrefd = true), handle.unref(), handle) } as unknown as TimerHandle;
  };
  const { volume } = lonePrimary(env);
  const write = t.rejects(volume.write(0, Buffer.alloc(512, 1)), 'the write fails: its copy can be neither reached nor dropped');
  await env.run(replicaAckMsMax + 10);
  await write;
  const retry = armed.find((a) => a.ms === dropRetryMsMin);
  t.ok(retry, `the drop is tried again after ${dropRetryMsMin} ms`);
  t.ok(retry?.unrefd, 'on an unref\'d timer');
});

// Seed 138: a change stamped before a timestamp snapshot's T failed on its copy, and the drop
// waited for the catalog; the change counted as settled, the copy stayed in the in-sync set and
// was counted as a holder of a layer it froze without the change. While the drop is pending
// the primary names the copy (undroppedCopies), and a snapshot leaves it out of the holders.
t.test('a copy whose drop is pending is named until the drop is made', async (t) => {
  const env = new ManualEnv();
  let reachable = false;
  const { table, volume } = lonePrimary(env, async (_v, page) => {
    if (!reachable) throw new Error('catalog: no answer');
    return { ...table.route(page), version: table.route(page).version + 1, inSync: ['p1'] };
  });
  t.same(volume.undroppedCopies(), [], 'none before any change');
  let settled = false;
  void volume.changesBefore(Number.MAX_SAFE_INTEGER).then(() => (settled = true));
  const write = t.rejects(volume.write(0, Buffer.alloc(512, 1), { stamp: 5 }), 'the write fails: its copy can be neither reached nor dropped');
  await env.run(replicaAckMsMax + 10);
  await write;
  t.ok(settled, 'the change counts as settled for a snapshot\'s wait');
  t.same(volume.undroppedCopies(), [{ page: 0, peer: 'p2' }], 'its copy is named while its drop waits for the catalog');
  await env.run(dropRetryMsMin * 4);
  t.same(volume.undroppedCopies(), [{ page: 0, peer: 'p2' }], 'still, while the catalog is out of reach');
  reachable = true;
  await env.run(dropRetryMsMin * 8);
  t.same(volume.undroppedCopies(), [], 'no more once the drop is made');
});

// Seed 29932: a change failed on the primary p1 (its copy neither reached nor dropped) and stayed
// pending; then p2 took the page over while p1 was cut off, and p1 heard of it only from the
// catalog's watch, never from a request of its own (PageMovedError). When the role came back to
// p1, the page was unsettled for good: every resync of it was refused, and a drain never ended.
// The page's pending changes are its new primary's to reconcile from the moment p1 learns of it.
t.test('a change left pending is released when the page has another primary, however that is learned', async (t) => {
  const env = new ManualEnv();
  const { table, volume } = lonePrimary(env);
  const write = t.rejects(volume.write(0, Buffer.alloc(512, 1)), 'the write fails: its copy can be neither reached nor dropped');
  await env.run(replicaAckMsMax + 10);
  await write;
  t.ok(volume.unsettled(0), 'page 0 is unsettled on p1');
  const before = table.route(0);
  table.learn(0, { owner: 'p1', version: before.version + 1, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] });
  t.ok(volume.unsettled(0), 'a newer route that still names p1 primary: still unsettled');
  table.learn(0, { owner: 'p2', version: before.version + 2, copies: ['p2', 'p1'], inSync: ['p2', 'p1'] });
  t.notOk(volume.unsettled(0), 'p2 took the page over (the watch said so): released');
  table.learn(0, { owner: 'p1', version: before.version + 3, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] });
  t.notOk(volume.unsettled(0), 'the role back on p1: settled (p2 reconciled the change when it took over)');
});
