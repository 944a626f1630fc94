// Issue 15 items 5 and 6: peer RPC headers cannot be replayed (method, nonce and time inside
// the MAC), mutual TLS between peers and TLS for admin RPC, and secrets at rest private to
// their owner (0600 files, 0700 folders) with a warning for a config others can read.

import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import * as grpc from '@grpc/grpc-js';
import { Etcd3 } from 'etcd3';
import pino from 'pino';
import { EmbeddedMetaStore } from '../src/cluster/embedded';
import { EtcdMetaStore } from '../src/cluster/etcd';
import { NonceLedger, peerAuthFields, peerAuthMetadata, peerDataMethod, verifyPeerAuth } from '../src/cluster/peer-auth';
import { PeerRpcClient } from '../src/cluster/peer-rpc';
import { loadPeerTls, peerTlsChannel, peerTlsConnectOptions, type PeerTls } from '../src/cluster/peer-tls';
import { createClusterCa, issuePeerCertificate } from '../src/cluster/pki';
import { proto } from '../src/cluster/proto';
import { ensureGroupTls } from '../src/cli/init';
import { peerAuthNoncesMax, peerAuthSkewMsMax } from '../src/limits';
import { BlockOp, ReplyStatus } from '../src/routing/frame';
import { realEnv } from '../src/env/real';
import { PeerLink } from '../src/routing/link';
import { migrationDefaults, parseConfig, type ClusterConfig } from '../src/server/config';
import { PeerServer } from '../src/server/peer';
import { securityWarnings } from '../src/server/security';
import { startGroup } from './helpers/group';
import { cliPath, freePort, hasTool, qemuIo, startPeers, waitForPort } from './helpers/processes';

const silent = pino({ level: 'silent' });
const mode = (path: string): number => statSync(path).mode & 0o777;

/** Every file and folder under `dir` whose mode lets anyone but the owner in. */
function openToOthers(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    if (mode(d) & 0o077) out.push(`${d} ${mode(d).toString(8)}`);
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (mode(p) & 0o077) out.push(`${p} ${mode(p).toString(8)}`);
    }
  };
  walk(dir);
  return out;
}

type AnyClient = grpc.Client & Record<string, (req: object, md: grpc.Metadata, opts: object, cb: (err: grpc.ServiceError | null, reply: unknown) => void) => void>;

/** One raw PeerService call with exactly this metadata: the gRPC status code (0 = OK). */
function rawCall(client: AnyClient, method: string, md: grpc.Metadata): Promise<number> {
  return new Promise((resolve) => client[method]({}, md, { deadline: Date.now() + 5_000 }, (err) => resolve(err ? err.code : 0)));
}

/**
 * Headers as a real peer sends them, captured on the wire: a PeerRpcClient of "p2" calls a
 * stand-in server that records the metadata of each call and answers.
 */
async function captureHeaders(t: { teardown(fn: () => unknown): void }, secret: string): Promise<(method: 'status' | 'moves', clockOffsetMs?: number) => Promise<grpc.Metadata>> {
  const seen: grpc.Metadata[] = [];
  const server = new grpc.Server();
  const record = (reply: object) => (call: grpc.ServerUnaryCall<object, object>, cb: grpc.sendUnaryData<object>): void => {
    seen.push(call.metadata.clone());
    cb(null, reply);
  };
  server.addService((proto().PeerService as grpc.ServiceClientConstructor).service, { status: record({ id: 'p1' }), moves: record({ moves: [] }) });
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
  const client = new PeerRpcClient('p1', `127.0.0.1:${port}`, { secret, self: 'p2' });
  t.teardown(() => {
    client.close();
    server.forceShutdown();
  });
  return async (method, clockOffsetMs = 0) => {
    const realNow = Date.now;
    Date.now = () => realNow() + clockOffsetMs;
    try {
      await (method === 'status' ? client.status(5_000) : client.moves(5_000));
    } finally {
      Date.now = realNow;
    }
    return seen[seen.length - 1];
  };
}

t.test('a captured peer header cannot be replayed, used for another method, or used late', async (t) => {
  const g = await startGroup(t, 2);
  const capture = await captureHeaders(t, 'group-secret');
  const p1 = new (proto().PeerService as grpc.ServiceClientConstructor)(g.config.peers[0].rpc, grpc.credentials.createInsecure()) as AnyClient;
  t.teardown(() => p1.close());

  const header = await capture('status');
  t.equal(await rawCall(p1, 'status', header), grpc.status.OK, 'the header works once, for the call it was made for');
  t.equal(await rawCall(p1, 'status', header), grpc.status.UNAUTHENTICATED, 'the same header again (a replay): refused');

  const forStatus = await capture('status');
  t.equal(await rawCall(p1, 'moves', forStatus), grpc.status.UNAUTHENTICATED, 'a header made for Status, used for Moves: refused');

  // 45 s: past the window (a captured header dies within a minute), well within the old 5 minutes.
  t.ok(peerAuthSkewMsMax < 45_000);
  const late = await capture('status', -45_000);
  t.equal(await rawCall(p1, 'status', late), grpc.status.UNAUTHENTICATED, 'a header 45 s old: refused');

  // The block data stream: one hello at its start, checked the same way (same nonce ledger).
  const read = { op: BlockOp.read, fua: false, volumeId: 'none', lba: 0, blocks: 1, routeVersion: 1, compareBytes: 0 } as const;
  const fixed = peerAuthFields('group-secret', 'p2', peerDataMethod);
  const first = new PeerLink({ peerId: 'p1', env: realEnv(), address: g.config.peers[0].rpc, hello: () => fixed, requestMsMax: 3_000 });
  t.teardown(() => first.close());
  t.equal((await first.send(read)).status !== undefined, true, 'a block stream opens with a fresh hello');
  const replayed = new PeerLink({ peerId: 'p1', env: realEnv(), address: g.config.peers[0].rpc, hello: () => fixed, requestMsMax: 3_000 });
  t.teardown(() => replayed.close());
  await t.rejects(replayed.send(read), /refused: nonce already used/, 'a second stream with the same hello: refused');
  const captured = await capture('status');
  const asHello = { peerId: String(captured.get('x-peersan-peer')[0]), stamp: String(captured.get('x-peersan-stamp')[0]), nonce: String(captured.get('x-peersan-nonce')[0]), mac: String(captured.get('x-peersan-mac')[0]) };
  const crossed = new PeerLink({ peerId: 'p1', env: realEnv(), address: g.config.peers[0].rpc, hello: () => asHello, requestMsMax: 3_000 });
  t.teardown(() => crossed.close());
  await t.rejects(crossed.send(read), /refused: wrong MAC/, 'a header made for a gRPC method, used as a hello: refused');
});

t.test('the nonce ledger: refuses a nonce seen before, forgets it after the window, refuses when full', async (t) => {
  const nonces = new NonceLedger(3);
  const auth = { secret: 's', members: ['p1', 'p2'], nonces };
  const path = '/peersan.PeerService/Status';
  const md = (n: string, now: number): grpc.Metadata => peerAuthMetadata('s', 'p2', path, now, n);
  const nonce = (i: number): string => i.toString(16).padStart(32, '0');
  t.same(verifyPeerAuth(md(nonce(1), 1_000), path, auth, 1_000), { ok: true, peerId: 'p2' });
  t.match(verifyPeerAuth(md(nonce(1), 1_000), path, auth, 1_001), { ok: false, why: /nonce already used/ });
  t.match(verifyPeerAuth(peerAuthMetadata('other-secret', 'p2', path, 1_000, nonce(9)), path, auth, 1_000), { ok: false, why: /wrong MAC/ });
  t.equal(nonces.size, 1, 'a header with a wrong MAC takes no place in the ledger');
  t.same(verifyPeerAuth(md(nonce(2), 1_000), path, auth, 1_000), { ok: true, peerId: 'p2' });
  t.same(verifyPeerAuth(md(nonce(3), 1_000), path, auth, 1_000), { ok: true, peerId: 'p2' });
  t.match(verifyPeerAuth(md(nonce(4), 1_000), path, auth, 1_000), { ok: false, why: /too many calls/ }, 'full: a new call is refused, the ledger does not grow');
  t.equal(nonces.size, 3);
  const later = 1_000 + 2 * peerAuthSkewMsMax + 1;
  t.same(verifyPeerAuth(md(nonce(4), later), path, auth, later), { ok: true, peerId: 'p2' }, 'after the window the old nonces are gone, and so is the room they took');
  t.equal(nonces.size, 1);
  t.ok(peerAuthNoncesMax >= 1024, 'the real ledger has room for the group\'s control traffic');
});

/** A group of `n` peers in this process with `cluster.tls` (certificates made as the demo makes them). */
async function startTlsGroup(t: { teardown(fn: () => unknown): void }, n: number) {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-tls-'));
  const peers = [];
  for (let i = 1; i <= n; i++) peers.push({ id: `p${i}`, iscsi: `127.0.0.1:${await freePort()}`, rpc: `127.0.0.1:${await freePort()}`, http: `127.0.0.1:${await freePort()}`, data: join(dir, `p${i}`) });
  const config: ClusterConfig = {
    name: 'tls-test', adminToken: 'admin-token', secret: 'group-secret', catalog: { backend: 'embedded' }, pageBlocks: 8192, migration: migrationDefaults, peers,
    tls: await ensureGroupTls(dir, { name: 'tls-test', peers }),
  };
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const servers: PeerServer[] = [];
  t.teardown(async () => {
    await Promise.allSettled(servers.map((s) => s.stop()));
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  for (const p of peers) servers.push(await PeerServer.start(config, p.id, silent, { meta }));
  return { dir, config, servers, tlsOf: (id: string): PeerTls => loadPeerTls(config.tls!, id) };
}

const tools = hasTool('qemu-io');

t.test('a group with cluster.tls: forwarding over mutual TLS; strangers refused', async (t) => {
  const g = await startTlsGroup(t, 3);
  const vol = await g.servers[0].admin.createVolume({ name: 'vol', size: '64M' });
  t.same(vol.peers, ['p1', 'p2', 'p3']);
  const record = g.servers[0].core.catalog.require('vol');
  const pageBytes = 8192 * 512;

  await t.test('a host write through p1 to p2\'s page reads back through p3', { skip: tools ? false : 'qemu-io not installed' }, async (t) => {
    const url = (i: number): string => `iscsi://${g.config.peers[i].iscsi}/iqn.2026-11.io.peersan:vol/0`;
    t.ok((await qemuIo(url(0), `write -P 0x5a ${pageBytes} 64k`)).ok, 'written through p1 (page 1 is p2\'s: forwarded)');
    const back = await qemuIo(url(2), `read -P 0x5a ${pageBytes} 64k`);
    t.ok(back.ok, `read back through p3 (forwarded to p2): ${back.out.trim().split('\n')[0]}`);
  });

  const read = { op: BlockOp.read, fua: false, volumeId: record.id, lba: 0, blocks: 1, routeVersion: 1, compareBytes: 0 } as const;
  const p1 = g.config.peers[0].rpc;
  const header = (id: string) => () => peerAuthFields('group-secret', id, peerDataMethod);

  await t.test('a member with its own certificate is served over the block stream', async (t) => {
    const link = new PeerLink({ peerId: 'p1', env: realEnv(), address: p1, hello: header('p2'), tls: peerTlsConnectOptions(g.tlsOf('p2'), 'p1'), requestMsMax: 3_000 });
    t.teardown(() => link.close());
    const reply = await link.send(read);
    t.equal(reply.status, ReplyStatus.ok);
  });

  await t.test('the secret alone is not enough with TLS on', async (t) => {
    const other = await createClusterCa('elsewhere');
    const foreign = await issuePeerCertificate(other, 'p2', ['127.0.0.1']);
    const withForeignCert: PeerTls = { peerId: 'p2', ca: g.tlsOf('p2').ca, cert: Buffer.from(foreign.certPem), key: Buffer.from(foreign.keyPem) };
    const a = new PeerLink({ peerId: 'p1', env: realEnv(), address: p1, hello: header('p2'), tls: peerTlsConnectOptions(withForeignCert, 'p1'), requestMsMax: 3_000 });
    t.teardown(() => a.close());
    const aErr = await a.send(read).then(() => 'served', (e: unknown) => String(e)); t.match(aErr, /refused: no client certificate from the cluster CA/, `a certificate from another CA (right secret): refused (${aErr})`);

    const p3 = g.tlsOf('p3');
    const b = new PeerLink({ peerId: 'p1', env: realEnv(), address: p1, hello: header('p2'), tls: peerTlsConnectOptions(p3, 'p1'), requestMsMax: 3_000 });
    t.teardown(() => b.close());
    await t.rejects(b.send(read), /refused: the TLS client certificate names p3, not p2/, 'p3\'s certificate claiming to be p2: refused');

    const noCert = { ca: g.tlsOf('p2').ca, checkServerIdentity: () => undefined };
    const c = new PeerLink({ peerId: 'p1', env: realEnv(), address: p1, hello: header('p2'), tls: noCert, requestMsMax: 3_000 });
    t.teardown(() => c.close());
    const cErr = await c.send(read).then(() => 'served', (e: unknown) => String(e)); t.match(cErr, /certificate required/, `TLS without a client certificate (right secret): refused (${cErr})`);

    const plain = new PeerLink({ peerId: 'p1', env: realEnv(), address: p1, hello: header('p2'), requestMsMax: 3_000 });
    t.teardown(() => plain.close());
    await t.rejects(plain.send(read), /.+/, 'a plain data stream to a TLS peer: no stream');
  });

  await t.test('a peer that answers with another peer\'s certificate is not trusted', async (t) => {
    // p2 dials p1's address expecting p3 there: the certificate names p1, so the call fails.
    const link = new PeerLink({ peerId: 'p3', env: realEnv(), address: p1, hello: header('p2'), tls: peerTlsConnectOptions(g.tlsOf('p2'), 'p3'), requestMsMax: 3_000 });
    t.teardown(() => link.close());
    await t.rejects(link.send(read), /TLS with .*certificate of "p1", not of p3/);
  });

  await t.test('gRPC on the same port over TLS still answers (PeerService)', async (t) => {
    const rpc = new PeerRpcClient('p1', p1, { secret: 'group-secret', self: 'p2' }, peerTlsChannel(g.tlsOf('p2'), 'p1'));
    t.teardown(() => rpc.close());
    t.equal((await rpc.status(5_000)).id, 'p1');
  });
});

t.test('peersan init, a TLS peer process and the CLI; file modes', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-init-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const made = spawnSync(process.execPath, [cliPath, 'init', '--dir', dir, '--peers', 'p1,p2', '--name', 'inited'], { encoding: 'utf8', timeout: 60_000 });
  t.equal(made.status, 0, made.stderr);
  t.match(made.stdout, /made\s+.*cluster\.yaml/, 'init says what it made');
  t.match(made.stdout, /made\s+.*tls\/ca\.crt/);
  t.same(openToOthers(dir), [], 'everything init made is private (files 0600, folders 0700)');
  const inited = parseConfig(readFileSync(join(dir, 'cluster.yaml'), 'utf8'), join(dir, 'cluster.yaml'));
  t.equal(inited.tls?.ca, join(dir, 'tls/ca.crt'), 'cluster.tls paths resolve against the config folder');
  t.doesNotThrow(() => loadPeerTls(inited.tls!, 'p2'), 'p2 gets a certificate naming it, signed by the CA');
  t.match(spawnSync(process.execPath, [cliPath, 'init', '--dir', dir], { encoding: 'utf8' }).stdout, /kept\s+.*ca\.crt/, 'a second init keeps what exists');
  const added = spawnSync(process.execPath, [cliPath, 'init', '--dir', dir, '--add-peer', 'p7', '--host', 'peer7.example'], { encoding: 'utf8' });
  t.equal(added.status, 0, added.stderr);
  t.doesNotThrow(() => loadPeerTls(inited.tls!, 'p7'), 'init --add-peer adds one peer signed by the same CA');

  // A peer process using those certificates (one peer: p1's files, the embedded catalog).
  const tlsLine = `tls: { ca: "${join(dir, 'tls/ca.crt')}", cert: "${join(dir, 'tls/{peer}.crt')}", key: "${join(dir, 'tls/{peer}.key')}" }`;
  const [peer] = await startPeers(t.teardown.bind(t), { clusterYaml: [tlsLine] });
  const viaConfig = peer.cli('--json', 'status');
  t.equal(viaConfig.status, 0, `the CLI finds the CA through --config: ${viaConfig.stderr}`);
  t.equal(JSON.parse(viaConfig.stdout).peers[0].up, true);
  const base = [cliPath, '--peer', `127.0.0.1:${peer.rpcPort}`, '--token', 'test-admin-token'];
  const withCa = spawnSync(process.execPath, [...base, '--ca', join(dir, 'tls/ca.crt'), 'volume', 'list'], { encoding: 'utf8', timeout: 30_000, cwd: dir + '/tls' });
  t.equal(withCa.status, 0, `--ca: ${withCa.stderr}`);
  t.notMatch(withCa.stderr, /DeprecationWarning/, 'no SNI-with-an-IP warning');
  const envCa = spawnSync(process.execPath, [...base, 'volume', 'list'], { encoding: 'utf8', timeout: 30_000, cwd: dir + '/tls', env: { ...process.env, PEERSAN_CA: join(dir, 'tls/ca.crt') } });
  t.equal(envCa.status, 0, `$PEERSAN_CA: ${envCa.stderr}`);
  const noCa = spawnSync(process.execPath, [...base, 'volume', 'list'], { encoding: 'utf8', timeout: 30_000, cwd: dir + '/tls' });
  t.equal(noCa.status, 1, 'without the CA the CLI cannot talk to a TLS peer');
  t.match(noCa.stderr, /cannot reach peer.*if the group runs TLS, give its CA/, 'and says what to check');
  t.same(openToOthers(join(peer.dir, 'p1')), [], 'the peer process made its data folder and the catalog (CHAP secrets) private');
});

t.test('the demo runs TLS and makes its files private', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-demo-sec-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const ports = [await freePort(), await freePort(), await freePort()];
  const child = spawn(process.execPath, [cliPath, 'demo', '--peers', '1', '--size', '64M', '--data', join(dir, 'demo'), '--iscsi-port', String(ports[0]), '--rpc-port', String(ports[1]), '--http-port', String(ports[2])], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise((r) => child.once('exit', r));
  t.teardown(async () => {
    child.kill('SIGINT');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  const deadline = Date.now() + 60_000;
  while (!/^ready$/m.test(out)) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`demo did not start: ${out}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  await waitForPort(ports[1]);
  t.match(out, /tls: .*ca\.crt/, 'the demo says where its CA is');
  const config = join(dir, 'demo', 'cluster.yaml');
  t.equal(mode(config), 0o600, 'cluster.yaml 0600');
  t.match(readFileSync(config, 'utf8'), /tls:/, 'the demo config names its TLS files');
  t.same(openToOthers(join(dir, 'demo')), [], 'everything in the demo folder is private (config, keys, catalog, stores)');
  const status = spawnSync(process.execPath, [cliPath, '--json', 'status'], { encoding: 'utf8', timeout: 30_000, env: { ...process.env, PEERSAN_CONFIG: config } });
  t.equal(status.status, 0, `the CLI against the TLS demo, as the demo says: ${status.stderr}`);
});

t.test('a config that others can read: one warning at start-up; a private one: none', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-mode-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const lines: string[] = [];
  const sink = new Writable({ write: (chunk: Buffer, _e, cb) => { lines.push(chunk.toString()); cb(); } });
  const log = pino({ level: 'warn' }, sink);
  const start = async (name: string, fileMode: number): Promise<string[]> => {
    const path = join(dir, `${name}.yaml`);
    writeFileSync(path, 'x');
    chmodSync(path, fileMode);
    const config: ClusterConfig = {
      name, adminToken: 't', secret: 's', catalog: { backend: 'embedded' }, pageBlocks: 8192, migration: migrationDefaults, path,
      peers: [{ id: 'p1', iscsi: `127.0.0.1:${await freePort()}`, rpc: `127.0.0.1:${await freePort()}`, http: `127.0.0.1:${await freePort()}`, data: join(dir, name) }],
    };
    lines.length = 0;
    const s = await PeerServer.start(config, 'p1', log);
    await s.stop();
    return lines.map((l) => JSON.parse(l).msg as string);
  };
  const open = await start('open', 0o644);
  t.equal(open.filter((m) => /open\.yaml holds the admin token.*mode 0644.*chmod 600/.test(m)).length, 1, 'a 0644 config: warned once');
  const closed = await start('closed', 0o600);
  t.equal(closed.filter((m) => /holds the admin token/.test(m)).length, 0, 'a 0600 config: no warning');
  t.equal(mode(join(dir, 'closed')), 0o700, 'the data folder is private even without a umask (in-process peers)');
  t.equal(mode(join(dir, 'closed', 'catalog')), 0o700, 'and so is the catalog folder (CHAP secrets)');
  const warnings = securityWarnings({ name: 'x', adminToken: 't', secret: 's', catalog: { backend: 'embedded' }, pageBlocks: 8192, migration: migrationDefaults, peers: [] }, { id: 'p1', iscsi: 'a:1', rpc: 'a:2', http: '10.0.0.1:8001', data: dir }, undefined);
  t.match(warnings, [/no cluster\.tls/, /plain HTTP: its admin token crosses the network/], 'no TLS, a console off loopback: both said');
});

t.test('cluster.catalog takes etcd TLS and a user', async (t) => {
  const c = parseConfig([
    'cluster:', '  name: x', '  adminToken: t', '  secret: s',
    '  catalog: { backend: etcd, endpoints: [10.0.0.1:2379], tls: { ca: etcd/ca.crt, cert: etcd/c.crt, key: etcd/c.key }, user: peersan, password: pw }',
    'peers:', '  - { id: p1, iscsi: 127.0.0.1:3260, rpc: 127.0.0.1:7001, http: 127.0.0.1:8001, data: ./p1 }',
  ].join('\n'), '/etc/peersan/cluster.yaml');
  t.same(c.catalog, { backend: 'etcd', endpoints: ['10.0.0.1:2379'], namespace: undefined, tls: { ca: '/etc/peersan/etcd/ca.crt', cert: '/etc/peersan/etcd/c.crt', key: '/etc/peersan/etcd/c.key' }, user: 'peersan', password: 'pw' });
  t.throws(() => parseConfig('cluster: { name: x, adminToken: t, secret: s, catalog: { backend: etcd, endpoints: [a:1], user: u } }\npeers: [{ id: p1, iscsi: "a:1", rpc: "a:2", http: "a:3", data: d }]'), /user and password go together/);
});

t.test('the etcd catalog over TLS with a client certificate, and with a user and password', { skip: hasTool('etcd') ? false : 'etcd not installed' }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-etcd-tls-'));
  const ca = await createClusterCa('etcd-test');
  const files: Record<string, string> = { 'ca.crt': ca.certPem };
  for (const [name, hosts] of [['etcd', ['127.0.0.1']], ['p1', []]] as const) {
    const made = await issuePeerCertificate(ca, name, hosts);
    files[`${name}.crt`] = made.certPem;
    files[`${name}.key`] = made.keyPem;
  }
  for (const [name, pem] of Object.entries(files)) writeFileSync(join(dir, name), pem, { mode: 0o600 });
  const [client, peer] = [await freePort(), await freePort()];
  const etcd = spawn('etcd', [
    '--name', 'tls', '--data-dir', join(dir, 'data'), '--log-level', 'error',
    '--listen-client-urls', `https://127.0.0.1:${client}`, '--advertise-client-urls', `https://127.0.0.1:${client}`,
    '--listen-peer-urls', `http://127.0.0.1:${peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`, '--initial-cluster', `tls=http://127.0.0.1:${peer}`,
    '--cert-file', join(dir, 'etcd.crt'), '--key-file', join(dir, 'etcd.key'), '--trusted-ca-file', join(dir, 'ca.crt'), '--client-cert-auth',
  ], { stdio: 'ignore' });
  t.teardown(async () => {
    if (etcd.exitCode === null && etcd.signalCode === null) {
      etcd.kill('SIGKILL');
      await new Promise((r) => etcd.once('exit', r));
    }
    rmSync(dir, { recursive: true, force: true });
  });
  await waitForPort(client);
  const endpoints = [`https://127.0.0.1:${client}`];
  const withTls = EtcdMetaStore.fromConfig({ backend: 'etcd', endpoints, tls: { ca: join(dir, 'ca.crt'), cert: join(dir, 'p1.crt'), key: join(dir, 'p1.key') } }, 'peersan/tls-test/');
  t.teardown(() => withTls.close());
  await withTls.put('k', Buffer.from('v'), 0);
  t.equal((await withTls.get('k'))?.value.toString(), 'v', 'the catalog works over TLS with a client certificate');
  const caOnly = new EtcdMetaStore({ endpoints, namespace: 'peersan/tls-test/', dialTimeoutMs: 2_000, tls: { ca: Buffer.from(ca.certPem) } });
  t.teardown(() => caOnly.close());
  await t.rejects(caOnly.get('k'), /.+/, 'without the client certificate etcd refuses');

  // etcd's own users: root with a password, then authentication on; the catalog logs in.
  const admin = new Etcd3({ hosts: endpoints, credentials: { rootCertificate: Buffer.from(ca.certPem), certChain: Buffer.from(files['p1.crt']), privateKey: Buffer.from(files['p1.key']) } });
  t.teardown(() => admin.close());
  await admin.user('root').create('root-pw');
  await admin.role('root').create().catch(() => undefined);
  await admin.user('root').addRole('root');
  await admin.auth.authEnable();
  const withUser = EtcdMetaStore.fromConfig({ backend: 'etcd', endpoints, tls: { ca: join(dir, 'ca.crt'), cert: join(dir, 'p1.crt'), key: join(dir, 'p1.key') }, user: 'root', password: 'root-pw' }, 'peersan/tls-test/');
  t.teardown(() => withUser.close());
  t.equal((await withUser.get('k'))?.value.toString(), 'v', 'with etcd authentication on, the catalog logs in with cluster.catalog.user/password');
  const wrongPw = EtcdMetaStore.fromConfig({ backend: 'etcd', endpoints, tls: { ca: join(dir, 'ca.crt'), cert: join(dir, 'p1.crt'), key: join(dir, 'p1.key') }, user: 'root', password: 'nope' }, 'peersan/tls-test/');
  t.teardown(() => wrongPw.close());
  await t.rejects(wrongPw.get('k'), /.+/, 'a wrong password is refused');
});
