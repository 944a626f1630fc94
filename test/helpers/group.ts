// An in-process group of peers (one embedded catalog, real gRPC and iSCSI on loopback), as
// `peersan demo` runs them; stopped and removed by the test's teardown. Faults come from the
// network between the peers (NetworkFaults, wrapped around each peer's transport) and bugs
// from protocol variants (`protocols`, e.g. test/sim/controls), never from switches in src/.

import { balancerDefaults, type BalancerConfig } from '../../src/loadmon/balancer';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import pino from 'pino';
import { EmbeddedMetaStore } from '../../src/cluster/embedded';
import type { PeerCalls, PeerTransport } from '../../src/cluster/transport';
import type { PeerProtocols } from '../../src/server/compose';
import { migrationDefaults, type ClusterConfig, type HostBalanceConfig, type MigrationConfig } from '../../src/server/config';
import { PeerServer, stopGroup } from '../../src/server/peer';
import { freePort } from './processes';

/** A slow network between the peers; the test may change it at any time (read at each request). */
export interface NetworkFaults {
  /** Each forwarded block request (routers, a move's copy, snapshot readers) waits a random 0..this. */
  forwardDelayMs: number;
  /** Each snapshot PREPARE to another peer waits a random 0..this: peers get it (and freeze) at different times. */
  prepareJitterMs: number;
}

/** Random 0..ms, or nothing at 0. */
async function jitter(ms: number): Promise<void> {
  if (ms > 0) await delay(Math.random() * ms);
}

/** The peer transport with `faults` under it. */
function faultyNetwork(inner: PeerTransport, faults: NetworkFaults): PeerTransport {
  return {
    blocks: (peerId) => {
      const sender = inner.blocks(peerId);
      return { send: async (req) => (await jitter(faults.forwardDelayMs), sender.send(req)) };
    },
    calls: (peerId) => {
      const calls = inner.calls(peerId);
      const snapshotPrepare: PeerCalls['snapshotPrepare'] = async (...args) => (await jitter(faults.prepareJitterMs), calls.snapshotPrepare(...args));
      // Every other call as it is (bound: they are the client's methods).
      return new Proxy(calls, { get: (c, name) => (name === 'snapshotPrepare' ? snapshotPrepare : bound(c, name)) });
    },
    close: () => inner.close(),
  };
}

function bound(target: object, name: string | symbol): unknown {
  const v = Reflect.get(target, name);
  return typeof v === 'function' ? v.bind(target) : v;
}

export async function startGroup(
  t: { teardown(fn: () => unknown): void },
  n: number,
  opts: { migration?: Partial<MigrationConfig>; adminToken?: string; hostBalance?: HostBalanceConfig; network?: NetworkFaults; protocols?: Partial<PeerProtocols>; balancer?: Partial<BalancerConfig> } = {},
) {
  const dir = mkdtempSync(join(tmpdir(), 'peersan-group-'));
  const config: ClusterConfig = {
    name: 'group-test', adminToken: opts.adminToken ?? 'admin-token', secret: 'group-secret', catalog: { backend: 'embedded' }, pageBlocks: 8192, migration: { ...migrationDefaults, ...opts.migration },
    peers: [], hostBalance: opts.hostBalance, ...(opts.balancer ? { balancer: { ...balancerDefaults, ...opts.balancer } } : {}),
  };
  for (let i = 1; i <= n; i++) {
    config.peers.push({ id: `p${i}`, iscsi: `127.0.0.1:${await freePort()}`, rpc: `127.0.0.1:${await freePort()}`, http: `127.0.0.1:${await freePort()}`, data: join(dir, `p${i}`) });
  }
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const log = pino({ level: process.env.PEERSAN_TEST_LOG ? 'info' : 'silent' });
  const servers = new Map<string, PeerServer>();
  const start = async (id: string): Promise<PeerServer> => {
    const network = opts.network;
    const s = await PeerServer.start(config, id, log, { meta, protocols: opts.protocols, ...(network ? { transport: (grpc: PeerTransport) => faultyNetwork(grpc, network) } : {}) });
    servers.set(id, s);
    return s;
  };
  // The teardown first: a peer that fails to start must not leave the ones before it running.
  t.teardown(async () => {
    await stopGroup([...servers.values()], 'test teardown');
    await meta.close();
    rmSync(dir, { recursive: true, force: true });
  });
  for (const p of config.peers) await start(p.id);
  const url = (id: string, volume: string): string => `iscsi://${config.peers.find((p) => p.id === id)!.iscsi}/iqn.2026-11.io.peersan:${volume}/0`;
  const http = (id: string): string => `http://${config.peers.find((p) => p.id === id)!.http}`;
  return { dir, config, servers, start, url, http, peer: (id: string) => servers.get(id)! };
}
