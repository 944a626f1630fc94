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
export async function boot(t: Tap.Test, peers: number, pages: number, replicas: number, replication?: ReplicationSettings, moveRateBytesPerSec?: number, seed = 1): Promise<{ world: SimWorld; group: SimGroup }> {
  const world = new SimWorld(seed);
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

/**
 * Page 0 of a 2-copy volume on 3 peers (p1 primary, p2 secondary) moving from p1 to p3 at a
 * piece (256 KiB) a second. Once a piece is on p3, a host writes 64 blocks of 0xa1 at block 0
 * through p1 (the write goes to p3, staging, and to p2; not to p1's store); then p3 crashes, its
 * disk losing the write (acknowledged without FUA), and restarts still receiving the page.
 */
export async function destRestartedMidMove(t: Tap.Test): Promise<{ world: SimWorld; group: SimGroup; volumeId: string; cursor: () => number }> {
  const { world, group } = await boot(t, 3, 1, 2, undefined, 256 * 1024);
  const volumeId = core(group, 'p1').catalog.require(volume).id;
  const cursor = (): number => core(group, 'p1').migrator.cursors(volumeId)[0]?.done ?? -1;
  await drive(world, core(group, 'p1').migrator.start(volume, 0, 'p3'));
  t.ok(await until(world, () => cursor() >= 1), 'the first piece is on p3');
  await write(world, group, 'p1', 0, fill(64, 0xa1));
  t.ok(cursor() >= 1 && cursor() < 16, 'the move is still copying');
  group.peers.get('p3')!.crash();
  await drive(world, group.peers.get('p3')!.start());
  t.same(await drive(world, core(group, 'p3').targets.stored(volumeId)!.read(0, 64)), fill(64, 0), "p3's disk lost the write");
  t.ok(core(group, 'p3').migrator.receiving(volumeId, 0), 'p3 still receives page 0');
  return { world, group, volumeId, cursor };
}
