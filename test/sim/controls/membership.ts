// Negative control for membership (issue 18, DESIGN.md 11): a CopyKeeper variant with one known
// bug that the simulator must catch (npm run sim -- --control early-evacuation). It reaches a
// peer through composePeer's `protocols.keeper` and overrides one step of the real class.

import { copiesOf } from '../../../src/routing/table';
import { CopyKeeper, type CopyDecision } from '../../../src/replication/rebuild';

/**
 * An evacuation that counts copies instead of in-sync copies: a leaving copy (a draining peer's,
 * or one a capacity hint moves to a joined spare) is removed as soon as its replacement is ADDED,
 * stale and still empty, in the same compare-and-swap, not once it is in sync. The page then has
 * fewer in-sync copies than before until resync fills the new one: a crash of the primary
 * meanwhile leaves nobody to take over, and a latent error nobody to read from. Must catch it: the
 * route history's protection-dropped check (copies.ts), on the first drain of a page of 2 copies.
 */
export class EarlyEvacuation extends CopyKeeper {
  protected override decide(...args: Parameters<CopyKeeper['decide']>): CopyDecision {
    const d = super.decide(...args);
    const [route, wanted, , , , leaving] = args;
    const copies = copiesOf(route);
    const staying = copies.filter((p) => !leaving?.has(p)).length + d.add.length;
    const early = staying >= Math.max(1, wanted) ? copies.filter((p) => p !== route.owner && leaving?.has(p) && !d.remove.includes(p)) : [];
    return early.length > 0 ? { ...d, remove: [...d.remove, ...early], why: 'evacuate' } : d;
  }
}
