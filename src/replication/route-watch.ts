// Every route change of every volume, as this peer's tables learn them (from the catalog's watch,
// a move's commit or a MOVED answer): RouteTable.onLearn for each volume, followed as volumes
// come and go. The copy keeper and the reaper (src/replication) react to them.

import type { Catalog, VolumeRecord } from '../cluster/catalog';
import type { Route } from '../routing/table';

/** Calls `onRoute` for every newer route of any volume and `onVolume` after every volume change; returns the unsubscribe. */
export function followRoutes(catalog: Catalog, onRoute: (volume: VolumeRecord, page: number, route: Route) => void, onVolume?: (volume: VolumeRecord) => void): () => void {
  const followed = new Map<string, () => void>();
  const follow = (v: VolumeRecord): void => {
    if (followed.has(v.id)) return;
    // The record is looked up at each change: a resize or a new replica count keeps the table.
    followed.set(v.id, catalog.routes(v).onLearn((page, route) => onRoute(catalog.volumeById(v.id) ?? v, page, route)));
  };
  for (const v of catalog.listVolumes()) follow(v);
  const unwatch = catalog.onVolumeChange((_name, record) => {
    for (const [id, off] of followed) {
      if (catalog.volumeById(id)) continue;
      off();
      followed.delete(id);
    }
    if (!record) return;
    follow(record);
    onVolume?.(record);
  });
  return () => {
    unwatch();
    for (const off of followed.values()) off();
    followed.clear();
  };
}
