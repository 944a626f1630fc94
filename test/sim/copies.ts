// The simulator's checks of the copies of each page (issue 17, DESIGN.md 10), beside the host
// history's checks (checker.ts). Pure: plain data in, findings out; run.ts gathers the data once
// the group has settled.
//
// - The route history: every route record the catalog took (SimCatalog.routePuts, in commit
//   order). Per page the versions (epochs) strictly increase from the placed route's 1; in each
//   record the owner is the first copy and in the in-sync set, the in-sync set is a subset of the
//   copies, and the copies are distinct peers that were members of the group when it was written
//   (a spare that joins later is named only after it joined). Catalog.casRoute asserts as much
//   before it writes; this catches any other writer, and a catalog that lets two writers win.
//   And no record removes an in-sync copy while leaving the page fewer in-sync copies than it
//   had (or than its replicas, when it had more): a copy leaves (a drain's evacuation, a spread
//   hint, extra copies lowered) only once enough others are in sync (src/replication/rebuild.ts).
//   A primary dropping a copy that does not answer from the in-sync set keeps it as a copy, so
//   it is not judged here; nor is a lost peer's copy, which a run never has (downOutMs is 10 min).
// - Protection: once every peer is up and calm has lasted, every page has the copies its volume
//   asks for (min(replicas, peers)) and every copy is in sync (resync finished).
// - Convergence: then every in-sync copy's store (below the data path) holds the same blocks.
//   The blocks hosts never touched are zeros everywhere; run.ts reads the touched ones.

import { copiesOf, initialRouteVersion, inSyncOf, type Route } from '../../src/routing/table';
import { decodeBlock } from './history';

export type CopyInvariant = 'route-history' | 'protection-dropped' | 'under-replicated' | 'copies-diverge';

export interface CopyFinding {
  invariant: CopyInvariant;
  message: string;
}

/** One route record as the catalog committed it. */
export interface RoutePut {
  volumeId: string;
  page: number;
  route: Route;
  atMs: number;
}

/** What the route history is checked against. */
export interface RouteRules {
  /** Was `peer` a member of the group at true time `atMs`? */
  member(peer: string, atMs: number): boolean;
  /** Copies per page the volume asks for. */
  replicas: number;
  /** A page's route before its first record (the placement rule's; undefined: not judged). */
  placed(volumeId: string, page: number): Route | undefined;
}

export function checkRouteHistory(puts: readonly RoutePut[], rules: RouteRules): CopyFinding[] {
  const out: CopyFinding[] = [];
  const last = new Map<string, Route | undefined>();
  for (const p of puts) {
    const key = `${p.volumeId}/${p.page}`;
    const prev = last.has(key) ? last.get(key) : rules.placed(p.volumeId, p.page);
    const before = last.has(key) ? prev!.version : initialRouteVersion;
    const at = `page ${p.page} of volume ${p.volumeId} at ${p.atMs.toFixed(3)} ms: ${JSON.stringify(p.route)}`;
    if (!(p.route.version > before)) out.push({ invariant: 'route-history', message: `${at}: version ${p.route.version} after version ${before} (epochs must strictly increase)` });
    if (p.route.version >= before) last.set(key, p.route);
    const bad = routeFault(p.route, (peer) => rules.member(peer, p.atMs));
    if (bad) out.push({ invariant: 'route-history', message: `${at}: ${bad}` });
    const dropped = prev && protectionDropped(prev, p.route, rules.replicas);
    if (dropped) out.push({ invariant: 'protection-dropped', message: `${at}: ${dropped} (before: ${JSON.stringify(prev)})` });
  }
  return out;
}

/** What is wrong with one route record, if anything. */
export function routeFault(r: Route, member: (peer: string) => boolean): string | undefined {
  const copies = copiesOf(r);
  const inSync = inSyncOf(r);
  if (copies[0] !== r.owner) return `the owner ${r.owner} is not the first copy`;
  if (!inSync.includes(r.owner)) return `the owner ${r.owner} is not in sync`;
  if (new Set(copies).size !== copies.length) return `a peer holds two of the copies`;
  if (new Set(inSync).size !== inSync.length) return `a peer is twice in the in-sync set`;
  const outside = inSync.find((p) => !copies.includes(p));
  if (outside) return `${outside} is in sync but not a copy`;
  const stranger = copies.find((p) => !member(p));
  if (stranger) return `${stranger} was not a member of the group then`;
  return undefined;
}

/** An in-sync copy removed (gone from the copies) while fewer copies than before, or than `replicas`, stay in sync. */
export function protectionDropped(prev: Route, next: Route, replicas: number): string | undefined {
  const removed = inSyncOf(prev).filter((p) => !copiesOf(next).includes(p));
  const floor = Math.min(inSyncOf(prev).length, replicas);
  if (removed.length === 0 || inSyncOf(next).length >= floor) return undefined;
  return `in-sync ${removed.length === 1 ? 'copy' : 'copies'} on ${removed.join(', ')} removed with ${inSyncOf(next).length} in sync left (${inSyncOf(next).join(', ')}), ${floor} before`;
}

/** Pages (route per page, in page order) with fewer copies than `want`, or with copies not in sync. */
export function checkProtection(volume: string, routes: readonly Route[], want: number): CopyFinding[] {
  const out: CopyFinding[] = [];
  routes.forEach((r, page) => {
    const copies = copiesOf(r);
    const inSync = inSyncOf(r);
    if (copies.length < want) out.push({ invariant: 'under-replicated', message: `page ${page} of ${volume} has ${copies.length} copies (${copies.join(', ')}; v${r.version}), ${want} asked` });
    else if (inSync.length < copies.length) out.push({ invariant: 'under-replicated', message: `page ${page} of ${volume}: only ${inSync.join(', ')} of its copies ${copies.join(', ')} in sync (v${r.version})` });
  });
  return out;
}

/** Blocks [lba, lba + blocks) of one page as each of its in-sync copies' stores holds them. */
export interface CopiesHeld {
  page: number;
  lba: number;
  blocks: number;
  /** Peer → its store's bytes of the range; undefined: that copy could not be read (what went wrong). */
  held: ReadonlyMap<string, Buffer | string>;
}

/** Every copy equal to the first one: at most one finding per range (its first differing block, and how many differ). */
export function checkConvergence(c: CopiesHeld, blockBytes: number): CopyFinding[] {
  const entries = [...c.held];
  const unread = entries.filter(([, b]) => typeof b === 'string');
  if (unread.length > 0) return [{ invariant: 'copies-diverge', message: `page ${c.page}, blocks ${c.lba}+${c.blocks}: ${unread.map(([p, why]) => `${p}'s copy could not be read (${why as string})`).join('; ')}` }];
  const [[first, a], ...rest] = entries as [string, Buffer][];
  const out: CopyFinding[] = [];
  for (const [peer, b] of rest) {
    const differ: number[] = [];
    for (let i = 0; i < c.blocks; i++) if (!a.subarray(i * blockBytes, (i + 1) * blockBytes).equals(b.subarray(i * blockBytes, (i + 1) * blockBytes))) differ.push(i);
    if (differ.length === 0) continue;
    const i = differ[0];
    const lba = c.lba + i;
    const what = (buf: Buffer): string => describeBlock(buf.subarray(i * blockBytes, (i + 1) * blockBytes), lba);
    out.push({ invariant: 'copies-diverge', message: `page ${c.page}: in-sync copies ${first} and ${peer} differ on ${differ.length} of blocks ${c.lba}+${c.blocks}; first at lba ${lba}: ${first} holds ${what(a)}, ${peer} holds ${what(b)}` });
  }
  return out;
}

function describeBlock(block: Buffer, lba: number): string {
  const seen = decodeBlock(block, lba);
  return seen === 0 ? 'zeros' : seen === 'garbage' ? 'garbage' : `write #${seen}`;
}
