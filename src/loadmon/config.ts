// cluster.yaml `balancer:` section: every key optional, defaults in balancerDefaults.
//   balancer: { enabled: true, threshold: 0.25, intervalMs: 5000, cooldownMs: 120000,
//               maxMovesPerRound: 4, wVar: 1, wForward: 1, wChange: 0.01, minMeanLoad: 20, reserveFreeBytes: 536870912 }
// wForward weighs the forwarded share of the load (pages follow their hosts; 0: by load only).

import { InvalidArgumentError } from '../errors';
import { balancerMovesPerRoundMax } from '../limits';
import { balancerDefaults, type BalancerConfig } from './balancer';

type NumberKey = Exclude<keyof BalancerConfig, 'enabled'>;

/** Allowed range per numeric key: [min, max]. */
const ranges: Record<NumberKey, [number, number]> = {
  threshold: [0.01, 10],
  wVar: [0, 1e6],
  wForward: [0, 1e6],
  wChange: [0, 1e6],
  maxMovesPerRound: [1, balancerMovesPerRoundMax],
  cooldownMs: [0, 24 * 3600_000],
  intervalMs: [500, 3600_000],
  minMeanLoad: [0, 1e9],
  reserveFreeBytes: [0, Number.MAX_SAFE_INTEGER],
};

export function parseBalancerConfig(raw: unknown, where: string): BalancerConfig {
  if (raw === undefined || raw === null) return { ...balancerDefaults };
  if (typeof raw !== 'object' || Array.isArray(raw)) throw new InvalidArgumentError(`${where}: balancer must be a mapping (e.g. balancer: { enabled: true, threshold: 0.25 })`);
  const r = raw as Record<string, unknown>;
  const out: BalancerConfig = { ...balancerDefaults };
  for (const key of Object.keys(r)) {
    if (key === 'enabled') {
      if (typeof r.enabled !== 'boolean') throw new InvalidArgumentError(`${where}: balancer.enabled must be true or false`);
      out.enabled = r.enabled;
      continue;
    }
    const range = ranges[key as NumberKey];
    if (!range) throw new InvalidArgumentError(`${where}: unknown key balancer.${key} (known: enabled, ${Object.keys(ranges).join(', ')})`);
    const v = r[key];
    if (typeof v !== 'number' || !Number.isFinite(v) || v < range[0] || v > range[1]) {
      throw new InvalidArgumentError(`${where}: balancer.${key} must be a number from ${range[0]} to ${range[1]}, got ${JSON.stringify(v)}`);
    }
    if (key === 'maxMovesPerRound' && !Number.isInteger(v)) throw new InvalidArgumentError(`${where}: balancer.maxMovesPerRound must be a whole number`);
    out[key as NumberKey] = v;
  }
  return out;
}
