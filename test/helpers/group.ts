// An in-process group of peers (one embedded catalog, real gRPC, iSCSI and HTTP on loopback)
// for tests; every peer and the catalog are stopped by the test's teardown.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { EmbeddedMetaStore } from '../../src/cluster/embedded';
import type { ClusterConfig } from '../../src/server/config';
import { PeerServer } from '../../src/server/peer';
import { freePort } from './processes';

export async function startGroup(teardown: (fn: () => unknown) => void, n: number, adminToken = 'admin-token') {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-http-'));
  const config: ClusterConfig = { name: 'http-test', adminToken, secret: 'group-secret', catalog: { backend: 'embedded' }, pageBlocks: 8192, peers: [] };
  for (let i = 1; i <= n; i++) {
    config.peers.push({ id: `p${i}`, iscsi: `127.0.0.1:${await freePort()}`, rpc: `127.0.0.1:${await freePort()}`, http: `127.0.0.1:${await freePort()}`, data: join(dir, `p${i}`) });
  }
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const servers: PeerServer[] = [];
  teardown(async () => {
    await Promise.allSettled(servers.map((s) => s.stop()));
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  for (const p of config.peers) servers.push(await PeerServer.start(config, p.id, pino({ level: 'silent' }), { meta }));
  const peer = (id: string): PeerServer => servers.find((s) => s.peer.id === id)!;
  return {
    config, servers, peer,
    http: (id: string): string => `http://${config.peers.find((p) => p.id === id)!.http}`,
    url: (id: string, volume: string): string => `iscsi://${config.peers.find((p) => p.id === id)!.iscsi}/iqn.2026-11.io.peersan:${volume}/0`,
  };
}
