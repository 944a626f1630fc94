// Negative controls for page migration and routing: MovableVolume variants, each with one
// known bug, that the simulator must catch (npm run sim -- --control NAME). They reach a peer
// through composePeer's `protocols.movable`. Each overrides one step of the real class.

import { MovableVolume, type OutgoingMove } from '../../../src/migration/movable';
import type { homeOf } from '../../../src/migration/pieces';
import type { PageMovedError } from '../../../src/routing/moved';

/**
 * A move that acknowledges a host write to the piece in transit after one copy only (the
 * source's), and never marks the piece for another copy: when the piece's chunks were copied
 * before the write, the destination never gets it, and once the move commits the write is
 * gone. Must catch it: the per-block read check (acknowledged-write-lost / stale-read).
 */
export class SingleCopyDualWrite extends MovableVolume {
  protected override async toHomes(move: OutgoingMove, home: ReturnType<typeof homeOf>, local: () => Promise<void>, remote: () => Promise<unknown>): Promise<void> {
    if (home === 'dest') return void (await remote());
    return local();
  }
}

/**
 * An owner that never refuses a request for a page it gave away: a request routed by a stale
 * table (or one that raced the commit) is served from the old copy, which the move has freed
 * or will free, so the write is acknowledged and lost, or the read returns old data. Must catch
 * it: the per-block read check.
 */
export class NoOwnershipCheck extends MovableVolume {
  protected override notOwned(_page: number): PageMovedError | undefined {
    return undefined;
  }
}
