// A peer that is silent rather than dead (a cut cable, a hung process: no connection reset) is
// given up on once nothing came from it for leaseMs + margin (src/replication/leases.ts
// Leases.unheard / onUnheard, src/routing/router.ts PeerSilence): a router forwarding to it as a
// page's primary asks for the takeover then, instead of waiting out the link's peerRequestMsMax.
// No sockets: a ManualEnv, real Leases fed renewals by the test, fake links.

import t from 'tap';
import pino from 'pino';
import { ManualEnv } from '../src/env/manual';
import { PeerUnavailableError } from '../src/errors';
import { failoverWaitMsMax, flushTakeoverRecheckMs, leaseDriftMarginMs, leaseMs, leasePingMs, peerRequestMsMax } from '../src/limits';
import { LeaseBook, Leases } from '../src/replication/leases';
import { BlockOp, ReplyStatus, type BlockReply } from '../src/routing/frame';
import { newRoutingCounters, VolumeRouter, type BlockSender, type PeerSilence } from '../src/routing/router';
import { RouteTable, type Route } from '../src/routing/table';
import { MemoryBackend } from './helpers/memory-backend';

const log = pino({ level: 'silent' });
const pageBlocks = 64;
const bs = 512;
const data = Buffer.alloc(8 * bs, 7);
/** When a copy may take over from a primary last heard at `heardMs`, and so when the router gives up on it. */
const silentAfterMs = leaseMs + leaseDriftMarginMs;

/** p1 primary of pages 0 (copy p2 in sync) and 1 (its only copy); p2 primary of page 2. */
function table(): RouteTable {
  const tb = new RouteTable(['p1', 'p2'], pageBlocks, new Map(), 1);
  tb.learn(0, { owner: 'p1', version: 5, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] });
  tb.learn(1, { owner: 'p1', version: 5 });
  return tb;
}

const takenOver: Route = { owner: 'p2', version: 6, copies: ['p2', 'p1'], inSync: ['p2'] };

/** p1 black-holed: what is sent to it is never answered; the link fails it at its deadline, as PeerLink does. */
function blackHole(env: ManualEnv): BlockSender & { sent: number } {
  const link = {
    sent: 0,
    send: (): Promise<BlockReply> => {
      link.sent++;
      return new Promise((_, reject) => env.timers.setTimeout(() => reject(new PeerUnavailableError('p1', `no answer in ${peerRequestMsMax} ms`, true)), peerRequestMsMax));
    },
  };
  return link;
}

function answering(): BlockSender & { sent: number } {
  const link = {
    sent: 0,
    send: async (req: { op: number }): Promise<BlockReply> => {
      link.sent++;
      return { id: 1, status: ReplyStatus.ok, owner: '', version: 0, detail: 0, ...(req.op === BlockOp.read ? { payload: data } : {}) };
    },
  };
  return link;
}

/**
 * p3's leases: p1 and p2 renew with it every leasePingMs until `p1StopsAtMs`, p2 always (its own
 * renewals to them are never answered: only what it grants counts for silence).
 */
function leasesOf(env: ManualEnv, p1StopsAtMs: number): Leases {
  const leases = new Leases({
    self: 'p3', groupPeers: () => ['p1', 'p2', 'p3'], env, log,
    call: () => new Promise(() => undefined), learn: async () => undefined, refreshRoutes: async () => undefined,
  });
  leases.start();
  const renewals = env.timers.setInterval(() => {
    if (env.clock.monotonicMs() < p1StopsAtMs) leases.handle('p1', { ack: 0 });
    leases.handle('p2', { ack: 0 });
  }, leasePingMs);
  t.teardown(() => (env.timers.clearInterval(renewals), leases.close()));
  return leases;
}

/** `op` sends once to the black-holed p1 and fails with PeerUnavailableError exactly at the link's deadline. */
async function failsAtLinkDeadline(t: Tap.Test, env: ManualEnv, p1: { sent: number }, op: () => Promise<unknown>): Promise<void> {
  const sentBefore = p1.sent;
  const startMs = env.clock.monotonicMs();
  let failedAfterMs = -1;
  const failing = op().catch((err: unknown) => {
    t.type(err, PeerUnavailableError);
    failedAfterMs = env.clock.monotonicMs() - startMs;
  });
  await env.run(peerRequestMsMax + 10);
  await failing;
  t.equal(p1.sent - sentBefore, 1, 'sent to p1');
  t.equal(failedAfterMs, peerRequestMsMax, 'failed at the link\'s deadline');
}

function routerOf(env: ManualEnv, tb: RouteTable, links: Record<string, BlockSender>, silence: PeerSilence | undefined, asked: string[]): VolumeRouter {
  return new VolumeRouter({
    self: 'p3', volumeId: '0123456789abcdef', table: tb, local: new MemoryBackend(bs, 4 * pageBlocks, 8), link: (p) => links[p],
    refresh: async (p) => tb.route(p), counters: newRoutingCounters(), env,
    promote: async (peer, page) => {
      asked.push(`${peer} ${page}`);
      return takenOver;
    },
    ...(silence ? { silence } : {}),
  });
}

t.test('Leases.unheard: true once nothing came from a peer for leaseMs + margin; false for a peer not of the group', async (t) => {
  const env = new ManualEnv();
  const leases = leasesOf(env, 1_000);
  const told: string[] = [];
  leases.onUnheard((p) => told.push(`${p}@${env.clock.monotonicMs()}`));
  await env.run(1_000 + silentAfterMs - leasePingMs);
  t.notOk(leases.unheard('p1'), 'not yet: its last renewal is younger than leaseMs + margin');
  await env.run(leasePingMs + 1);
  t.ok(leases.unheard('p1'), 'unheard');
  t.same(told, [`p1@${1_000 - leasePingMs + silentAfterMs + 1}`], 'told once, as it became so');
  t.notOk(leases.unheard('p2'), 'p2 renews');
  t.notOk(leases.unheard('p9'), 'a peer not of the group is never unheard (and no assertion fails)');
});

t.test('Leases.onUnheard: a timer that fires early (Node\'s loop clock lags the monotonic one after a long task) is armed again', async (t) => {
  const env = new ManualEnv();
  const setTimeout = env.timers.setTimeout.bind(env.timers);
  env.timers.setTimeout = (fn: () => void, ms: number) => setTimeout(fn, ms - 50);
  const leases = leasesOf(env, 1_000);
  const told: number[] = [];
  leases.onUnheard(() => told.push(env.clock.monotonicMs()));
  await env.run(3_000);
  t.same(told, [1_000 - leasePingMs + silentAfterMs + 1], 'told once, when p1 is unheard');
});

t.test('LeaseBook: a peer whose renewals are refused (a takeover it has not learned) is silent but not unheard', async (t) => {
  const book = new LeaseBook(['p1'], 0);
  book.fence('p1', 'v', 0);
  t.notOk(book.grant('p1', 0, 1_000).granted, 'refused while the takeover\'s CAS is in flight');
  t.ok(book.silent('p1', silentAfterMs + 1), 'silent: its leases from us ran out');
  t.notOk(book.unheard('p1', silentAfterMs + 1), 'but heard from: not given up on');
  t.ok(book.unheard('p1', 1_000 + silentAfterMs + 1), 'unheard once nothing came for leaseMs + margin');
  book.answered('p1', 2_000, { granted: false, takeovers: [] }, 2_100);
  t.notOk(book.unheard('p1', 2_100 + silentAfterMs), 'an answer to our renewal counts too');
});

t.test('a forward to a silent primary of a page with another in-sync copy is given up when its lease runs out, and the takeover asked then', async (t) => {
  const env = new ManualEnv();
  const leases = leasesOf(env, 1_000);
  await env.run(1_000);
  const p1 = blackHole(env);
  const asked: string[] = [];
  const tb = table();
  const router = routerOf(env, tb, { p1, p2: answering() }, leases, asked);
  let doneAtMs = -1;
  const write = router.write(0, data).then(() => (doneAtMs = env.clock.monotonicMs()));
  await env.run(peerRequestMsMax + 1_000);
  await write;
  t.same(asked, ['p2 0'], 'the in-sync copy was asked to take over');
  t.equal(tb.route(0).owner, 'p2', 'the write went to the new primary');
  // p1's last renewal came at 750 ms (the renewals run every leasePingMs until 1 000 ms).
  const lastRenewalMs = 1_000 - leasePingMs;
  t.ok(doneAtMs >= lastRenewalMs + silentAfterMs, `not given up before p1 fell silent (done at ${doneAtMs} ms)`);
  t.ok(doneAtMs <= lastRenewalMs + silentAfterMs + 10, `done ${doneAtMs - lastRenewalMs} ms after p1's last renewal (silent after ${silentAfterMs} ms; the link's deadline is ${peerRequestMsMax} ms)`);
});

t.test('a primary silent already: nothing is sent to it (a COMPARE AND WRITE too waits for the new primary); a one-copy page waits for the link as before', async (t) => {
  const env = new ManualEnv();
  const leases = leasesOf(env, 0);
  await env.run(silentAfterMs + leasePingMs);
  const p1 = blackHole(env);
  const p2 = answering();
  const asked: string[] = [];
  const router = routerOf(env, table(), { p1, p2 }, leases, asked);
  const caw = router.compareAndWrite(0, Buffer.alloc(bs), Buffer.alloc(bs, 1));
  await env.run(10);
  t.same(await caw, { ok: true }, 'served by the new primary');
  t.equal(p1.sent, 0, 'never sent to the silent primary: it cannot have applied it');
  t.same(asked, ['p2 0']);
  // Page 1 has no other copy: nobody can take over, the link's deadline decides as before.
  await failsAtLinkDeadline(t, env, p1, () => router.write(pageBlocks, data));
});

t.test('SYNCHRONIZE CACHE with ledBy: the flush waits only while a copy that flushed still holds pages the silent primary leads (pages no copy holds are taken over when a host asks)', async (t) => {
  const env = new ManualEnv();
  const leases = leasesOf(env, 0);
  await env.run(silentAfterMs + leasePingMs);
  const tb = table();
  for (const page of [1, 2, 3]) tb.learn(page, { owner: 'p1', version: 6, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] });
  let led = 2;
  const asked: string[] = [];
  const router = new VolumeRouter({
    self: 'p3', volumeId: '0123456789abcdef', table: tb, local: new MemoryBackend(bs, 4 * pageBlocks, 8), link: (p) => (p === 'p1' ? blackHole(env) : answering()),
    refresh: async (p) => tb.route(p), counters: newRoutingCounters(), env, silence: leases,
    ledBy: async (peer, primary) => {
      asked.push(`${peer} ${primary}`);
      return led;
    },
  });
  let answered = false;
  const flushed = router.flush().then(() => (answered = true));
  await env.run(2 * flushTakeoverRecheckMs);
  t.notOk(answered, 'p2 still holds 2 pages p1 leads');
  t.same([...new Set(asked)], ['p2 p1'], 'asked p2, the copy that flushed, about p1');
  led = 0;
  await env.run(flushTakeoverRecheckMs);
  await flushed;
  t.ok(answered, 'answered once p2 holds none, though the table still names p1 for pages nobody holds');
});

t.test('without the silence the router waits out the link\'s deadline (what the silence saves)', async (t) => {
  const env = new ManualEnv();
  const asked: string[] = [];
  const router = routerOf(env, table(), { p1: blackHole(env), p2: answering() }, undefined, asked);
  let doneAtMs = -1;
  const write = router.write(0, data).then(() => (doneAtMs = env.clock.monotonicMs()));
  await env.run(peerRequestMsMax + 1_000);
  await write;
  t.equal(doneAtMs, peerRequestMsMax, 'the takeover asked only at the link\'s deadline');
});


t.test('SYNCHRONIZE CACHE: a silent primary whose every page has another in-sync copy is not waited for, its pages\' new primaries are; one holding a page alone fails it at the link\'s deadline', async (t) => {
  const env = new ManualEnv();
  const leases = leasesOf(env, 0);
  await env.run(silentAfterMs + leasePingMs);
  const p1 = blackHole(env);
  const p2 = answering();
  const tb = table();
  for (const page of [1, 2, 3]) tb.learn(page, { owner: 'p1', version: 6, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] });
  let answered = false;
  const flushed = routerOf(env, tb, { p1, p2 }, leases, []).flush().then(() => (answered = true));
  await env.run(10);
  t.notOk(answered, 'not answered while p1, which did not flush, is still the primary of pages');
  for (const page of [0, 1, 2]) tb.learn(page, { ...takenOver, version: 7 });
  await env.run(flushTakeoverRecheckMs);
  t.notOk(answered, 'page 3 still has p1 as primary');
  tb.learn(3, { ...takenOver, version: 7 });
  await env.run(flushTakeoverRecheckMs);
  await flushed;
  t.ok(answered, 'answered once every page of p1 has a new primary (one that flushed)');
  t.equal(p1.sent, 0, 'nothing sent to the silent peer: its pages are durable on p2');
  t.equal(p2.sent, 1, 'p2 flushed');
  // No takeover: the flush fails after failoverWaitMsMax, like a write.
  const stuck = table();
  for (const page of [1, 2]) stuck.learn(page, { owner: 'p1', version: 6, copies: ['p1', 'p2'], inSync: ['p1', 'p2'] });
  let failedAfterMs = -1;
  const startMs = env.clock.monotonicMs();
  const failing = routerOf(env, stuck, { p1: blackHole(env), p2: answering() }, leases, []).flush().catch((err: unknown) => {
    t.type(err, PeerUnavailableError);
    failedAfterMs = env.clock.monotonicMs() - startMs;
  });
  await env.run(failoverWaitMsMax + 10);
  await failing;
  t.equal(failedAfterMs, failoverWaitMsMax, 'no new primary: the flush fails after failoverWaitMsMax');
  // table(): page 1 is p1's alone.
  const lone = blackHole(env);
  const router = routerOf(env, table(), { p1: lone, p2: answering() }, leases, []);
  await failsAtLinkDeadline(t, env, lone, () => router.flush());
});
