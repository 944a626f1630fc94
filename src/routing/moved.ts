// "This peer does not own that page (any more)": raised by an owner's store wrapper
// (src/migration/movable.ts) for a request routed just before a move committed, and by the
// router for a MOVED answer from another peer. The router learns the route and re-runs.

import { PeersanError } from '../errors';
import type { Route } from './table';

export class PageMovedError extends PeersanError {
  constructor(
    readonly page: number,
    readonly route: Route,
  ) {
    super(`page ${page} moved to ${route.owner} v${route.version}`, 'PEERSAN_ERR_PAGE_MOVED');
    this.name = 'PageMovedError';
  }
}
