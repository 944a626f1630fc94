// The load view host balancing decides on, until the gossip load monitor (src/loadmon) can
// provide one: this peer polls every other peer's PeerService Status about once a second and
// keeps the last answer; its own sessions are counted live. IOPS and bytes/s are not in
// Status, so they are 0 here: the balance is by sessions (and page locality) until the
// gossip view is swapped in. Anything implementing LoadView (host-balance.ts) can replace it.

import type { Logger } from 'pino';
import type { LoadView, PeerLoad } from './host-balance';
import type { PeerStatusView } from './admin';

export interface PolledPeer {
  id: string;
  iscsi: string;
  portalGroupTag: number;
}

export interface PolledLoadViewOptions {
  selfId: string;
  peers: PolledPeer[];
  /** This peer's Normal sessions, counted now. */
  ownSessions(): number;
  status(peerId: string, timeoutMs: number): Promise<PeerStatusView>;
  log: Logger;
  pollMs?: number;
}

interface Polled {
  up: boolean;
  sessions: number;
  atMs: number;
}

/** A poll older than this (a peer that stopped answering without failing) counts as down. */
const pollStaleMs = 5_000;

export class PolledLoadView implements LoadView {
  private readonly o: PolledLoadViewOptions;
  private readonly pollMs: number;
  private readonly last = new Map<string, Polled>();
  private timer: NodeJS.Timeout | undefined;
  private polling = false;

  constructor(opts: PolledLoadViewOptions) {
    this.o = opts;
    this.pollMs = opts.pollMs ?? 1_000;
  }

  start(): void {
    if (this.timer) return;
    void this.poll();
    this.timer = setInterval(() => void this.poll(), this.pollMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** One round over the other peers; a round still running when the next is due is not doubled. */
  async poll(): Promise<void> {
    if (this.polling) return;
    this.polling = true;
    try {
      await Promise.all(
        this.o.peers
          .filter((p) => p.id !== this.o.selfId)
          .map(async (p) => {
            try {
              const s = await this.o.status(p.id, Math.max(200, this.pollMs - 100));
              this.last.set(p.id, { up: true, sessions: (s.sessions ?? []).filter((x) => x.sessionType === 'Normal').length, atMs: Date.now() });
            } catch (err) {
              if (this.last.get(p.id)?.up !== false) this.o.log.debug({ peer: p.id, reason: (err as Error).message }, 'host balance: peer did not answer Status');
              this.last.set(p.id, { up: false, sessions: 0, atMs: Date.now() });
            }
          }),
      );
    } finally {
      this.polling = false;
    }
  }

  peers(nowMs: number): PeerLoad[] {
    return this.o.peers.map((p): PeerLoad => {
      const base = { peerId: p.id, iscsiAddress: p.iscsi, portalGroupTag: p.portalGroupTag, iops: 0, bytesPerSec: 0 };
      if (p.id === this.o.selfId) return { ...base, up: true, sessions: this.o.ownSessions() };
      const polled = this.last.get(p.id);
      const fresh = polled !== undefined && polled.up && nowMs - polled.atMs <= pollStaleMs;
      return { ...base, up: fresh, sessions: fresh ? polled.sessions : 0 };
    });
  }
}
