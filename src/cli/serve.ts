// What `peersan peer` and `peersan demo` run: one peer, or a throwaway group in one process,
// until SIGINT/SIGTERM. Kept apart from the admin commands (main.ts loads this module only
// for those two), so that `peersan status` and friends do not load the whole server.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { formatBytes } from '../cluster/catalog';
import { EmbeddedMetaStore } from '../cluster/embedded';
import { InvalidArgumentError } from '../errors';
import { pageBlocks } from '../limits';
import { createLogger } from '../log';
import { migrationDefaults, renderConfig, type ClusterConfig } from '../server/config';
import { PeerServer, stopGroup } from '../server/peer';
import { tuneHeapForServing } from '../server/runtime';
import { makePrivateDir, writePrivateFile } from '../server/security';
import { ensureGroupTls } from './init';
import { parseCount } from './args';

export interface DemoOptions {
  peers: string;
  data?: string;
  size: string;
  iscsiPort: string;
  rpcPort: string;
  httpPort: string;
  token?: string;
}

/** `peersan peer`: run peer `id` of the group until a signal. */
export async function runPeer(config: ClusterConfig, id: string): Promise<void> {
  keepOutputPrivate();
  tuneHeapForServing();
  const server = await PeerServer.start(config, id, createLogger({ name: 'peersan' }));
  await runUntilSignal([server]);
  exitSoon();
}

/**
 * Stopped: the process ends now, not once a call to another peer in flight at the stop reaches
 * its deadline (seconds, in a rolling restart's critical path). A moment is left for the log's
 * last lines to be written; the timer keeps nothing alive.
 */
function exitSoon(): void {
  setTimeout(() => process.exit(), 100).unref();
}

/**
 * Everything a serving process creates is its user's alone (files 0600, folders 0700): the
 * catalog's LevelDB holds CHAP secrets, the store holds the hosts' data, the log names hosts.
 */
function keepOutputPrivate(): void {
  process.umask(0o077);
}

/**
 * Run the peers of this process until SIGINT/SIGTERM, or until one is asked to stop (`peersan
 * peer stop`, or removed from the group); then stop them gracefully. One peer leaves (its roles
 * handed to the others); a whole demo group stops without handing roles around (stopGroup).
 */
async function runUntilSignal(servers: PeerServer[]): Promise<void> {
  const running = new Set(servers);
  await new Promise<void>((resolveStop) => {
    const onSignal = (sig: string): void => {
      servers[0].log.info({ signal: sig }, 'stopping');
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      const all = [...running];
      running.clear();
      void stopGroup(all, `${all.map((s) => s.peer.id).join(', ')} (${sig})`).then(() => resolveStop());
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    for (const s of servers) {
      void s.stopRequested.then(async () => {
        if (!running.delete(s)) return;
        await s.stop(`${s.peer.id} (asked to stop)`);
        if (running.size > 0) return;
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
        resolveStop();
      });
    }
  });
}

export async function demo(opts: DemoOptions): Promise<void> {
  const peers = parseCount(opts.peers, '--peers');
  if (peers > 16) throw new InvalidArgumentError('--peers: the demo runs at most 16 peers in one process');
  keepOutputPrivate();
  // Without --data the demo's folder is its own, made here and removed when it stops.
  const throwaway = opts.data === undefined;
  const dir = resolve(opts.data ?? mkdtempSync(join(tmpdir(), 'peersan-demo-')));
  const removeThrowaway = (): void => {
    if (throwaway) rmSync(dir, { recursive: true, force: true });
  };
  makePrivateDir(dir);
  tuneHeapForServing();
  const iscsiPort = parseCount(opts.iscsiPort, '--iscsi-port');
  const rpcPort = parseCount(opts.rpcPort, '--rpc-port');
  const httpPort = parseCount(opts.httpPort, '--http-port');
  const peerList = Array.from({ length: peers }, (_, i) => ({
    id: `p${i + 1}`, iscsi: `127.0.0.1:${iscsiPort + i}`, rpc: `127.0.0.1:${rpcPort + i}`, http: `127.0.0.1:${httpPort + i}`, data: join(dir, `p${i + 1}`),
  }));
  // The demo's peers talk mutual TLS, with a CA of its own in dir/tls (kept across runs on one --data).
  const tls = await ensureGroupTls(dir, { name: 'demo', peers: peerList });
  const config: ClusterConfig = {
    name: 'demo',
    adminToken: opts.token ?? randomBytes(12).toString('hex'),
    secret: randomBytes(16).toString('hex'),
    catalog: { backend: 'embedded', path: join(dir, 'catalog') },
    pageBlocks,
    migration: migrationDefaults,
    peers: peerList,
    tls,
  };
  const configFile = join(dir, 'cluster.yaml');
  writePrivateFile(configFile, renderConfig(config));
  const log = createLogger({ name: 'peersan', file: join(dir, 'peersan.log') });
  // Every peer gets its own store, portal and RPC port; they share the one embedded catalog
  // and talk to each other over real gRPC on loopback.
  const meta = await EmbeddedMetaStore.open(join(dir, 'catalog'));
  const servers: PeerServer[] = [];
  try {
    for (const p of config.peers) servers.push(await PeerServer.start({ ...config, path: configFile }, p.id, log, { meta }));
  } catch (err) {
    await stopGroup(servers, 'demo (start failed)');
    await meta.close();
    removeThrowaway();
    throw err;
  }
  const existing = (await servers[0].admin.listVolumes()).find((v) => v.name === 'demo');
  const volume = existing ?? (await servers[0].admin.createVolume({ name: 'demo', size: opts.size }));
  const say = (s: string): boolean => process.stdout.write(s + '\n');
  say(`peersan demo: ${peers} peer(s), data in ${dir}${throwaway ? ' (removed when the demo stops; --data DIR keeps it)' : ''}`);
  say(`volume ${volume.name}: ${formatBytes(volume.sizeBytes)}, block size ${volume.blockBytes}, pages of ${pageBlocks} blocks striped over ${volume.peers.join(', ')}, ${volume.replicas} ${volume.replicas === 1 ? 'copy' : 'copies'} of each`);
  for (const p of config.peers) say(`  ${p.id}: iscsi://${p.iscsi}/${volume.targetName}/0`);
  say(`admin:  export PEERSAN_CONFIG=${configFile}   then e.g.  npx peersan status; npx peersan page map demo`);
  say(`tls:    peers and admin RPC use TLS with the CA ${tls.ca} (the config names it; or --ca / $PEERSAN_CA)`);
  say(`console: http://${config.peers[0].http}/  (any peer's http address; admin token: cluster.adminToken in ${configFile})`);
  say(`metrics: http://${config.peers[0].http}/metrics  (no token; one per peer)`);
  say(`logs:   ${join(dir, 'peersan.log')}`);
  say('ready');
  await runUntilSignal(servers);
  exitSoon();
  await meta.close();
  removeThrowaway();
  say(throwaway ? `stopped; removed ${dir}` : 'stopped');
}
