// Faults from outside, as an operator's kill -9 or a hung machine would be: the test watches a
// page move through a peer's admin API (GET /api/migrations, the console's view) and kills or
// stops a peer process when the move is where it wants it. Exact protocol points (between two
// steps of a move or of a snapshot) are the simulator's (test/sim); these tests check that real
// processes recover from a kill wherever it lands.

import { readFileSync } from 'node:fs';
import type { MoveInfo } from '../../src/migration/migrator';
import type { TestPeer } from './processes';

/** The peer's console address and the admin token, from the group's cluster.yaml. */
function adminOf(p: TestPeer): { base: string; token: string } {
  const yaml = readFileSync(p.config, 'utf8');
  const http = new RegExp(`id: ${p.id}, .*http: ([0-9.]+:\\d+)`).exec(yaml)?.[1];
  const token = /adminToken: (\S+)/.exec(yaml)?.[1];
  if (!http || !token) throw new Error(`no console address or admin token for ${p.id} in ${p.config}`);
  return { base: `http://${http}`, token };
}

/** The moves in flight on every peer that answers, as `via` sees them; [] if `via` does not answer. */
export async function movesSeenBy(via: TestPeer): Promise<MoveInfo[]> {
  const { base, token } = adminOf(via);
  try {
    const r = await fetch(`${base}/api/migrations`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(2_000) });
    return r.ok ? ((await r.json()) as { migrations: MoveInfo[] }).migrations : [];
  } catch {
    return [];
  }
}

/**
 * Watch the move of `page` through `via` (every 20 ms, at most `timeoutMs`) until `when` holds,
 * then SIGKILL `victim`; the move as seen just before the kill (undefined: never seen, and
 * nobody was killed). The victim's `exited` then settles with 'SIGKILL'.
 */
export async function killWhenMove(via: TestPeer, page: number, victim: TestPeer, when: (m: MoveInfo) => boolean, timeoutMs = 30_000): Promise<MoveInfo | undefined> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    const m = (await movesSeenBy(via)).find((x) => x.page === page);
    if (m && when(m)) {
      victim.process.kill('SIGKILL');
      return m;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return undefined;
}
