// SendTargets (RFC 7143 appendix C): which targets an initiator may see, and where.

import type { TargetDirectory, TargetInfo } from './target';
import type { TextPairs } from './text';

function describe(directory: TargetDirectory, target: TargetInfo): TextPairs {
  const pairs: TextPairs = [['TargetName', target.name]];
  for (const address of directory.portalAddresses) {
    pairs.push(['TargetAddress', `${address},${directory.portalGroupTag}`]);
  }
  return pairs;
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
    if (value === '' || value === sessionTarget.name) return describe(directory, sessionTarget);
    if (value === 'All') return [['SendTargets', 'Reject']];
    return [];
  }
  const visible = directory.visibleTo(initiatorName);
  const chosen = value === 'All' ? visible : visible.filter((t) => t.name === value);
  return chosen.flatMap((t) => describe(directory, t));
}
