// The production peer transport (src/cluster/transport.ts): one PeerData block stream
// (src/routing/link.ts) and one PeerService client (src/cluster/peer-rpc.ts) per other peer,
// each opened on first use, authenticated (peer-auth.ts) and, with `cluster.tls`, mutual TLS.

import { peerAuthMetadata } from '../cluster/peer-auth';
import { PeerRpcClient } from '../cluster/peer-rpc';
import { peerTlsChannel, type PeerTls } from '../cluster/peer-tls';
import type { PeerTransport } from '../cluster/transport';
import type { Env } from '../env/env';
import { PeersanError } from '../errors';
import { PeerLink } from '../routing/link';
import type { PeerConfig } from './config';

export interface GrpcTransportOptions {
  self: string;
  /** Every peer of the group with its addresses. */
  peers: readonly PeerConfig[];
  secret: string;
  tls: PeerTls | undefined;
  env: Env;
}

export class GrpcTransport implements PeerTransport {
  private readonly links = new Map<string, PeerLink>();
  private readonly clients = new Map<string, PeerRpcClient>();

  constructor(private readonly o: GrpcTransportOptions) {}

  blocks(peerId: string): PeerLink {
    let l = this.links.get(peerId);
    if (!l) {
      const { secret, self, tls, env } = this.o;
      l = new PeerLink({
        peerId, address: this.peer(peerId).rpc, env,
        metadata: (method) => peerAuthMetadata(secret, self, method),
        ...(tls ? { tls: peerTlsChannel(tls, peerId) } : {}),
      });
      this.links.set(peerId, l);
    }
    return l;
  }

  calls(peerId: string): PeerRpcClient {
    let c = this.clients.get(peerId);
    if (!c) {
      const { secret, self, tls } = this.o;
      c = new PeerRpcClient(peerId, this.peer(peerId).rpc, { secret, self }, tls ? peerTlsChannel(tls, peerId) : undefined);
      this.clients.set(peerId, c);
    }
    return c;
  }

  close(): void {
    for (const l of this.links.values()) l.close();
    for (const c of this.clients.values()) c.close();
  }

  private peer(peerId: string): PeerConfig {
    const peer = this.o.peers.find((p) => p.id === peerId);
    if (!peer) throw new PeersanError(`route names an unknown peer ${peerId}`);
    return peer;
  }
}
