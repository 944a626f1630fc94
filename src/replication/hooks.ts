// The contracts between the parts of src/replication (DESIGN.md 10): the write path
// (replicated.ts), the activity log and resync (activity.ts, resync.ts), and leases and failover
// (leases.ts, failover.ts). Each part implements its side; composePeer wires them.

import type { Route } from '../routing/table';
import type { BlockBackend } from '../store/types';

/** Activity log and dirty-grain tracking, called by the write path on every peer, in every role. */
export interface ChangeTracker {
  /** Before this peer changes `page`: undefined when it is in the durable activity log already, else a promise that resolves once it is. */
  beforeChange(volumeId: string, page: number): Promise<void> | undefined;
  /**
   * After a change of [lba, lba + blocks) (inside `page`) was applied here under `route`: marks its
   * grains dirty for every stale copy of the route and for `missed` (copies the primary sent it to
   * that did not apply it).
   */
  changed(volumeId: string, page: number, route: Route, lba: number, blocks: number, missed: readonly string[]): void;
  /** Stale copies now resyncing from this primary: the write path sends them every change too, best effort (a miss is `missed`). */
  resyncing(volumeId: string, page: number): readonly string[];
}

/** May the primary serve this page now (leases, reconciliation). */
export interface PrimaryGuard {
  /**
   * Run `op` (a read or change of `page` at `route`, this peer primary) when allowed: waits while
   * the page is being reconciled; for reads, also needs a valid lease from every other in-sync copy
   * (waiting for one, or dropping an expired copy by CAS) and re-checks after `op` (runs it again if
   * the lease ran out meanwhile). Throws PageMovedError when the page is not ours any more.
   */
  run<T>(volumeId: string, page: number, route: Route, read: boolean, op: () => Promise<T>): Promise<T>;
}

/** The replicated layer of one volume on this peer, as failover and resync use it. */
export interface ReplicaPort {
  /** Grain indexes (within the page) of changes applied here and not known acknowledged everywhere. */
  recentGrains(page: number): number[];
  /** Run `fn` while no change of [lba, lba + blocks) of the page runs here (the range lock, exclusive). */
  exclusive<T>(page: number, lba: number, blocks: number, fn: () => Promise<T>): Promise<T>;
  /**
   * Send one change to copy `peer` at `route`'s epoch (a replica frame); throws on refusal or
   * failure (MOVED: PageMovedError). Resolves to the copy's start token (frame.ts; 0 from a peer
   * of an older version): another answer than an earlier one's means it restarted in between.
   */
  send(peer: string, route: Route, op: 'write' | 'unmap', lba: number, blocks: number, data: Buffer | undefined, fua: boolean): Promise<number>;
  /** This peer's store of the volume, below the replicated layer (reads for reconcile and resync). */
  readonly local: BlockBackend;
}
