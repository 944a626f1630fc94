// The load view host balancing decides on: the group view the load monitors gossip each
// second (src/loadmon), per peer its sessions and the I/O it receives from hosts (10 s
// averages), with a peer not heard from for a while counted as down. This peer's own
// sessions are counted live, so a burst of logins is seen at once.

import type { PeerLoadView } from '../loadmon/view';
import type { LoadView, PeerLoad } from './host-balance';

export interface ViewPeer {
  id: string;
  iscsi: string;
  portalGroupTag: number;
}

export interface GossipLoadViewOptions {
  selfId: string;
  /** The group's peers now (members join and leave). */
  peers(): ViewPeer[];
  /** This peer's Normal sessions, counted now. */
  ownSessions(): number;
  /** The gossiped loads (LoadService.peerLoads). */
  loads(): PeerLoadView[];
}

/** The 10 s window of the EWMA triples. */
const window10s = 1;

export class GossipLoadView implements LoadView {
  constructor(private readonly o: GossipLoadViewOptions) {}

  peers(): PeerLoad[] {
    const loads = new Map(this.o.loads().map((l) => [l.id, l]));
    return this.o.peers().map((p): PeerLoad => {
      const l = loads.get(p.id);
      const self = p.id === this.o.selfId;
      const up = self || (l !== undefined && !l.stale);
      return {
        peerId: p.id, iscsiAddress: p.iscsi, portalGroupTag: p.portalGroupTag, up,
        sessions: self ? this.o.ownSessions() : up ? l!.sessions : 0,
        iops: up ? (l?.received.iops[window10s] ?? 0) : 0,
        bytesPerSec: up ? (l?.received.bytesPerSec[window10s] ?? 0) : 0,
      };
    });
  }
}
