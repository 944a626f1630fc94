// Numbers on the admin path (issue 15 item 9): a page number the wire's uint32 cannot carry,
// or one not written as decimal digits, is refused where it enters (the CLI, the AdminClient,
// the console's JSON API) with one clear line, and nothing moves. Before the fix
// `page move demo 4294967297 --to p3` moved page 1 (the uint32 field truncated it) and "1e3"
// was page 1000.

import t from 'tap';
import { execFile } from 'node:child_process';
import { Agent, request, type ClientRequest } from 'node:http';
import { Writable } from 'node:stream';
import pino from 'pino';
import { peerAuthFields, peerDataMethod } from '../src/cluster/peer-auth';
import { PeerAuthenticator } from '../src/cluster/peer-rpc';
import { dialDataStream, RpcListener } from '../src/routing/data-stream';
import { InvalidArgumentError, PeerUnavailableError } from '../src/errors';
import { AdminClient } from '../src/server/admin';
import { pageNumber, wholeNumber } from '../src/server/admin-input';
import { EventLog } from '../src/server/events';
import { handleApi, type ConsoleAdminApi } from '../src/server/http-api';
import { HttpConsole } from '../src/server/http';
import { consoleStreamClientsMax } from '../src/limits';
import type { PeerMetrics } from '../src/server/metrics';
import { startGroup } from './helpers/group';
import { cliPath, freePort } from './helpers/processes';

const badPages = ['4294967297', '4294967296', '1e3', '-1', '1.5', '0x10', '', ' 1', '1 ', '+1', '99999999999999999999'];

t.test('the parsers take decimal digits in range and nothing else', async (t) => {
  for (const s of badPages) t.throws(() => pageNumber(s), InvalidArgumentError, `page "${s}" refused`);
  t.equal(pageNumber('0'), 0);
  t.equal(pageNumber('4294967295'), 4294967295);
  t.equal(wholeNumber('7', 'n', 10, 1), 7);
  t.throws(() => wholeNumber('0', 'n', 10, 1), /n must be a whole number from 1 to 10, got "0"/);
});

t.test('the console API refuses bad page numbers and block sizes with 400, before any call', async (t) => {
  const calls: string[] = [];
  const api = {
    movePage: async (volume: string, page: number) => {
      calls.push(`move ${volume} ${page}`);
      return {};
    },
    createVolume: async (input: { blockBytes?: number }) => {
      calls.push(`create ${input.blockBytes}`);
      return {};
    },
  } as unknown as ConsoleAdminApi;
  const ctx = { api, self: 'p1', events: new EventLog(4), hostIo: () => ({ ops: 0, bytes: 0, readOps: 0, writeOps: 0 }) } as never;
  for (const page of badPages.filter((p) => p !== '')) {
    const r = await handleApi(ctx, { method: 'POST', parts: ['volumes', 'demo', 'pages', page, 'move'], query: new URLSearchParams(), body: { to: 'p3' } });
    t.equal(r.status, 400, `page "${page}": 400`);
    t.match(r.body, { error: /page must be a whole number/ });
  }
  for (const blockBytes of ['0x200', '5e2', '512.0', -512, 1.5, 2 ** 32 + 512, true]) {
    const r = await handleApi(ctx, { method: 'POST', parts: ['volumes'], query: new URLSearchParams(), body: { name: 'v', size: '1G', blockBytes } });
    t.equal(r.status, 400, `blockBytes ${JSON.stringify(blockBytes)}: 400`);
  }
  t.same(calls, [], 'the admin API was never called');
  const good = await handleApi(ctx, { method: 'POST', parts: ['volumes', 'demo', 'pages', '2', 'move'], query: new URLSearchParams(), body: { to: 'p3' } });
  t.equal(good.status, 202);
  t.same(calls, ['move demo 2']);
});

function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cliPath, ...args], { encoding: 'utf8', timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

t.test('the CLI and the AdminClient refuse page numbers the wire cannot carry; nothing moves', async (t) => {
  const g = await startGroup(t, 3);
  await g.peer('p1').admin.createVolume({ name: 'demo', size: '48M' });
  const rpc = g.config.peers[0].rpc;
  const owners = async (): Promise<string[]> => (await g.peer('p1').admin.pageMap('demo')).pages.map((p) => `${p.owner} v${p.version}`);
  const before = await owners();
  t.equal(before[1], 'p2 v1', 'page 1 starts on p2');

  for (const page of ['4294967297', '1e3', '-1', '1.5', '0x10']) {
    const r = await cli(['--peer', rpc, '--token', 'admin-token', 'page', 'move', 'demo', page, '--to', 'p3']);
    t.equal(r.code, 1, `CLI page "${page}": exit 1`);
    t.equal(r.stderr.trim().split('\n').length, 1, `CLI page "${page}": one line`);
    t.match(r.stderr, /^peersan: page must be a whole number from 0 to 4294967295/, `CLI page "${page}": says why`);
  }
  const cancel = await cli(['--peer', rpc, '--token', 'admin-token', 'page', 'move', 'demo', '4294967297', '--cancel']);
  t.equal(cancel.code, 1, 'CLI --cancel of page 4294967297: exit 1');

  const client = new AdminClient(rpc, 'admin-token');
  t.teardown(() => client.close());
  for (const page of [4294967297, 2 ** 32, -1, 1.5, Number.NaN]) {
    await t.rejects(client.movePage('demo', page, 'p3'), InvalidArgumentError, `AdminClient movePage(${page}) refused`);
    await t.rejects(client.cancelMove('demo', page), InvalidArgumentError, `AdminClient cancelMove(${page}) refused`);
  }
  await t.rejects(client.movePage('demo', 1000, 'p3'), /has pages 0 to 11, not 1000/, 'a page beyond the volume is refused by its owner');
  t.equal(g.peer('p2').core.migrator.list().length, 0, 'no move was started');
  t.same(await owners(), before, 'the page map did not change');
});

// ---- log floods (issue 15 item 10) ----------------------------------------------------------

/** A pino logger whose lines land in `lines` (raw JSON text). */
function captureLog(): { log: pino.Logger; lines: string[] } {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(...chunk.toString().split('\n').filter(Boolean));
      cb();
    },
  });
  return { log: pino({ level: 'info' }, sink), lines };
}

/** A console with no volumes behind it (admin token 'tok'), logging into `lines`; closed at the test's end. */
async function quietConsole(t: { teardown(fn: () => unknown): void }): Promise<{ port: number; lines: string[] }> {
  const { log, lines } = captureLog();
  const api = { status: async () => ({ cluster: 'c', peers: [] }), listVolumes: async () => [] } as unknown as ConsoleAdminApi;
  const metrics = { totals: { ops: 0, bytes: 0, readOps: 0, writeOps: 0 }, text: async () => '', contentType: 'text/plain' } as unknown as PeerMetrics;
  const port = await freePort();
  const console_ = await HttpConsole.start({ address: `127.0.0.1:${port}`, self: 'p1', adminToken: 'tok', api, events: new EventLog(4), metrics, log });
  t.teardown(() => console_.close());
  return { port, lines };
}

t.test('thousands of refused console requests log a bounded number of lines, without stacks', async (t) => {
  const { port, lines } = await quietConsole(t);
  const agent = new Agent({ keepAlive: true, maxSockets: 8 });
  t.teardown(() => agent.destroy());
  const get = (path: string, token: string): Promise<number> => new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, agent, headers: { Authorization: `Bearer ${token}` }, timeout: 10_000 }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    req.end();
  });
  // Fill the stream slots (their own sockets, kept open), then knock on the full door.
  const open: ClientRequest[] = [];
  t.teardown(() => open.forEach((r) => r.destroy()));
  for (let i = 0; i < consoleStreamClientsMax; i++) {
    await new Promise<void>((resolve) => {
      const req = request({ host: '127.0.0.1', port, path: '/api/events', headers: { Authorization: 'Bearer tok' } }, (res) => {
        t.equal(res.statusCode, 200);
        res.resume();
        resolve();
      });
      req.end();
      open.push(req);
    });
  }
  const refused = 2_000;
  const statuses = new Map<number, number>();
  for (let i = 0; i < refused; i += 8) {
    const batch = await Promise.all(Array.from({ length: 8 }, (_, k) => get('/api/events', (i + k) % 4 === 0 ? 'wrong' : 'tok')));
    for (const s of batch) statuses.set(s, (statuses.get(s) ?? 0) + 1);
  }
  t.equal(statuses.get(503), refused * 3 / 4, 'streams over the limit answered 503');
  t.equal(statuses.get(401), refused / 4, 'wrong tokens answered 401');
  t.ok(lines.length <= 5, `${lines.length} log lines for ${refused} refusals`);
  t.notOk(lines.some((l) => /"stack"|\n\s+at /.test(l)), 'no stack traces');
  t.ok(lines.some((l) => /too many console streams/.test(l)), 'the refusal is logged once, by its message');
});

t.test('block streams refused for want of peer authentication log a bounded number of lines', async (t) => {
  const { log, lines } = captureLog();
  const authenticator = new PeerAuthenticator({ secret: 'group-secret', members: ['p1', 'p2'], self: 'p1', tls: false }, log);
  const listener = new RpcListener({ authenticate: authenticator.hello, serve: ({ socket }) => socket.destroy(), other: (socket) => socket.destroy(), log });
  await listener.listen('127.0.0.1', 0, '127.0.0.1:0');
  t.teardown(() => listener.destroy());
  const refused = 100;
  let unauthenticated = 0;
  for (let i = 0; i < refused; i++) {
    const err = await dialDataStream({ peerId: 'p1', address: `127.0.0.1:${listener.port}`, hello: () => peerAuthFields('not-the-secret', 'p2', peerDataMethod), timeoutMs: 2_000 }).then(
      (d) => void d.socket.destroy(),
      (e: unknown) => e,
    );
    if (err instanceof PeerUnavailableError && /refused: wrong MAC/.test(err.message)) unauthenticated++;
  }
  t.equal(unauthenticated, refused, 'every stream refused');
  const refusals = lines.filter((l) => /refused a peer call/.test(l));
  t.ok(refusals.length >= 1 && refusals.length <= 2, `${refusals.length} log lines for ${refused} refusals`);
});

t.test('clients that go away mid-request are not logged as failures', async (t) => {
  const { port, lines } = await quietConsole(t);
  const { connect } = await import('node:net');
  for (let i = 0; i < 50; i++) {
    // A body announced as 100 bytes, 10 sent, then the socket closed.
    await new Promise<void>((resolve) => {
      const s = connect(port, '127.0.0.1', () => {
        s.write(`POST /api/rebalancing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"dryRun":`);
        setTimeout(() => s.destroy(), 20);
      });
      s.on('close', () => resolve());
      s.on('error', () => undefined);
    });
  }
  await new Promise((r) => setTimeout(r, 200));
  t.same(lines.filter((l) => /"level":(40|50)/.test(l)), [], 'no warning or error for 50 clients that went away');
});
