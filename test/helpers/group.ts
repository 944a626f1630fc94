// An in-process group of peers (one embedded catalog, real gRPC and iSCSI on loopback), as
// `peersan demo` runs them; stopped and removed by the test's teardown.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { EmbeddedMetaStore } from '../../src/cluster/embedded';
import { migrationDefaults, type ClusterConfig, type HostBalanceConfig, type MigrationConfig } from '../../src/server/config';
import { PeerServer } from '../../src/server/peer';
import { freePort } from './processes';

export async function startGroup(t: { teardown(fn: () => unknown): void }, n: number, opts: { migration?: Partial<MigrationConfig>; adminToken?: string; hostBalance?: HostBalanceConfig } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-group-'));
  const config: ClusterConfig = {
    name: 'group-test', adminToken: opts.adminToken ?? 'admin-token', secret: 'group-secret', catalog: { backend: 'embedded' }, pageBlocks: 8192, migration: { ...migrationDefaults, ...opts.migration },
    peers: [], hostBalance: opts.hostBalance,
  };
  for (let i = 1; i <= n; i++) {
    config.peers.push({ id: `p${i}`, iscsi: `127.0.0.1:${await freePort()}`, rpc: `127.0.0.1:${await freePort()}`, http: `127.0.0.1:${await freePort()}`, data: join(dir, `p${i}`) });
  }
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const log = pino({ level: process.env.PEERSAN_TEST_LOG ? 'info' : 'silent' });
  const servers = new Map<string, PeerServer>();
  const start = async (id: string): Promise<PeerServer> => {
    const s = await PeerServer.start(config, id, log, { meta });
    servers.set(id, s);
    return s;
  };
  for (const p of config.peers) await start(p.id);
  t.teardown(async () => {
    await Promise.allSettled([...servers.values()].map((s) => s.stop()));
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const url = (id: string, volume: string): string => `iscsi://${config.peers.find((p) => p.id === id)!.iscsi}/iqn.2026-11.io.peersan:${volume}/0`;
  const http = (id: string): string => `http://${config.peers.find((p) => p.id === id)!.http}`;
  return { dir, config, servers, start, url, http, peer: (id: string) => servers.get(id)! };
}
