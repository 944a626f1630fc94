// Negative controls (DESIGN.md 12): protocol variants with a known bug, kept in the test tree.
// Each must be caught by the simulator within a bounded number of seeds: the proof that the
// invariants can fail. `npm run sim -- --control NAME`.

import type { PeerProtocols } from '../../src/server/compose';

export interface Control {
  /** The bug, in a sentence, and which invariant must catch it. */
  bug: string;
  protocols: Partial<PeerProtocols>;
}

export const controls = new Map<string, Control>();
