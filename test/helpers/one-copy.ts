// The replication wiring of a data path built alone in a unit test (no peer around it): no
// activity log, no leases or takeovers. Enough for volumes of one copy, and for tests that
// replace one part with their own fake.

import type { ChangeTracker, PrimaryGuard } from '../../src/replication/hooks';

export const passThroughTracker: ChangeTracker = {
  beforeChange: () => undefined,
  changed: () => {},
  resyncing: () => [],
};

export const passThroughGuard: PrimaryGuard = {
  run: (_volumeId, _page, _route, _read, op) => op(),
};
