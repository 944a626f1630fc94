// Negative controls for the snapshot consistency checkers: SnapshotService variants, each with
// one known bug, that a checker must catch (a check shown to fail). They reach a peer through
// composePeer's `protocols` (PeerStartOptions.protocols in-process, the simulator's peers in
// test/sim). Each overrides one step of the real protocol and nothing else, so what differs
// from production is exactly the bug named here.

import { SnapshotCoordinator, type CoordinatorPlan, type Round } from '../../../src/snapshot/coordinator';
import { SnapshotLayerSync } from '../../../src/snapshot/layer-sync';
import { SnapshotService } from '../../../src/snapshot/service';
import type { StampedChange } from '../../../src/snapshot/stamp-log';
import type { StoreVolume } from '../../../src/store/page-store';

/**
 * Barrier mode without the barrier: the coordinator's rounds go to one peer at a time, which
 * prepares, freezes its layers and releases its gates before the next peer prepares (the
 * barrier rule is that every round goes to every peer, so nobody freezes before everybody
 * holds). A chain of writes that crosses peers (write n acknowledged before write n+1 is
 * issued) can then land write n+1 in the snapshot on a peer that froze late and miss write n
 * on a peer that froze early: not a consistent cut. Must catch it: the causal checker
 * (test/snapshot.test.ts, test/sim) with host writes forwarded between peers while snapshots
 * are taken; the freezes are apart by the round trips to each peer.
 */
class PeerByPeerCoordinator extends SnapshotCoordinator {
  protected override rounds(): Round[] {
    const [reach, ...rest] = super.rounds();
    return [reach, ...this.o.peers.flatMap((p) => rest.map((r) => ({ step: r.step, peers: [p] })))];
  }
}

export class NoBarrierSnapshots extends SnapshotService {
  protected override coordinator(plan: CoordinatorPlan): SnapshotCoordinator {
    return new PeerByPeerCoordinator(plan);
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

/**
 * A copy that lacked a snapshot's layer of its page joins the page's holders without taking the
 * layer from them (its own layer stays what it froze at the cut, stale, or nothing for a copy
 * built later). Must catch it: the simulator's check that every holder's layer reads what the
 * snapshot read returned (test/sim/run.ts holdersDiffer).
 */
export class JoinWithoutLayer extends SnapshotLayerSync {
  protected override async replaceGrains(): Promise<void> {}
}
