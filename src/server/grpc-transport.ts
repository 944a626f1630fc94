// The production peer transport (src/cluster/transport.ts): one block data stream
// (src/routing/link.ts, data-stream.ts) and one PeerService gRPC client (src/cluster/peer-rpc.ts)
// per other peer, both to its rpc port, each opened on first use, authenticated (peer-auth.ts)
// and, with `cluster.tls`, mutual TLS.

import { peerAuthFields, peerDataMethod } from '../cluster/peer-auth';
import { PeerRpcClient } from '../cluster/peer-rpc';
import { peerTlsChannel, peerTlsConnectOptions, type PeerTls } from '../cluster/peer-tls';
import type { PeerTransport } from '../cluster/transport';
import type { Env } from '../env/env';
import { PeersanError } from '../errors';
import { PeerLink } from '../routing/link';
import type { ReadBuffers } from '../routing/read-buffers';
import type { MembersView } from '../cluster/members';

export interface GrpcTransportOptions {
  self: string;
  /** The group's members: each one's RPC address (its record's, which a restart may change). */
  members: MembersView;
  /**
   * The address this peer's cluster.yaml gives for another peer, if it lists it: how this peer
   * reaches that one (a proxy, a NAT, a second network), which wins over the record's.
   */
  dialOf?(peerId: string): string | undefined;
  secret: string;
  tls: PeerTls | undefined;
  env: Env;
  /** Where the block streams receive large replies (src/routing/read-buffers.ts); absent: fresh buffers. */
  readBuffers?: ReadBuffers;
}

export class GrpcTransport implements PeerTransport {
  private readonly links = new Map<string, { address: string; link: PeerLink }>();
  private readonly clients = new Map<string, { address: string; client: PeerRpcClient }>();
  /**
   * Closed: a link or client asked for afterwards (a task still running as the peer stops) is
   * closed at once, so it fails unsent and leaves no connection open behind the stopped peer.
   */
  private closed = false;

  constructor(private readonly o: GrpcTransportOptions) {}

  /** The block stream to a peer, opened again when its record names a new address. */
  blocks(peerId: string): PeerLink {
    const address = this.address(peerId);
    const held = this.links.get(peerId);
    if (held?.address === address) return held.link;
    held?.link.close();
    const { secret, self, tls, env, readBuffers } = this.o;
    const link = new PeerLink({
      peerId, address, env,
      ...(readBuffers ? { readBuffers } : {}),
      hello: () => peerAuthFields(secret, self, peerDataMethod),
      ...(tls ? { tls: peerTlsConnectOptions(tls, peerId) } : {}),
    });
    this.links.set(peerId, { address, link });
    if (this.closed) link.close();
    return link;
  }

  calls(peerId: string): PeerRpcClient {
    const address = this.address(peerId);
    const held = this.clients.get(peerId);
    if (held?.address === address) return held.client;
    held?.client.close();
    const { secret, self, tls } = this.o;
    const client = new PeerRpcClient(peerId, address, { secret, self }, tls ? peerTlsChannel(tls, peerId) : undefined);
    this.clients.set(peerId, { address, client });
    if (this.closed) client.close();
    return client;
  }

  close(): void {
    this.closed = true;
    for (const l of this.links.values()) l.link.close();
    for (const c of this.clients.values()) c.client.close();
  }

  private address(peerId: string): string {
    const m = this.o.members.get(peerId);
    if (!m || m.state === 'removed') throw new PeersanError(`route names an unknown peer ${peerId}`);
    return this.o.dialOf?.(peerId) ?? m.rpc;
  }
}
