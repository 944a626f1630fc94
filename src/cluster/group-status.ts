// The group as an operator sees it: every peer's status, this peer's from itself and the others'
// over PeerService. A peer that does not answer within statusPeerMsMax is shown down (an
// operator asks "what is up?" most when something is not), never turned into an error. The
// sessions in that view are what the admin operations that must not pull a volume from under a
// host (delete, restore, moving a session by TSIH) look at.

import type { SessionInfo } from '../iscsi/portal';
import { statusPeerMsMax } from '../limits';
import type { PeerCalls } from './transport';

export interface PeerStatusView {
  id: string;
  iscsi: string;
  rpc: string;
  http: string;
  up: boolean;
  uptimeMs: number;
  allocatedBytes: number;
  freeBytes: number;
  totalBytes: number;
  volumes: number;
  sessions: SessionInfo[];
  version: string;
  /** Its member state (src/cluster/members.ts): joining, up, draining, leaving. */
  state?: string;
}

/** A peer's addresses from its member record: what a peer that does not answer is shown with. */
export interface PeerAddresses {
  id: string;
  iscsi: string;
  rpc: string;
  http: string;
  state?: string;
}

export interface GroupStatus {
  status(): Promise<{ cluster: string; peers: PeerStatusView[] }>;
  /** Every session logged in on a peer that answers, with the peer it is on. */
  sessions(): Promise<{ peer: string; session: SessionInfo }[]>;
}

export interface GroupStatusOptions {
  cluster: string;
  self: string;
  /** The group's members now (not removed). */
  peers(): readonly PeerAddresses[];
  /** This peer's own status (the process knows its ports, disk and portal). */
  selfStatus(): Promise<PeerStatusView>;
  calls(peerId: string): Pick<PeerCalls, 'status'>;
}

export function groupStatus(o: GroupStatusOptions): GroupStatus {
  const peerStatus = async (p: PeerAddresses): Promise<PeerStatusView> => {
    const state = p.state ? { state: p.state } : {};
    if (p.id === o.self) return { ...(await o.selfStatus()), ...state };
    try {
      return { ...(await o.calls(p.id).status(statusPeerMsMax)), up: true, ...state };
    } catch {
      return { id: p.id, iscsi: p.iscsi, rpc: p.rpc, http: p.http, up: false, uptimeMs: 0, allocatedBytes: 0, freeBytes: 0, totalBytes: 0, volumes: 0, sessions: [], version: '', ...state };
    }
  };
  const status = async () => ({ cluster: o.cluster, peers: await Promise.all(o.peers().map(peerStatus)) });
  return {
    status,
    sessions: async () => (await status()).peers.flatMap((p) => p.sessions.map((session) => ({ peer: p.id, session }))),
  };
}
