// The admin operations on page moves: start and cancel a move, list the moves in flight. A move
// is run by the page's owner (its source), so an operator may ask any peer: it runs the move
// itself when it owns the page and asks the owner over PeerService otherwise. The list asks
// every peer, since each reports only the moves it is the source of; a peer that does not answer
// is named, not an error.

import type { Catalog } from '../cluster/catalog';
import type { PeerCalls } from '../cluster/transport';
import { moveRpcMsMax, statusPeerMsMax } from '../limits';
import type { Migrator, MoveInfo } from './migrator';

export interface MoveAdmin {
  movePage(volume: string, page: number, to: string): Promise<MoveInfo>;
  cancelMove(volume: string, page: number): Promise<void>;
  /** Moves in flight on every peer, and the peers that did not answer. */
  migrations(): Promise<{ moves: MoveInfo[]; unreachable: string[] }>;
  /** The console's migrations panel: moves in flight on every peer that answers. */
  listMigrations(): Promise<MoveInfo[]>;
}

export interface MoveAdminOptions {
  self: string;
  /** Every peer of the group now, this one included. */
  groupPeers(): readonly string[];
  catalog: Catalog;
  migrator: Pick<Migrator, 'start' | 'cancel' | 'list'>;
  calls(peerId: string): Pick<PeerCalls, 'startMove' | 'cancelMove' | 'moves'>;
}

export function moveAdmin(o: MoveAdminOptions): MoveAdmin {
  const { self, catalog, migrator } = o;
  const ownerOf = (volume: string, page: number) => {
    const v = catalog.require(volume);
    return { volumeId: v.id, owner: catalog.routes(v).route(page).owner };
  };
  const migrations = async () => {
    const unreachable: string[] = [];
    const lists = await Promise.all(o.groupPeers().map(async (p) => {
      if (p === self) return migrator.list();
      return o.calls(p).moves(statusPeerMsMax).catch(() => {
        unreachable.push(p);
        return [];
      });
    }));
    return { moves: lists.flat(), unreachable };
  };
  return {
    async movePage(volume, page, to) {
      const { owner } = ownerOf(volume, page);
      if (owner === self) return migrator.start(volume, page, to);
      return o.calls(owner).startMove(volume, page, to, moveRpcMsMax);
    },
    async cancelMove(volume, page) {
      const { owner, volumeId } = ownerOf(volume, page);
      if (owner === self) return migrator.cancel(volumeId, page);
      await o.calls(owner).cancelMove(volume, page, moveRpcMsMax);
    },
    migrations,
    listMigrations: async () => (await migrations()).moves,
  };
}
