// A volume's page routing table (DESIGN.md 2, 3, 10): page → {owner, version, copies, inSync}.
// Placement is a rule plus exceptions: page i of a volume placed on peers [a, b, c] with R
// copies starts on peers[i % 3], peers[(i + 1) % 3], … (R of them, the first is the primary,
// every copy in sync) at version 1, and the catalog stores a route record only for pages whose
// route changed since (a move, a failover, a copy dropped or added: each a compare-and-swap to
// version + 1). So a 64 TiB volume needs no per-page records until its pages change. The version
// is the page's epoch: copies refuse replica writes from an older one (src/replication). Pure: no I/O.

export interface Route {
  /** The primary: the one copy that serves the page's I/O (copies[0]). */
  owner: string;
  /** The page's epoch: every change of owner, copies or inSync makes it one higher. */
  version: number;
  /**
   * Every peer holding a copy, primary first; distinct peers. Absent: unknown (a route heard in
   * a MOVED answer carries owner and version only): copiesOf() says [owner], and the primary
   * reads the whole record from the catalog before it replicates (src/replication).
   */
  copies?: string[];
  /** The copies that have every acknowledged write (primary included); absent: all of copies. */
  inSync?: string[];
}

/** Every copy of the page, primary first. */
export function copiesOf(route: Route): readonly string[] {
  return route.copies ?? [route.owner];
}

/** The copies that hold every acknowledged write, primary first. */
export function inSyncOf(route: Route): readonly string[] {
  return route.inSync ?? copiesOf(route);
}

/** The copies that are not in sync (they catch up by resync, src/replication). */
export function staleCopiesOf(route: Route): string[] {
  const inSync = inSyncOf(route);
  return copiesOf(route).filter((p) => !inSync.includes(p));
}

function copyRoute(route: Route): Route {
  const next: Route = { owner: route.owner, version: route.version };
  if (route.copies) next.copies = [...route.copies];
  if (route.inSync) next.inSync = [...route.inSync];
  return next;
}

/** One per-page part of a block request. */
export interface PagePart {
  page: number;
  lba: number;
  blocks: number;
  /** Blocks before this part in the whole request. */
  offsetBlocks: number;
}

export const initialRouteVersion = 1;

export class RouteTable {
  /** Copies per page by the placement rule: the volume's replicas, at most one per peer. */
  readonly copyCount: number;
  private readonly listeners = new Set<(page: number, route: Route) => void>();

  constructor(
    readonly peers: readonly string[],
    readonly pageBlocks: number,
    /** page → route for pages whose route changed; shared with the catalog's in-memory copy. */
    private readonly moved: Map<number, Route>,
    replicas = 1,
  ) {
    if (peers.length === 0) throw new Error('assertion failed: a volume is placed on at least one peer');
    this.copyCount = Math.max(1, Math.min(replicas, peers.length));
  }

  route(page: number): Route {
    return this.moved.get(page) ?? this.placed(page);
  }

  /** The route the placement rule gives a page that never changed. */
  placed(page: number): Route {
    const n = this.peers.length;
    const owner = this.peers[page % n];
    if (this.copyCount === 1) return { owner, version: initialRouteVersion };
    const copies = Array.from({ length: this.copyCount }, (_, k) => this.peers[(page + k) % n]);
    return { owner, version: initialRouteVersion, copies, inSync: copies };
  }

  /**
   * Take a route heard from the catalog or from an owner's MOVED answer if it is newer. A
   * route without copies (a MOVED answer) at a newer version leaves copies unknown, until the
   * catalog's record of that version fills them in (true only for a newer route).
   */
  learn(page: number, route: Route): boolean {
    const known = this.route(page);
    // The same epoch is taken again only to fill in the copies a MOVED answer did not carry
    // (the catalog's record of that very route): listeners hear it, the caller learns nothing newer.
    const fill = route.version === known.version && !known.copies && route.copies !== undefined && route.owner === known.owner;
    if (route.version < known.version || (route.version === known.version && !fill)) return false;
    const next = copyRoute(route);
    this.moved.set(page, next);
    for (const l of this.listeners) l(page, next);
    return !fill;
  }

  /** The pages whose route changed since placement, with their routes (a scan at start, src/replication). */
  recorded(): [number, Route][] {
    return [...this.moved.entries()];
  }

  /** Called with every newer route the table takes (failover waits on it, src/replication). */
  onLearn(listener: (page: number, route: Route) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Pages whose route changed since placement (every other page's route is placed(page)). */
  changed(): IterableIterator<[number, Route]> {
    return this.moved.entries();
  }

  pageOf(lba: number): number {
    return Math.floor(lba / this.pageBlocks);
  }

  /** Cut [lba, lba + blocks) at page boundaries. */
  split(lba: number, blocks: number): PagePart[] {
    const parts: PagePart[] = [];
    let offset = 0;
    while (offset < blocks) {
      const at = lba + offset;
      const page = this.pageOf(at);
      const n = Math.min(blocks - offset, (page + 1) * this.pageBlocks - at);
      parts.push({ page, lba: at, blocks: n, offsetBlocks: offset });
      offset += n;
    }
    return parts;
  }

  /** Pages of a volume of `blockCount` blocks. */
  pageCount(blockCount: number): number {
    return Math.ceil(blockCount / this.pageBlocks);
  }

  /**
   * Every distinct route among the first `pages` pages, each with how many pages have it and the
   * lowest of them. The pages that never changed share their placement by page mod the peer
   * count, so this costs the peers plus the changed pages, never the pages (a 64 TiB volume has
   * 16 M): what counts, sums and "does any page …" questions over a whole volume go through.
   */
  classes(pages: number): RouteClass[] {
    const n = this.peers.length;
    const placed = Array.from({ length: Math.min(n, pages) }, (_, k) => Math.floor((pages - 1 - k) / n) + 1);
    const out: RouteClass[] = [];
    for (const [page, route] of this.moved) {
      if (page >= pages) continue;
      placed[page % n]--;
      out.push({ route, pages: 1, first: page });
    }
    placed.forEach((count, k) => {
      if (count <= 0) return;
      // The lowest unchanged page of the class: at most one step per changed page.
      let first = k;
      while (this.moved.has(first)) first += n;
      out.push({ route: this.placed(k), pages: count, first });
    });
    return out;
  }

  /** The routes of pages [from, from + count) in order (the caller bounds count). */
  routesIn(from: number, count: number): Route[] {
    return Array.from({ length: Math.max(0, count) }, (_, i) => this.route(from + i));
  }

  /**
   * Every page below `pages` with a copy on `peer`, in page order, with its route: lazily, so a
   * walk holds nothing per page (a walk of a whole volume still takes time in its pages: for the
   * work that is per page anyway, a CAS or a move per page).
   */
  *pagesWith(peer: string, pages: number): Generator<[number, Route]> {
    const n = this.peers.length;
    const at = this.peers.indexOf(peer);
    for (let page = 0; page < pages; page++) {
      const moved = this.moved.get(page);
      if (moved) {
        if (copiesOf(moved).includes(peer)) yield [page, moved];
      } else if (at >= 0 && (((at - page) % n) + n) % n < this.copyCount) {
        yield [page, this.placed(page)];
      }
    }
  }

  /**
   * pagesWith, only the pages that have another copy too (what a role handover, a step out of
   * the in-sync set or a copy's snapshot layers concern). With one copy per page by the rule only
   * a changed page can, so then the placed pages are not walked at all.
   */
  *sharedPagesWith(peer: string, pages: number): Generator<[number, Route]> {
    const shared = (r: Route): boolean => copiesOf(r).length > 1;
    if (this.copyCount > 1) {
      for (const x of this.pagesWith(peer, pages)) if (shared(x[1])) yield x;
      return;
    }
    yield* [...this.moved].filter(([page, r]) => page < pages && shared(r) && copiesOf(r).includes(peer)).sort((a, b) => a[0] - b[0]);
  }
}

/** Pages that share one route: an unchanged placement class, or one changed page. */
export interface RouteClass {
  route: Route;
  /** How many pages have the route. */
  pages: number;
  /** The lowest of them. */
  first: number;
}
