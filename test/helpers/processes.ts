// Start and stop real peer processes for tests; every process started here is killed by the
// test's teardown, and every wait is bounded.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const repoRoot = join(__dirname, '..', '..');
export const cliPath = join(repoRoot, 'bin', 'peersan.js');

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
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
  dir: string;
  config: string;
  iscsiPort: number;
  rpcPort: number;
  process: ChildProcess;
  url(volume: string, auth?: string): string;
  cli(...args: string[]): { status: number | null; stdout: string; stderr: string };
  start(): Promise<void>;
  kill(signal?: NodeJS.Signals): Promise<void>;
}

export async function startPeer(teardown: (fn: () => unknown) => void): Promise<TestPeer> {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-test-'));
  const [iscsiPort, rpcPort, httpPort] = [await freePort(), await freePort(), await freePort()];
  const config = join(dir, 'cluster.yaml');
  writeFileSync(config, [
    'cluster:', '  name: test', '  adminToken: test-admin-token', '  secret: test-cluster-secret', '  catalog: { backend: embedded }',
    'peers:', `  - { id: p1, iscsi: 127.0.0.1:${iscsiPort}, rpc: 127.0.0.1:${rpcPort}, http: 127.0.0.1:${httpPort}, data: ./p1 }`, '',
  ].join('\n'));
  const peer: TestPeer = {
    dir, config, iscsiPort, rpcPort,
    process: undefined as unknown as ChildProcess,
    url: (volume, auth) => `iscsi://${auth ? auth + '@' : ''}127.0.0.1:${iscsiPort}/iqn.2026-11.io.peersan:${volume}/0`,
    cli: (...args) => {
      const r = spawnSync(process.execPath, [cliPath, '--config', config, ...args], { encoding: 'utf8', timeout: 30_000 });
      return { status: r.status, stdout: r.stdout, stderr: r.stderr };
    },
    start: async () => {
      peer.process = spawn(process.execPath, [cliPath, 'peer', '--config', config, '--id', 'p1'], { stdio: ['ignore', 'ignore', 'pipe'] });
      peer.process.stderr!.on('data', () => undefined);
      await waitForPort(iscsiPort);
      await waitForPort(rpcPort);
    },
    kill: async (signal = 'SIGTERM') => {
      const p = peer.process;
      if (!p || p.exitCode !== null || p.signalCode !== null) return;
      const exited = new Promise((r) => p.once('exit', r));
      p.kill(signal);
      await Promise.race([exited, new Promise((r) => setTimeout(r, 15_000))]);
      if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    },
  };
  teardown(async () => {
    await peer.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });
  await peer.start();
  return peer;
}
