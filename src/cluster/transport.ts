// The peer transport seam (DESIGN.md 12): how one peer reaches another. Protocol code (routers,
// page moves, snapshots, gossip) asks the transport for a block sender or for the control calls
// of one peer, and never opens a socket itself. Production wires GrpcTransport (one block stream
// and one PeerService client per peer, opened on first use); the simulator (test/sim) wires its
// own network, which delays, drops, reorders and partitions what crosses it.

import type { PeerRpcClient } from './peer-rpc';
import type { BlockSender } from '../routing/router';

/** The control calls one peer makes to another (PeerService), each bounded by its timeout. */
export type PeerCalls = Pick<
  PeerRpcClient,
  | 'ready' | 'status' | 'reservationChanged' | 'startMove' | 'cancelMove' | 'moves' | 'movePrepare' | 'moveFinish'
  | 'snapshotPrepare' | 'snapshotTake' | 'snapshotRelease' | 'gossip' | 'startMoves' | 'moveSession' | 'planHostMove' | 'replication'
>;

export interface PeerTransport {
  /** Block requests to `peerId` (the data path's forwarding, a move's copy and dual writes). */
  blocks(peerId: string): BlockSender;
  /** Control calls to `peerId`. */
  calls(peerId: string): PeerCalls;
  /** Close every channel (the peer is stopping). */
  close(): void;
}
