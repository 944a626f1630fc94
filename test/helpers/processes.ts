// Start and stop real peer processes for tests; every process started here is killed by the
// test's teardown, and every wait is bounded.

import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { appendFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const repoRoot = join(__dirname, '..', '..');
export const cliPath = join(repoRoot, 'bin', 'peersan.js');

/**
 * A port for a test server to listen on. Ports come from below the kernel's ephemeral range
 * (32768-60999 on Linux), which an outgoing connection never takes as its local port: a port
 * picked with listen(0) and closed again could be taken by any connection of any test before
 * the server listens on it (EADDRINUSE in CI). Each test process walks its own stretch of
 * 10000-31999, starting where its pid says; a port is handed out only when this process could
 * claim it (a file named after it in a directory all test processes share, created only if
 * absent: two test files running at once once walked into each other's stretch and both got
 * 29740) and could listen on it. Claims are dropped when the process exits; a claim left by a
 * process that is gone (kill -9) is taken over.
 */
export async function freePort(): Promise<number> {
  for (let tries = 0; tries < 2000; tries++) {
    const port = portsLow + (nextPort++ % portsSpan);
    if (claimPort(port) && await canListen(port)) return port;
  }
  throw new Error('no free port for a test server in 10000-31999');
}

const portsLow = 10_000;
const portsSpan = 22_000;
let nextPort = (process.pid * 97) % portsSpan;
const claimsDir = join(tmpdir(), 'peersan-test-ports');
const claimed: string[] = [];

/** True when this process now holds `port`'s claim file (made, or taken from a dead process). */
function claimPort(port: number): boolean {
  mkdirSync(claimsDir, { recursive: true });
  const file = join(claimsDir, String(port));
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      writeFileSync(file, String(process.pid), { flag: 'wx' });
      if (claimed.length === 0) process.once('exit', dropClaims);
      claimed.push(file);
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      if (holderAlive(file)) return false;
      rmSync(file, { force: true });
    }
  }
  return false;
}

function holderAlive(file: string): boolean {
  let pid: number;
  try { pid = Number(readFileSync(file, 'utf8')); } catch { return false; }
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try { process.kill(pid, 0); return true; } catch (err) { return (err as NodeJS.ErrnoException).code === 'EPERM'; }
}

function dropClaims(): void {
  for (const file of claimed) rmSync(file, { force: true });
}

function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

export async function waitForPort(port: number, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const ok = await new Promise<boolean>((resolve) => {
      const sock = new Socket();
      sock.once('connect', () => {
        sock.destroy();
        resolve(true);
      });
      sock.once('error', () => resolve(false));
      sock.connect(port, '127.0.0.1');
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`port ${port} did not open within ${timeoutMs} ms`);
}

export function hasTool(name: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${name}`]).status === 0;
}

export interface TestPeer {
  id: string;
  dir: string;
  config: string;
  iscsiPort: number;
  rpcPort: number;
  /** The console, /metrics and /healthz. */
  httpPort: number;
  process: ChildProcess;
  /** Settles with the signal that ended the current process (null for a plain exit). */
  exited: Promise<NodeJS.Signals | null>;
  url(volume: string, auth?: string): string;
  cli(...args: string[]): { status: number | null; stdout: string; stderr: string };
  /** The CLI without blocking the event loop (while other clients run from this process). */
  cliAsync(...args: string[]): Promise<{ status: number | null; out: string }>;
  /** Start the process; `env` adds variables (fault injection). */
  start(env?: Record<string, string>): Promise<void>;
  kill(signal?: NodeJS.Signals): Promise<void>;
}

export interface PeerPorts {
  iscsi: number;
  rpc: number;
  http: number;
}

/** Free ports for `count` peers (p1, p2, …), for a test that must know them before the peers start. */
export async function peerPorts(count: number): Promise<PeerPorts[]> {
  const ports: PeerPorts[] = [];
  for (let i = 0; i < count; i++) ports.push({ iscsi: await freePort(), rpc: await freePort(), http: await freePort() });
  return ports;
}

/**
 * How one peer reaches the others and etcd (a TCP proxy per link, test/helpers/tcp-proxy.ts):
 * the RPC address `from` dials for peer `to`, and the etcd endpoint `from` uses.
 */
export interface PeerLinks {
  rpc(from: string, to: string): string;
  etcd(from: string): string;
}

interface GroupYaml {
  etcd?: string;
  clusterYaml?: string[];
  rootYaml?: string[];
}

/** cluster.yaml as peer `self` sees the group (`links` absent: every peer sees the real addresses). */
function groupYaml(opts: GroupYaml, ports: readonly PeerPorts[], self?: string, links?: PeerLinks): string {
  const etcd = links && self ? links.etcd(self) : opts.etcd;
  const catalog = etcd ? `{ backend: etcd, endpoints: [${etcd}] }` : '{ backend: embedded }';
  const rpcOf = (id: string, port: number) => (links && self && id !== self ? links.rpc(self, id) : `127.0.0.1:${port}`);
  return [
    'cluster:', '  name: test', '  adminToken: test-admin-token', '  secret: test-cluster-secret', `  catalog: ${catalog}`, ...(opts.clusterYaml ?? []).map((l) => `  ${l}`),
    // Top-level sections (e.g. `balancer: { enabled: false }`), unindented.
    ...(opts.rootYaml ?? []),
    'peers:', ...ports.map((p, i) => `  - { id: p${i + 1}, iscsi: 127.0.0.1:${p.iscsi}, rpc: ${rpcOf(`p${i + 1}`, p.rpc)}, http: 127.0.0.1:${p.http}, data: ./p${i + 1} }`), '',
  ].join('\n');
}

/**
 * Peer processes of one group (`peersan peer --config … --id pN`), each killed by the
 * teardown. More than one peer needs an etcd endpoint for the shared catalog. With `links`,
 * each peer gets a cluster.yaml of its own (cluster-pN.yaml) naming the addresses it dials.
 */
export async function startPeers(teardown: (fn: () => unknown) => void, opts: GroupYaml & { count?: number; ports?: PeerPorts[]; links?: PeerLinks } = {}): Promise<TestPeer[]> {
  const ports = opts.ports ?? (await peerPorts(opts.count ?? 1));
  const dir = mkdtempSync(join(tmpdir(), 'peersan-test-'));
  const shared = join(dir, 'cluster.yaml');
  writeFileSync(shared, groupYaml(opts, ports));
  const peers = ports.map((p, i): TestPeer => {
    const id = `p${i + 1}`;
    const config = opts.links ? join(dir, `cluster-${id}.yaml`) : shared;
    if (opts.links) writeFileSync(config, groupYaml(opts, ports, id, opts.links));
    return testPeer(id, dir, config, p);
  });
  teardown(async () => {
    await Promise.all(peers.map((p) => p.kill('SIGKILL')));
    rmSync(dir, { recursive: true, force: true });
  });
  await Promise.all(peers.map((p) => p.start()));
  return peers;
}

/** A peer process of a group (not started): `config` is the cluster.yaml it reads. */
function testPeer(id: string, dir: string, config: string, p: PeerPorts): TestPeer {
  const peer: TestPeer = {
    id, dir, config, iscsiPort: p.iscsi, rpcPort: p.rpc, httpPort: p.http,
    process: undefined as unknown as ChildProcess,
    exited: Promise.resolve(null),
    url: (volume, auth) => `iscsi://${auth ? auth + '@' : ''}127.0.0.1:${p.iscsi}/iqn.2026-11.io.peersan:${volume}/0`,
    cli: (...args) => {
      const r = spawnSync(process.execPath, [cliPath, '--config', config, '--peer', `127.0.0.1:${p.rpc}`, ...args], { encoding: 'utf8', timeout: 30_000 });
      return { status: r.status, stdout: r.stdout, stderr: r.stderr };
    },
    cliAsync: async (...args) => {
      const r = await run(process.execPath, [cliPath, '--config', config, '--peer', `127.0.0.1:${p.rpc}`, ...args], 120_000);
      return { status: r.status, out: r.out };
    },
    start: async (env) => {
      peer.process = spawn(process.execPath, [cliPath, 'peer', '--config', config, '--id', id], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } });
      // PEERSAN_TEST_LOG_DIR=dir keeps each peer's log (JSON lines) as dir/<id>.log, for a failure's post-mortem.
      const logDir = process.env.PEERSAN_TEST_LOG_DIR;
      // The end of the log is kept in any case: a peer that does not come up says why in the failure.
      let tail = '';
      peer.process.stderr!.on('data', (d: Buffer) => {
        tail = (tail + d.toString('utf8')).slice(-4096);
        if (logDir) appendFileSync(join(logDir, `${id}.log`), d);
      });
      const proc = peer.process;
      peer.exited = new Promise((r) => proc.once('exit', (_code, signal) => r(signal)));
      try {
        await waitForPort(p.iscsi);
        await waitForPort(p.rpc);
      } catch (err) {
        const state = proc.exitCode !== null || proc.signalCode !== null ? `exited (${proc.exitCode ?? proc.signalCode})` : 'still running';
        throw new Error(`peer ${id} did not come up: ${(err as Error).message}; process ${state}; end of its log:\n${tail.split('\n').slice(-15).join('\n')}`);
      }
    },
    kill: async (signal = 'SIGTERM') => {
      const proc = peer.process;
      if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = peer.exited;
      proc.kill(signal);
      await Promise.race([exited, new Promise((r) => setTimeout(r, 15_000))]);
      if (proc.exitCode === null && proc.signalCode === null) {
        // Wait for the end too: a restart must not find the old process still on its ports.
        proc.kill('SIGKILL');
        await exited;
      }
    },
  };
  return peer;
}

/**
 * A peer joining a running group (DESIGN.md 11): its entry is appended to the group's
 * cluster.yaml (the running peers keep the file as they read it) and a TestPeer for it returned,
 * not started, killed by the teardown.
 */
export async function appendPeer(teardown: (fn: () => unknown) => void, group: readonly TestPeer[]): Promise<TestPeer> {
  const { dir, config } = group[0];
  const id = `p${group.length + 1}`;
  const ports: PeerPorts = { iscsi: await freePort(), rpc: await freePort(), http: await freePort() };
  appendFileSync(config, `  - { id: ${id}, iscsi: 127.0.0.1:${ports.iscsi}, rpc: 127.0.0.1:${ports.rpc}, http: 127.0.0.1:${ports.http}, data: ./${id} }\n`);
  const peer = testPeer(id, dir, config, ports);
  teardown(() => peer.kill('SIGKILL'));
  return peer;
}

export async function startPeer(teardown: (fn: () => unknown) => void): Promise<TestPeer> {
  return (await startPeers(teardown))[0];
}

/** A throwaway etcd on loopback, killed by the teardown. */
export async function startEtcd(teardown: (fn: () => unknown) => void): Promise<{ endpoint: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-etcd-'));
  const [client, peer] = [await freePort(), await freePort()];
  const etcd = spawn('etcd', [
    '--name', 'test', '--data-dir', join(dir, 'data'),
    '--listen-client-urls', `http://127.0.0.1:${client}`, '--advertise-client-urls', `http://127.0.0.1:${client}`,
    '--listen-peer-urls', `http://127.0.0.1:${peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`,
    '--initial-cluster', `test=http://127.0.0.1:${peer}`, '--log-level', 'error',
  ], { stdio: 'ignore' });
  teardown(async () => {
    if (etcd.exitCode === null && etcd.signalCode === null) {
      etcd.kill('SIGKILL');
      await new Promise((r) => etcd.once('exit', r));
    }
    rmSync(dir, { recursive: true, force: true });
  });
  await waitForPort(client);
  return { endpoint: `http://127.0.0.1:${client}` };
}

/** Run a tool without blocking the event loop (peers may live in this process), bounded in time. */
function run(cmd: string, args: string[], timeoutMs: number): Promise<{ status: number | null; out: string; ms: number }> {
  const started = Date.now();
  return new Promise((resolve) => {
    execFile(cmd, args, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      const status = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : null) : 0;
      resolve({ status, out: `${stdout ?? ''}${stderr ?? ''}`, ms: Date.now() - started });
    });
  });
}

/** qemu-io against an iSCSI URL: one command, its output, bounded in time. */
export async function qemuIo(url: string, command: string, timeoutMs = 60_000): Promise<{ ok: boolean; out: string; ms: number }> {
  const r = await run('qemu-io', ['-f', 'raw', '-c', command, url], timeoutMs);
  return { ok: r.status === 0 && !/failed|error|Pattern verification/i.test(r.out), out: r.out, ms: r.ms };
}

/** qemu-io running several commands in one session; its output (one line or two per command). */
export async function qemuIoMany(url: string, commands: string[], timeoutMs = 120_000): Promise<{ status: number | null; out: string }> {
  const r = await run('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), url], timeoutMs);
  return { status: r.status, out: r.out };
}

/** qemu-img with a time bound; throws with its output when it fails. */
export async function qemuImg(args: string[], timeoutMs = 120_000): Promise<string> {
  const r = await run('qemu-img', args, timeoutMs);
  if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.out}`);
  return r.out;
}
