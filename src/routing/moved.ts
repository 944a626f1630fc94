// "This peer does not own that page (any more)": raised by an owner's store wrapper
// (src/migration/movable.ts) for a request routed just before a move committed, and by the
// router for a MOVED answer from another peer. The router learns the route and re-runs.
// One that escapes (every retry used up: the route is still in flux) is BUSY to the host.

import { ErrorKind, PeersanError } from '../errors';
import type { Route } from './table';

export class PageMovedError extends PeersanError {
  constructor(
    readonly page: number,
    readonly route: Route,
  ) {
    super(`page ${page} moved to ${route.owner} v${route.version}`, 'PEERSAN_ERR_PAGE_MOVED', { kind: ErrorKind.busy });
    this.name = 'PageMovedError';
  }
}
