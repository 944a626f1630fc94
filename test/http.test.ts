// The HTTP side of a peer: the pure pieces (event ring, group diffs, the API router with a
// fake admin layer, the metered backend) and then a real 3-peer group on loopback: /healthz,
// 401 on every /api route without the token, JSON errors with the right codes, no secret in
// any answer, the event stream, and /metrics in Prometheus text format moving with qemu-io I/O.

import t from 'tap';
import { consoleEventsMax, httpBodyBytesMax } from '../src/limits';
import { EventLog, groupChanges, snapshotOf, volumeEvents } from '../src/server/events';
import { apiRoutes, features, handleApi, type ApiContext, type ConsoleAdminApi } from '../src/server/http-api';
import { PeerMetrics } from '../src/server/metrics';
import { newRoutingCounters } from '../src/routing/router';
import { NotFoundError } from '../src/errors';
import { startGroup } from './helpers/group';
import { http, parseExposition, readStream, total } from './helpers/http-client';
import { MemoryBackend } from './helpers/memory-backend';
import { hasTool, qemuIo } from './helpers/processes';

const token = 'http-test-token';
const chapSecret = 'Sup3rSecret-99';

t.test('event log: a bounded ring, read after a sequence number, followed by listeners', async (t) => {
  let now = 1000;
  const log = new EventLog(3, () => now++);
  const seen: number[] = [];
  log.subscribe((e) => seen.push(e.seq));
  for (let i = 0; i < 5; i++) log.add('volume-created', `v${i}`);
  t.same(log.since().map((e) => e.message), ['v2', 'v3', 'v4'], 'the oldest fall out');
  t.same(log.since(3).map((e) => e.seq), [4, 5]);
  t.same(log.since(5), []);
  t.same(seen, [1, 2, 3, 4, 5]);
  t.ok(consoleEventsMax >= 16, 'the peer keeps a useful number of events');
});

t.test('group changes: peers down/up and sessions in/out, nothing for a steady group', async (t) => {
  const s = (tsih: number) => ({ tsih, initiatorName: 'iqn.1994-05.com.example:h', targetName: 'iqn.2026-11.io.peersan:v', sessionType: 'Normal' });
  const a = snapshotOf({ peers: [{ id: 'p1', up: true, sessions: [s(1)] }, { id: 'p2', up: true, sessions: [s(7)] }] });
  t.same(groupChanges(a, a), []);
  const b = snapshotOf({ peers: [{ id: 'p1', up: true, sessions: [s(2)] }, { id: 'p2', up: false, sessions: [] }] });
  t.same(groupChanges(a, b).map((c) => `${c.kind} ${c.peer}`).sort(), ['peer-down p2', 'session-login p1', 'session-logout p1'], 'the down peer\'s sessions are not logouts');
  t.same(groupChanges(b, a).map((c) => c.kind).sort(), ['peer-up', 'session-login', 'session-login', 'session-logout']);
});

t.test('volume events: created, resized, access changed, deleted; never a secret', async (t) => {
  const log = new EventLog(16);
  const follow = volumeEvents(log, [], (n) => `${n}B`);
  const v = { id: 'a', sizeBytes: 10, allow: [] as string[] };
  follow('v', v);
  follow('v', { ...v, sizeBytes: 20 });
  follow('v', { ...v, sizeBytes: 20, chap: { user: 'u', secret: chapSecret } } as never);
  follow('v', undefined);
  follow('w', undefined);
  t.same(log.since().map((e) => e.kind), ['volume-created', 'volume-resized', 'volume-access', 'volume-deleted']);
  t.notMatch(JSON.stringify(log.since()), chapSecret);
});

/** An admin layer with only the volume operations (an older peer); `extra` adds optional ones. */
function fakeApi(extra: Partial<ConsoleAdminApi> = {}): ConsoleAdminApi {
  const missing = async (): Promise<never> => {
    throw new NotFoundError('no volume named x');
  };
  return {
    status: async () => ({ cluster: 'c', peers: [] }), createVolume: missing, listVolumes: async () => [], getVolume: missing,
    deleteVolume: missing, resizeVolume: missing, pageMap: missing, ...extra,
  } as ConsoleAdminApi;
}

t.test('API router: optional operations answer 501 until the peer has them, then reach them', async (t) => {
  const ctx = (api: ConsoleAdminApi): ApiContext => ({ api, self: 'p1', events: new EventLog(4), hostIo: () => ({ ops: 0, bytes: 0, readOps: 0, writeOps: 0 }) });
  const bare = ctx(fakeApi());
  const move = await handleApi(bare, { method: 'POST', parts: ['volumes', 'x', 'pages', '3', 'move'], query: new URLSearchParams(), body: { to: 'p2' } });
  t.equal(move.status, 501);
  t.same(move.body, { error: 'moving pages is not available on this peer yet' });
  t.same(Object.values(features(bare.api)).filter(Boolean), [], 'no optional feature on a bare admin layer');
  const calls: unknown[] = [];
  const withMove = ctx(fakeApi({ movePage: async (volume, page, to) => {
    calls.push([volume, page, to]);
    return { volume, volumeId: '00', page, from: 'p1', to, state: 'copying', done: 0, pieces: 16, startedAtMs: 1, bytesCopied: 0, lastError: '' };
  } }));
  t.equal(features(withMove.api).movePage, true);
  const moved = await handleApi(withMove, { method: 'POST', parts: ['volumes', 'x', 'pages', '3', 'move'], query: new URLSearchParams(), body: { to: 'p2' } });
  t.equal(moved.status, 202);
  t.same(calls, [['x', 3, 'p2']]);
  const badPage = await handleApi(withMove, { method: 'POST', parts: ['volumes', 'x', 'pages', '-1', 'move'], query: new URLSearchParams(), body: { to: 'p2' } });
  t.equal(badPage.status, 400);
  t.equal((await handleApi(bare, { method: 'GET', parts: ['volumes', 'x'], query: new URLSearchParams(), body: undefined })).status, 404);
  t.equal((await handleApi(bare, { method: 'PATCH', parts: ['volumes', 'x'], query: new URLSearchParams(), body: undefined })).status, 405);
  t.equal((await handleApi(bare, { method: 'GET', parts: ['nope'], query: new URLSearchParams(), body: undefined })).status, 404);
  const oops = await handleApi(ctx(fakeApi({ listVolumes: async () => { throw new Error('disk on fire'); } })), { method: 'GET', parts: ['volumes'], query: new URLSearchParams(), body: undefined });
  t.equal(oops.status, 500, 'an unexpected error is a 500 with its one line');
  t.ok(oops.err, 'and is handed back for the log');
});

t.test('metered backend: counts operations and bytes per volume and op, errors apart', async (t) => {
  const m = new PeerMetrics({ peer: 'p9', routing: newRoutingCounters(), sessions: () => [], volumeAllocatedBytes: () => new Map() });
  const inner = new MemoryBackend(512, 1024);
  const b = m.meter('v', inner);
  t.equal(b.blockCount, 1024);
  await b.write(0, Buffer.alloc(4096, 1));
  await b.read(0, 8);
  await b.read(0, 8);
  await t.rejects(b.read(2000, 8), 'a failing read still rejects');
  await b.flush();
  const { samples } = parseExposition(await m.text());
  t.equal(total(samples, 'peersan_host_io_total', { volume: 'v', op: 'read', peer: 'p9' }), 2);
  t.equal(total(samples, 'peersan_host_io_total', { volume: 'v', op: 'write' }), 1);
  t.equal(total(samples, 'peersan_host_io_bytes_total', { volume: 'v', op: 'read' }), 8192);
  t.equal(total(samples, 'peersan_host_io_errors_total', { volume: 'v', op: 'read' }), 1);
  t.equal(total(samples, 'peersan_host_io_seconds_count', { volume: 'v', op: 'read' }), 3, 'the failed read is timed too');
  t.same(m.totals, { ops: 4, bytes: 12288, readOps: 2, writeOps: 1 });
  inner.blockCount = 2048;
  t.equal(b.blockCount, 2048, 'a resize shows through');
  m.forgetVolume('v');
  t.equal(total(parseExposition(await m.text()).samples, 'peersan_host_io_total', { volume: 'v' }), 0, 'a deleted volume\'s series go');
});

t.test('exposition checker refuses broken text (so the /metrics check can fail)', async (t) => {
  t.throws(() => parseExposition('foo 1\n'), /without # TYPE/);
  t.throws(() => parseExposition('# TYPE foo counter\nfoo{a="1} 1\n'), /bad/);
  t.throws(() => parseExposition('# TYPE foo counter\nfoo one\n'), /bad/);
  t.throws(() => parseExposition('# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 3\nh_count 2\nh_sum 1\n'), /_count/);
  t.ok(parseExposition('# HELP foo x\n# TYPE foo counter\nfoo{a="q\\"x"} 1.5e3\n').samples.length === 1);
});

t.test('a 3-peer group over HTTP', async (t) => {
  const g = await startGroup(t, 3, { adminToken: token });
  const base = g.http('p1');
  const api = (method: string, path: string, body?: unknown, tok: string | undefined = token) => http(base, method, path, { token: tok, body });

  await t.test('/healthz answers without a token', async (t) => {
    for (const id of ['p1', 'p2', 'p3']) {
      const r = await http(g.http(id), 'GET', '/healthz');
      t.equal(r.status, 200);
      t.equal(r.text, `ok ${id}\n`);
    }
  });

  await t.test('without the right token every /api route and operation is refused with 401', async (t) => {
    const routes = [...apiRoutes(), { method: 'GET', path: '/api/events' }, { method: 'GET', path: '/api/nope' }];
    t.ok(routes.length >= 17, `${routes.length} routes tried`);
    for (const { method, path } of routes) {
      for (const tok of [undefined, '', 'wrong-token', `${token}x`, token.slice(0, -1)]) {
        const r = await http(base, method, path.replace('/volumes/0', '/volumes/sneaky'), { token: tok, body: method === 'GET' ? undefined : { name: 'sneaky', size: '8M', to: 'p2', enabled: true } });
        if (r.status !== 401) t.fail(`${method} ${path} with token ${JSON.stringify(tok)} answered ${r.status}`);
        t.match(r.json(), { error: /admin token/ });
        t.equal(r.headers['www-authenticate'], 'Bearer');
      }
    }
    t.same((await g.peer('p1').admin.listVolumes()).map((v) => v.name), [], 'nothing was created');
    const page = await http(base, 'GET', '/');
    t.equal(page.status, 200, 'the page itself (no data) loads without the token');
    t.match(page.text, /<title>peersan console<\/title>/);
    t.match(page.headers['content-security-policy'], /default-src 'self'/);
  });

  await t.test('operations with the token; errors are one JSON line with the right status', async (t) => {
    const created = await api('POST', '/api/volumes', { name: 'vol', size: '48M', allow: [], chap: { user: 'host', secret: chapSecret } });
    t.equal(created.status, 201, created.text);
    t.match(created.json(), { name: 'vol', sizeBytes: 48 * 1024 * 1024, chapEnabled: true, chapUser: 'host', peers: ['p1', 'p2', 'p3'] });
    const cases: [string, string, unknown, number, RegExp][] = [
      ['POST', '/api/volumes', { name: 'vol', size: '8M' }, 409, /already exists/],
      ['POST', '/api/volumes', { name: 'x2' }, 400, /size is required/],
      ['POST', '/api/volumes', { name: 'Bad Name', size: '8M' }, 400, /./],
      ['POST', '/api/volumes', { name: 'x3', size: '8M', chap: { user: 'u', secret: 'short' } }, 400, /CHAP secret must be 12 to 16 characters/],
      ['POST', '/api/volumes', { name: 'x4', size: '8M', chap: { user: 'u' } }, 400, /go together/],
      ['POST', '/api/volumes', { name: 'x5', size: '8M', allow: 'iqn' }, 400, /list of strings/],
      ['POST', '/api/volumes', [1, 2], 400, /JSON object/],
      ['POST', '/api/volumes/vol/resize', { size: '8M' }, 400, /shrinking is not supported/],
      ['GET', '/api/volumes/nope', undefined, 404, /no volume named nope/],
      ['GET', '/api/volumes/nope/pagemap', undefined, 404, /no volume named nope/],
      ['DELETE', '/api/volumes/nope', undefined, 404, /no volume named nope/],
      ['PATCH', '/api/volumes/vol', undefined, 405, /not allowed/],
      ['GET', '/api/volumes/nope/heat', undefined, 404, /no volume named nope/],
      ['PUT', '/api/rebalancing', { enabled: 'yes' }, 400, /./],
      ['POST', '/api/volumes/nope/snapshots', {}, 404, /no volume named nope/],
      ['GET', '/api/whatever', undefined, 404, /no API route/],
      ['PUT', '/api/volumes/vol/replicas', { replicas: 4 }, 400, /replicas must be 1 to 3, got 4/],
      ['PUT', '/api/volumes/vol/replicas', {}, 400, /replicas is required/],
      ['POST', '/api/volumes', { name: 'x6', size: '8M', replicas: 'two' }, 400, /replicas must be a whole number/],
    ];
    for (const [method, path, body, status, message] of cases) {
      const r = await api(method, path, body);
      t.equal(r.status, status, `${method} ${path} → ${status}`);
      t.match(r.json(), { error: message });
      t.equal(Object.keys(r.json()).length, 1, 'just {error}');
    }
    const badJson = await http(base, 'POST', '/api/volumes', { token, raw: '{"name":' });
    t.equal(badJson.status, 400);
    t.match(badJson.json(), { error: /not valid JSON/ });
    const huge = await http(base, 'POST', '/api/volumes', { token, raw: JSON.stringify({ name: 'big', size: '8M', allow: ['x'.repeat(httpBodyBytesMax)] }) });
    t.equal(huge.status, 413);
    const replicated = await api('PUT', '/api/volumes/vol/replicas', { replicas: 2 });
    t.match(replicated.json(), { name: 'vol', replicas: 2, protection: /^(healthy|rebuilding|degraded)$/ }, 'copies asked through the console API');
    const resized = await api('POST', '/api/volumes/vol/resize', { size: '64M' });
    t.equal(resized.json().sizeBytes, 64 * 1024 * 1024);
    const host = 'iqn.1994-05.com.example:db1';
    const access = await api('PUT', '/api/volumes/vol/access', { allow: [host], chap: { user: 'other', secret: 'An0ther-Secret' } });
    t.equal(access.status, 200, access.text);
    t.match(access.json(), { allow: [host], chapEnabled: true, chapUser: 'other' });
    t.notMatch(access.text, 'An0ther-Secret');
    t.same(g.peer('p2').core.targets.visibleTo(host).map((x) => x.name), ['iqn.2026-11.io.peersan:vol'], 'another peer\'s portal follows the new allow list');
    t.same(g.peer('p2').core.targets.visibleTo('iqn.1994-05.com.example:stranger'), []);
    t.match((await api('PUT', '/api/volumes/vol/access', { allow: ['not-an-iqn'] })).json(), { error: /is not an iSCSI name/ });
    t.match((await api('PUT', '/api/volumes/vol/access', { allow: [], chap: { user: 'u', secret: 'short' } })).json(), { error: /CHAP secret must be 12 to 16/ });
    t.match((await api('PUT', '/api/volumes/vol/access', { allow: [] })).json(), { allow: [], chapEnabled: true, chapUser: 'other' }, 'CHAP kept when not given');
    t.match((await api('PUT', '/api/volumes/vol/access', { allow: [], chap: null })).json(), { chapEnabled: false }, 'chap null turns it off');
    const map = (await http(g.http('p3'), 'GET', '/api/volumes/vol/pagemap', { token })).json();
    t.equal(map.pages.length, 16, 'every peer answers for the group');
  });

  await t.test('no answer carries a secret', async (t) => {
    const answers = await Promise.all(['/api/volumes', '/api/volumes/vol', '/api/status', '/api/events/recent'].map((p) => api('GET', p)));
    answers.push(await http(base, 'GET', '/metrics'));
    for (const a of answers) {
      t.equal(a.status, 200);
      t.notMatch(a.text, chapSecret);
      t.notMatch(a.text, 'An0ther-Secret');
      t.notMatch(a.text, 'group-secret');
      t.notMatch(a.text, token);
    }
  });

  await t.test('the event stream sends the state, then events as they happen', async (t) => {
    const frames = readStream(base, token, (f) => f.some((x) => x.event === 'event' && x.data.message.includes('streamed')));
    await new Promise((r) => setTimeout(r, 300));
    await api('POST', '/api/volumes', { name: 'streamed', size: '8M' });
    const got = await frames;
    const state = got.find((f) => f.event === 'state');
    t.ok(state, 'a state frame');
    t.same(state!.data.peers.map((p: { id: string; up: boolean }) => `${p.id}:${p.up}`), ['p1:true', 'p2:true', 'p3:true']);
    t.equal(state!.data.features.movePage, true);
    t.equal(state!.data.features.setVolumeAccess, true);
    t.ok(got.some((f) => f.event === 'event' && f.data.kind === 'volume-created' && f.data.volume === 'vol'), 'the earlier events replayed');
    // p2 learns of the volume through its catalog watch: give it a moment (bounded).
    let recent: { message: string }[] = [];
    for (let i = 0; i < 50 && !recent.some((e) => /^volume streamed created/.test(e.message)); i++) {
      recent = (await http(g.http('p2'), 'GET', '/api/events/recent', { token })).json().events;
      await new Promise((r) => setTimeout(r, 100));
    }
    t.ok(recent.some((e) => /^volume streamed created \(8\.0+ MiB\)$/.test(e.message)), `other peers saw it too (the catalog watch): ${recent.map((e) => e.message).join('; ')}`);
  });

  const tools = hasTool('qemu-io');
  await t.test('/metrics parses as Prometheus text and its counters move with I/O', { skip: tools ? false : 'qemu-io not installed' }, async (t) => {
    await api('POST', '/api/volumes', { name: 'io', size: '32M' });
    const scrape = async () => parseExposition((await http(base, 'GET', '/metrics')).text).samples;
    const before = await scrape();
    const w = await qemuIo(g.url('p1', 'io'), 'write -P 0x3a 0 8M');
    t.ok(w.ok, w.out);
    const r = await qemuIo(g.url('p1', 'io'), 'read -P 0x3a 0 8M');
    t.ok(r.ok, r.out);
    // Reads inside p2's page, each forwarded whole: received into a reused buffer from the second on.
    for (const at of ['4M', '5M']) {
      const one = await qemuIo(g.url('p1', 'io'), `read -P 0x3a ${at} 256k`);
      t.ok(one.ok, one.out);
    }
    const res = await http(base, 'GET', '/metrics');
    t.match(res.headers['content-type'], /^text\/plain; version=0\.0\.4/);
    const after = parseExposition(res.text).samples;
    const delta = (name: string, match: Record<string, string>) => total(after, name, match) - total(before, name, match);
    t.ok(delta('peersan_host_io_total', { volume: 'io', op: 'write', peer: 'p1' }) >= 1, 'write operations counted');
    t.equal(delta('peersan_host_io_bytes_total', { volume: 'io', op: 'write' }), 8 * 1024 * 1024, 'every written byte counted once');
    t.ok(delta('peersan_host_io_bytes_total', { volume: 'io', op: 'read' }) >= 8 * 1024 * 1024, 'read bytes counted');
    t.ok(delta('peersan_host_io_seconds_count', { volume: 'io', op: 'read' }) >= 1, 'latency observed');
    // 8 MiB over pages of 4 MiB on p1, p2: one page is p1's own, one is forwarded.
    t.ok(delta('peersan_routed_runs_total', { path: 'local' }) >= 1, 'local runs');
    t.ok(delta('peersan_routed_runs_total', { path: 'forwarded' }) >= 1, 'forwarded runs');
    t.ok(delta('peersan_read_buffers_total', { event: 'given_back' }) >= 2, 'the forwarded reads\' buffers given back once sent');
    t.ok(delta('peersan_read_buffers_total', { event: 'reused' }) >= 1, 'and reused');
    t.same(['batch', 'write', 'refused'].map((event) => after.some((s) => s.name === 'peersan_store_write_threads_total' && s.labels.event === event)), [true, true, true], 'the write threads\' counters are exposed');
    t.ok(delta('peersan_store_inline_writes_total', { event: 'write' }) >= 1, 'small writes written inline');
    t.same(['run', 'slow'].map((event) => after.some((s) => s.name === 'peersan_store_inline_writes_total' && s.labels.event === event)), [true, true], 'and their other counters exposed');
    t.ok(total(after, 'peersan_volume_allocated_bytes', { volume: 'io' }) >= 4 * 1024 * 1024, 'p1 holds its page');
    t.equal(total(after, 'peersan_sessions', { type: 'normal' }), 0, 'qemu-io logged out');
    const p2 = parseExposition((await http(g.http('p2'), 'GET', '/metrics')).text).samples;
    t.equal(total(p2, 'peersan_host_io_total', { volume: 'io' }), 0, 'p2 received no host I/O (it only served forwarded runs)');
    t.ok(p2.every((s) => s.labels.peer === 'p2'), 'each peer its own registry');
  });

  await t.test('deleting through the API frees the name; the peer stops its HTTP server on stop', async (t) => {
    t.equal((await api('DELETE', '/api/volumes/streamed')).status, 200);
    t.equal((await api('GET', '/api/volumes/streamed')).status, 404);
    await g.peer('p3').stop();
    await t.rejects(http(g.http('p3'), 'GET', '/healthz', { timeoutMs: 3000 }), 'p3 no longer answers');
    const frames = await readStream(base, token, (f) => f.some((x) => x.event === 'state' && x.data.peers.some((p: { id: string; up: boolean }) => p.id === 'p3' && !p.up)), 30_000);
    t.ok(frames.length > 0, 'p1 reports p3 down');
  });
});
