// Negative control for replication (issue 17, DESIGN.md 10): a ReplicatedVolume variant with one
// known bug that the simulator must catch (npm run sim -- --control early-ack). It reaches a peer
// through composePeer's `protocols.replicated` and overrides one step of the real class.

import { ReplicatedVolume } from '../../../src/replication/replicated';

/**
 * A primary that acknowledges a change once it is applied on its own copy, before every in-sync
 * copy has it: the change still goes to the other copies (and one that does not answer is still
 * dropped from the in-sync set), but in the background, after the range lock is released. So a
 * copy that takes over before the change reached it (its primary crashed or was cut off) never
 * has it — an acknowledged write lost, or a stale read — and overlapping changes, no longer
 * ordered by the lock, may reach the copies in different orders — copies diverge. Must catch it:
 * the per-block read check (checker.ts), or the convergence of in-sync copies (copies.ts).
 */
export class EarlyAckReplication extends ReplicatedVolume {
  protected override toCopies(...args: Parameters<ReplicatedVolume['toCopies']>): Promise<void> {
    void super.toCopies(...args).catch(() => undefined);
    return Promise.resolve();
  }
}
