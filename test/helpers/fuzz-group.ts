// The peers the fuzz suite and the hostile-load runs attack: real `peersan peer` processes
// (a crash shows as an exit, memory as the process's RSS), with no automatic page or host
// moves, so that what a case does is all that happens. Volumes are created through the CLI.

import { readFileSync, writeFileSync } from 'node:fs';
import { startEtcd, startPeers, type TestPeer } from './processes';

export const blockBytes = 512;
export const adminToken = 'test-admin-token';
export const clusterSecret = 'test-cluster-secret';

export interface FuzzGroup {
  peers: TestPeer[];
  /** Volume name → its catalog id (hex, the id peer frames carry). */
  volumeIds: Map<string, string>;
  httpPorts: number[];
}

/** A volume to create: its size ('64M') and the peers its pages go to (default: all, alternating). */
export interface VolumeSpec {
  size: string;
  peers?: string;
}

/** `count` peer processes (etcd for more than one) and `volumes`. `teardown` kills everything started here. */
export async function startFuzzGroup(teardown: (fn: () => unknown) => void, count: number, volumes: Record<string, VolumeSpec>): Promise<FuzzGroup> {
  const etcd = count > 1 ? (await startEtcd(teardown)).endpoint : undefined;
  const peers = await startPeers(teardown, { count, etcd, clusterYaml: ['hostBalance: { enabled: false }'], rootYaml: ['balancer: { enabled: false }'] });
  const volumeIds = new Map<string, string>();
  for (const [name, v] of Object.entries(volumes)) {
    const r = await peers[0].cliAsync('--json', 'volume', 'create', name, '--size', v.size, '--block-size', String(blockBytes), ...(v.peers ? ['--peers', v.peers] : []));
    if (r.status !== 0) throw new Error(`volume create ${name}: ${r.out}`);
    volumeIds.set(name, String((JSON.parse(r.out) as { id: string }).id));
  }
  const config = readFileSync(peers[0].config, 'utf8');
  const httpPorts = peers.map((p) => Number(new RegExp(`id: ${p.id}, .*http: 127\\.0\\.0\\.1:(\\d+)`).exec(config)![1]));
  return { peers, volumeIds, httpPorts };
}

/**
 * Resident and peak resident memory of a process (bytes), from /proc; undefined once it is
 * gone, or exited and not yet reaped (a zombie has no memory lines, and its 'exit' event may
 * not have reached us yet).
 */
export function rssOf(pid: number): { rssBytes: number; peakBytes: number } | undefined {
  let status: string;
  try {
    status = readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return undefined;
  }
  const kb = (key: string): number | undefined => {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status);
    return m ? Number(m[1]) * 1024 : undefined;
  };
  const [rssBytes, peakBytes] = [kb('VmRSS'), kb('VmHWM')];
  return rssBytes === undefined || peakBytes === undefined ? undefined : { rssBytes, peakBytes };
}

/** Restart the kernel's peak-RSS count of `pid` (VmHWM), so each load's peak is its own. */
export function resetPeak(pid: number): void {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
  } catch {
    // Not permitted here: the peak then covers everything since start, an over-estimate.
  }
}

/** The peer's process is running (not exited, not a zombie waiting to be reaped). */
export function alive(peer: TestPeer): boolean {
  return peer.process.exitCode === null && peer.process.signalCode === null && rssOf(peer.process.pid!) !== undefined;
}

export const mib = (bytes: number): number => Math.round(bytes / 2 ** 20);
