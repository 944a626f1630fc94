// SendTargets (RFC 7143 appendix C): which targets an initiator may see, and where.

import type { TargetDirectory, TargetInfo } from './target';
import type { TextPairs } from './text';

/** Every portal a target is reached through: this portal's addresses first, then the other peers' (one TargetAddress each). */
function addresses(directory: TargetDirectory): string[] {
  const own = directory.portalAddresses.map((address) => `${address},${directory.portalGroupTag}`);
  const others = (directory.otherPortals?.() ?? []).map((p) => `${p.address},${p.groupTag}`);
  return [...own, ...others];
}

function describe(target: TargetInfo, addresses: readonly string[]): TextPairs {
  return [['TargetName', target.name], ...addresses.map((a): [string, string] => ['TargetAddress', a])];
}

/**
 * The answer to SendTargets=<value>. In a discovery session `All` lists every target the
 * initiator may see; in a normal session only the session's own target may be asked about
 * (an empty value or its name).
 */
export function sendTargetsAnswer(
  directory: TargetDirectory,
  initiatorName: string,
  value: string,
  sessionTarget: TargetInfo | undefined,
): TextPairs {
  if (sessionTarget) {
    if (value === '' || value === sessionTarget.name) return describe(sessionTarget, addresses(directory));
    if (value === 'All') return [['SendTargets', 'Reject']];
    return [];
  }
  const visible = directory.visibleTo(initiatorName);
  const chosen = value === 'All' ? visible : visible.filter((t) => t.name === value);
  const listed = addresses(directory);
  return chosen.flatMap((t) => describe(t, listed));
}
