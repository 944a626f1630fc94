// Negative controls for the snapshot consistency checkers: SnapshotService variants, each with
// one known bug, that a checker must catch (a check shown to fail). They reach a peer through
// composePeer's `protocols` (PeerStartOptions.protocols in-process, the simulator's peers in
// test/sim). Each overrides one step of the real protocol and nothing else, so what differs
// from production is exactly the bug named here.

import type { VolumeRecord } from '../../../src/cluster/catalog';
import type { SnapshotRecord } from '../../../src/snapshot/records';
import { SnapshotService } from '../../../src/snapshot/service';
import type { StampedChange } from '../../../src/snapshot/stamp-log';
import type { StoreVolume } from '../../../src/store/page-store';

/**
 * Barrier mode without the barrier: the coordinator has each peer freeze its layers on its
 * own, one peer after another, and holds no host I/O (PREPARE names no volume, so no gate
 * closes and no move pauses). A chain of writes that crosses peers (write n acknowledged
 * before write n+1 is issued) can then land write n+1 in the snapshot on a peer that froze
 * late and miss write n on a peer that froze early: not a consistent cut. Must catch it: the
 * causal checker (test/snapshot.test.ts, test/sim) with host writes forwarded between peers
 * while snapshots are taken; the freezes are apart by the round trips to each peer.
 */
export class NoBarrierSnapshots extends SnapshotService {
  protected override async barrier(snapshotId: string, volumes: VolumeRecord[], records: SnapshotRecord[]): Promise<number> {
    const layers = records.map((r) => ({ volumeId: r.volumeId, seq: r.seq }));
    for (const p of this.o.groupPeers) {
      await this.o.rpc.prepare(p, { snapshotId, volumeIds: [] });
      await this.o.rpc.take(p, { snapshotId, layers });
      await this.o.rpc.release(p, snapshotId, false);
    }
    this.captureRoutes(volumes, records, []);
    return 0;
  }
}

/**
 * Timestamp mode without FINISH's writes: each peer's layer stays what it froze at PREPARE,
 * and the changes stamped before the cut that reached the peer after its freeze are left out.
 * Peers freeze when PREPARE reaches them, at different times, so the layers are not one cut.
 * Must catch it: the causal checker with PREPARE reaching the peers at different times
 * (a jittered network) and forwarded host writes arriving late at their owners.
 */
export class NoFinishSnapshots extends SnapshotService {
  protected override async completeLayer(_store: StoreVolume, _seq: number, _changes: StampedChange[]): Promise<void> {}
}
