// Whole groups in the simulator for a test (test/sim: the production composition on simulated
// disks, catalog and network, no faults but the ones each test makes), deterministic from the
// seed: one volume `v` of 512-byte blocks and pages of 8192 blocks.

import type { PeerCore, ReplicationSettings } from '../../src/server/compose';
import { SimGroup } from '../sim/group';
import { SimWorld } from '../sim/world';

export const blockBytes = 512;
export const pageBlocks = 8192;
export const volume = 'v';

/** A group of `peers` with one volume of `pages` pages and `replicas` copies, booted; its last events are shown when the test fails. */
export async function boot(t: Tap.Test, peers: number, pages: number, replicas: number, replication?: ReplicationSettings, moveRateBytesPerSec?: number): Promise<{ world: SimWorld; group: SimGroup }> {
  const world = new SimWorld(1);
  const trace: string[] = [];
  const group = new SimGroup({ world, peers, trace: (line) => void trace.push(line), ...(replication ? { replication } : {}), ...(moveRateBytesPerSec ? { moveRateBytesPerSec } : {}) });
  t.teardown(() => {
    if (!t.passing()) t.comment(trace.slice(-80).join('\n'));
  });
  await group.boot({ name: volume, size: pages * pageBlocks * blockBytes, blockBytes, replicas });
  return { world, group };
}

/** Run the world until `p` settles (at most `ms` of simulated time): its value, or its error thrown. */
export async function drive<T>(world: SimWorld, p: Promise<T>, ms = 30_000): Promise<T> {
  let out: { done: boolean; v?: T; err?: unknown } = { done: false };
  p.then((v) => (out = { done: true, v }), (err: unknown) => (out = { done: true, err }));
  await world.run(world.now() + ms, Number.MAX_SAFE_INTEGER, () => out.done);
  if (!out.done) throw new Error(`no answer within ${ms} simulated ms`);
  if (out.err !== undefined) throw out.err;
  return out.v as T;
}

/** Run the world until `cond` holds (at most `ms`); whether it does. */
export async function until(world: SimWorld, cond: () => boolean, ms = 60_000): Promise<boolean> {
  await world.run(world.now() + ms, Number.MAX_SAFE_INTEGER, cond);
  return cond();
}

export function fill(blocks: number, byte: number): Buffer {
  return Buffer.alloc(blocks * blockBytes, byte);
}

export function core(group: SimGroup, id: string): PeerCore {
  const c = group.core(id);
  if (!c) throw new Error(`${id} is not up`);
  return c;
}

export async function write(world: SimWorld, group: SimGroup, via: string, lba: number, data: Buffer): Promise<void> {
  await drive(world, group.hostPath(via, volume)!.write(lba, data));
}
