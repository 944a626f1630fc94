// What a peer does when a member record changes (members.ts onChange, fed by the catalog watch):
// the effects of `peersan peer drain`, a graceful leave and a removal that are not the copies'
// moves (the CopyKeeper's). Every peer:
//   - announces the change in its console events, with who asked (memberChangeText);
//   - cancels its own page moves aimed at a peer that turned draining (nothing new goes there; a
//     cancelled move copies its pieces back); not one that is leaving: a move to a peer that
//     restarts waits for it and resumes from its checkpoint;
// and the peer concerned, for itself:
//   - draining: asks its hosts to log out (AsyncEvent 1), except those a SCSI reservation pins
//     here (drain progress lists them for the operator); their next login here is redirected;
//   - removed: stops (it is no longer in the group; its start is refused from now on).
// The redirect itself (drainRedirect, pure) is the portal's first login rule while this peer is
// draining or leaving, whatever the host-balancing setting.

import type { Logger } from 'pino';
import type { MemberRecord, Members, MembersView } from '../cluster/members';
import type { Portal, SessionInfo } from '../iscsi/portal';
import type { Migrator } from '../migration/migrator';
import { memberChangeText, type EventKind } from './events';

const notPlaceable = (r: MemberRecord | undefined): boolean => r?.state === 'draining' || r?.state === 'leaving';

/**
 * Where a login to `self` goes while it is draining or leaving: "host:port,tag" of an up peer
 * (the same one for an initiator each time, the initiators spread over the up peers), or
 * undefined to serve it here (not draining, or no up peer to send it to).
 */
export function drainRedirect(self: string, members: MembersView, initiatorName: string): string | undefined {
  if (!notPlaceable(members.get(self))) return undefined;
  const up = members.placeable().filter((p) => p !== self);
  if (up.length === 0) return undefined;
  let h = 0;
  for (const ch of initiatorName) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  const to = members.get(up[h % up.length])!;
  return `${to.iscsi},${to.tag}`;
}

/** Ask this peer's host sessions to log out, but the pinned ones; returns those it asked. */
export function askHostsToLeave(portal: Pick<Portal, 'sessions' | 'requestLogoutOf'>, pinned: (s: SessionInfo) => boolean, seconds: number): SessionInfo[] {
  const asked = portal.sessions().filter((s) => s.sessionType === 'Normal' && !pinned(s));
  for (const s of asked) portal.requestLogoutOf(s.tsih, seconds);
  return asked;
}

export interface MemberEffectsOptions {
  self: string;
  members: Pick<Members, 'onChange'>;
  migrator: Pick<Migrator, 'list' | 'cancel'>;
  portal(): Pick<Portal, 'sessions' | 'requestLogoutOf'> | undefined;
  /** A session here is pinned by a SCSI reservation. */
  pinned(s: SessionInfo): boolean;
  /** How long hosts get to log out (AsyncEvent 1's parameter). */
  logoutSeconds: number;
  event(kind: EventKind, message: string, fields: { peer?: string }): void;
  /** This peer was removed from the group: stop it. */
  removed(): void;
  log: Logger;
}

/** Follow the member records; returns the unsubscribe. */
export function followMembers(o: MemberEffectsOptions): () => void {
  return o.members.onChange((id, now, before) => {
    const text = memberChangeText(now, before);
    if (text) o.event('member', text, { peer: id });
    if (!now || now.state === before?.state) return;
    // Not for a leaving peer: a planned restart resumes its moves from their checkpoints.
    if (now.state === 'draining') cancelMovesTo(o, id);
    if (id !== o.self) return;
    if (now.state === 'draining') {
      const portal = o.portal();
      const asked = portal ? askHostsToLeave(portal, o.pinned, o.logoutSeconds) : [];
      o.log.info({ sessions: asked.length }, 'draining: hosts asked to log out (their next login here is redirected)');
    }
    if (now.state === 'removed') o.removed();
  });
}

function cancelMovesTo(o: Pick<MemberEffectsOptions, 'migrator' | 'log'>, peer: string): void {
  for (const m of o.migrator.list().filter((x) => x.to === peer)) {
    try {
      o.migrator.cancel(m.volumeId, m.page);
      o.log.info({ volume: m.volume, page: m.page, to: peer }, 'page move cancelled: its destination is draining');
    } catch (err) {
      // Committing already: it ends there, and the drain moves the page away again.
      o.log.info({ volume: m.volume, page: m.page, to: peer, reason: (err as Error).message }, 'page move to a draining peer not cancelled');
    }
  }
}
