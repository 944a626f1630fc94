// The reaper: a peer frees its data of a page once the page's route no longer lists it among
// the copies (DESIGN.md 10): a copy removed by fewer replicas, the copy of a peer that was
// declared lost and came back, a stale copy replaced. The store's dropPage frees the page's
// live data only: a snapshot reads the page from any copy in sync at its cut, wherever the page
// went since (src/snapshot/records.ts snapshotHolders), so this peer's layers of it stay until
// the snapshots go.
//
// When the decision is safe: the route must say which peers hold copies (a route heard in a
// MOVED answer does not, and an unreplicated page's record neither: a move frees its source
// itself, migrator.ts), and this peer must neither be moving the page away (its copy is what
// the move is copying) nor receiving it by a move (the copy being built is not in the route
// yet). The decision is made against the table's route in the same synchronous step as
// dropPage takes its place in the store's queue: a newer route that lists this peer again (a
// new stale copy) is either seen here, or comes later, and then every write to the new copy
// queues behind the drop, never before it.
//
// When: at every route change of a page (the catalog's watch) and once at start for every page
// this peer holds (a peer coming back after its copies were rebuilt elsewhere).

import type { Logger } from 'pino';
import type { Catalog } from '../cluster/catalog';
import type { Route } from '../routing/table';
import { followRoutes } from './route-watch';

export interface ReapFacts {
  self: string;
  /** The newest route of the page this peer knows. */
  route: Route;
  movingAway: boolean;
  receiving: boolean;
}

/** True when this peer's data of the page is nobody's copy and may be freed (see the top). */
export function shouldReap(f: ReapFacts): boolean {
  if (!f.route.copies || f.movingAway || f.receiving) return false;
  return !f.route.copies.includes(f.self);
}

/** The store of one volume on this peer, as the reaper uses it. */
export interface ReapedStore {
  /** Pages of which this peer holds any data (live or snapshot layers). */
  heldPages(): number[];
  /** True when this peer holds live data of the page. */
  holdsPage(page: number): boolean;
  /** Free the page's live data (snapshot layers stay); takes its place in the store's queue synchronously. */
  dropPage(page: number): Promise<void>;
}

export interface ReaperOptions {
  self: string;
  catalog: Catalog;
  log: Logger;
  /** The volume's store on this peer, if it is open here. */
  store(volumeId: string): ReapedStore | undefined;
  movingAway(volumeId: string, page: number): boolean;
  receiving(volumeId: string, page: number): boolean;
}

export class Reaper {
  private readonly o: ReaperOptions;
  private unfollow: (() => void) | undefined;
  /** Pages freed since start (tests, logs). */
  reaped = 0;

  constructor(o: ReaperOptions) {
    this.o = o;
  }

  /** Free what the routes no longer list as ours, then follow every route change. */
  start(): void {
    for (const v of this.o.catalog.listVolumes()) this.scan(v.id);
    this.unfollow = followRoutes(this.o.catalog, (volume, page) => this.consider(volume.id, page), (volume) => this.scan(volume.id));
  }

  stop(): void {
    this.unfollow?.();
  }

  private scan(volumeId: string): void {
    for (const page of this.o.store(volumeId)?.heldPages() ?? []) this.consider(volumeId, page);
  }

  /** Decide by the newest route and queue the drop in the same step (see the top). */
  private consider(volumeId: string, page: number): void {
    const { catalog, self } = this.o;
    const volume = catalog.volumeById(volumeId);
    const store = this.o.store(volumeId);
    if (!volume || !store) return;
    const route = catalog.routes(volume).route(page);
    if (!shouldReap({ self, route, movingAway: this.o.movingAway(volumeId, page), receiving: this.o.receiving(volumeId, page) })) return;
    if (!store.holdsPage(page)) return;
    this.reaped++;
    store.dropPage(page).then(
      () => this.o.log.info({ volume: volume.name, page, version: route.version }, 'freed a page this peer no longer holds a copy of'),
      (err: Error) => this.o.log.warn({ volume: volume.name, page, reason: err.message }, 'could not free a page no longer ours (freed at the next start)'),
    );
  }
}
