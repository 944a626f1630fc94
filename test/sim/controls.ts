// Negative controls (DESIGN.md 12): protocol variants with a known bug, kept in the test tree.
// Each must be caught by the simulator within a bounded number of seeds: the proof that the
// invariants can fail. `npm run sim -- --control NAME`.

import type { PeerProtocols } from '../../src/server/compose';
import { EarlyEvacuation } from './controls/membership';
import { NoOwnershipCheck, SingleCopyDualWrite } from './controls/migration';
import { EarlyAckReplication } from './controls/replication';
import { JoinWithoutLayer, NoBarrierSnapshots, NoFinishSnapshots } from './controls/snapshots';

export interface Control {
  /** The bug, in a sentence, and which invariant must catch it. */
  bug: string;
  protocols: Partial<PeerProtocols>;
  /**
   * Copies per page of its runs' volume (default: drawn from the seed, 1-3). A replication bug
   * needs several; the bugs of moves and snapshots run with one copy, where their path is the
   * whole story and the seeds that catch them were measured.
   */
  replicas?: number;
}

export const controls = new Map<string, Control>([
  ['single-copy-dual-write', { bug: 'a page move acknowledges a host write to the piece in transit after the source\'s copy only (SingleCopyDualWrite); caught by the read check', protocols: { movable: SingleCopyDualWrite }, replicas: 1 }],
  ['no-ownership-check', { bug: 'an owner serves requests for a page it has given away (NoOwnershipCheck); caught by the read check', protocols: { movable: NoOwnershipCheck }, replicas: 1 }],
  ['no-barrier', { bug: 'barrier snapshots taken peer by peer: each peer prepares, freezes and releases before the next one prepares (NoBarrierSnapshots); caught by the consistent-cut check', protocols: { snapshots: NoBarrierSnapshots }, replicas: 1 }],
  ['no-finish', { bug: 'timestamp snapshots skip FINISH: late writes stamped before the cut are left out (NoFinishSnapshots); caught by the consistent-cut check', protocols: { snapshots: NoFinishSnapshots }, replicas: 1 }],
  ['join-without-layer', { bug: 'a copy that lacked a snapshot\'s layer of its page joins its holders without taking the layer (JoinWithoutLayer); caught by the check of every holder\'s layer', protocols: { layerSync: JoinWithoutLayer }, replicas: 2 }],
  ['early-evacuation', { bug: 'a copy leaving a draining peer (or a peer the capacity spread empties) is removed as soon as its replacement is added, stale, not once it is in sync (EarlyEvacuation); caught by the route history\'s protection-dropped check', protocols: { keeper: EarlyEvacuation }, replicas: 2 }],
  ['early-ack', { bug: 'a primary acknowledges a change before every in-sync copy has it (EarlyAckReplication); caught by the read check, the convergence of in-sync copies or the check of every snapshot holder\'s layer (in-sync copies froze different blocks)', protocols: { replicated: EarlyAckReplication }, replicas: 2 }],
]);
