// A volume's page routing table (DESIGN.md 2, 3): page → {owner, version}. Placement is a
// rule plus exceptions: page i of a volume placed on peers [a, b, c] starts on
// peers[i % 3] at version 1, and the catalog stores a route record only for pages whose
// owner changed since (a move commits {owner, version + 1} by compare-and-swap). So a
// 64 TiB volume needs no per-page records until its pages move. Pure: no I/O.

export interface Route {
  owner: string;
  version: number;
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
  constructor(
    readonly peers: readonly string[],
    readonly pageBlocks: number,
    /** page → route for pages that moved; shared with the catalog's in-memory copy. */
    private readonly moved: Map<number, Route>,
  ) {
    if (peers.length === 0) throw new Error('assertion failed: a volume is placed on at least one peer');
  }

  route(page: number): Route {
    return this.moved.get(page) ?? { owner: this.peers[page % this.peers.length], version: initialRouteVersion };
  }

  /** Take a route heard from the catalog or from an owner's MOVED answer if it is newer. */
  learn(page: number, route: Route): boolean {
    if (route.version <= this.route(page).version) return false;
    this.moved.set(page, { owner: route.owner, version: route.version });
    return true;
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

  /** Owner of every page of a volume of `blockCount` blocks, in page order. */
  owners(blockCount: number): Route[] {
    const pages = Math.ceil(blockCount / this.pageBlocks);
    return Array.from({ length: pages }, (_, page) => this.route(page));
  }
}
