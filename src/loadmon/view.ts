// The group-wide load view every peer keeps (DESIGN.md 5: no leader): the latest summary of
// each peer, its own included, and when it arrived. A peer not heard from for loadStaleMs is
// shown stale and left out of balancing. Summaries from other peers are bounded and cleaned
// here before they are kept (they come off the wire). Pure: time is passed in.

import {
  loadForwardedPagesPerVolume, loadHostsPerSummaryMax, loadHottestPagesPerVolume, loadRecentMovesMax, loadStaleMs, loadVolumesPerSummaryMax,
} from '../limits';
import { loadOf, sumStats, zeroStats, type LoadStats } from './ewma';
import type { HostLoad, LoadSummary, PageArrival, RecentMove } from './monitor';

export interface PeerLoadView {
  id: string;
  /** Never heard from, or not for loadStaleMs. */
  stale: boolean;
  /** Since the last summary arrived; -1 when none ever did. */
  ageMs: number;
  owner: LoadStats;
  received: LoadStats;
  /** The balancer's figure for `owner` (10 s window: iops + bytes/s ÷ 64 KiB). */
  load: number;
  sessions: number;
  freeBytes: number;
  totalBytes: number;
  allocatedBytes: number;
}

export interface PageLoadView {
  page: number;
  /** The peer that reported it (the page's owner when it was measured). */
  peer: string;
  stats: LoadStats;
  load: number;
  /** Of `load`, what arrived through the reporting peer's own portal (absent: 0). */
  local?: number;
}

/** A page's load that arrived through `peer`'s portal and was forwarded to its owner. */
export interface ForwardedLoadView {
  page: number;
  peer: string;
  load: number;
}

export interface VolumeLoadView {
  volumeId: string;
  volumeName: string;
  /** Summed over the fresh peers. */
  owner: LoadStats;
  load: number;
  pages: PageLoadView[];
  /** Arrivals forwarded from other peers, of the pages in `pages` only (the traffic matrix's other half). */
  forwarded?: ForwardedLoadView[];
}

export interface HostLoadView extends HostLoad {
  peer: string;
  load: number;
}

/** A move as the view knows it: when it was started, by this receiver's clock. */
export interface KnownMove {
  volumeId: string;
  page: number;
  from: string;
  to: string;
  atMs: number;
  /** moving, done or failed (as the moving peer last said). */
  state: string;
}

/** What `peersan top` shows and the balancer plans with. */
export interface GroupLoadView {
  self: string;
  peers: PeerLoadView[];
  volumes: VolumeLoadView[];
  hosts: HostLoadView[];
  recentMoves: KnownMove[];
}

interface Heard {
  summary: LoadSummary;
  atMs: number;
}

export class GroupView {
  private readonly self: string;
  /** The group's peers now (members join and leave while it runs). */
  private readonly peers: () => readonly string[];
  private readonly staleMs: number;
  private readonly heard = new Map<string, Heard>();

  constructor(self: string, peers: readonly string[] | (() => readonly string[]), staleMs = loadStaleMs) {
    this.self = self;
    this.peers = typeof peers === 'function' ? peers : () => peers;
    this.staleMs = staleMs;
  }

  /**
   * Keep a peer's summary. False when it is not kept: from a peer outside the group, or
   * older than the one already held (gossip calls may overtake each other).
   */
  put(summary: LoadSummary, nowMs: number): boolean {
    if (!this.peers().includes(summary.peerId)) return false;
    const held = this.heard.get(summary.peerId);
    // A restarted peer counts from 1 again: accept a lower seq once the held one went stale.
    if (held && summary.seq <= held.summary.seq && nowMs - held.atMs < this.staleMs) return false;
    this.heard.set(summary.peerId, { summary: cleanSummary(summary), atMs: nowMs });
    return true;
  }

  isStale(peerId: string, nowMs: number): boolean {
    const h = this.heard.get(peerId);
    return !h || nowMs - h.atMs >= this.staleMs;
  }

  /** The view now: each volume's `hottestPages`, and at most `pagesMax` pages in all (hottest volumes first). */
  snapshot(nowMs: number, hottestPages = loadHottestPagesPerVolume, pagesMax = Number.MAX_SAFE_INTEGER): GroupLoadView {
    const peers = this.peers().map((id): PeerLoadView => {
      const h = this.heard.get(id);
      const s = h?.summary;
      const owner = s?.owner ?? zeroStats();
      return {
        id, stale: this.isStale(id, nowMs), ageMs: h ? nowMs - h.atMs : -1, owner, received: s?.received ?? zeroStats(), load: loadOf(owner),
        sessions: s?.sessions ?? 0, freeBytes: s?.freeBytes ?? 0, totalBytes: s?.totalBytes ?? 0, allocatedBytes: s?.allocatedBytes ?? 0,
      };
    });
    const fresh = [...this.heard.entries()].filter(([id]) => !this.isStale(id, nowMs));
    return { self: this.self, peers, volumes: mergeVolumes(fresh, hottestPages, pagesMax), hosts: mergeHosts(fresh), recentMoves: this.moves(nowMs) };
  }

  /** Moves any peer (fresh or not) reported, newest report wins per page. */
  moves(nowMs: number): KnownMove[] {
    const byPage = new Map<string, KnownMove>();
    for (const [from, h] of this.heard) {
      for (const m of h.summary.recentMoves) {
        const atMs = h.atMs - m.agoMs;
        const key = `${m.volumeId}/${m.page}`;
        const known = byPage.get(key);
        if (!known || known.atMs < atMs) byPage.set(key, { volumeId: m.volumeId, page: m.page, from, to: m.to, atMs, state: m.state });
      }
    }
    return [...byPage.values()].filter((m) => m.atMs <= nowMs).sort((a, b) => b.atMs - a.atMs);
  }
}

function mergeVolumes(fresh: [string, Heard][], hottestPages: number, pagesMax: number): VolumeLoadView[] {
  const byId = new Map<string, { name: string; owners: LoadStats[]; pages: PageLoadView[]; forwarded: ForwardedLoadView[] }>();
  for (const [peer, h] of fresh) {
    for (const v of h.summary.volumes) {
      let e = byId.get(v.volumeId);
      if (!e) byId.set(v.volumeId, (e = { name: v.volumeName, owners: [], pages: [], forwarded: [] }));
      e.owners.push(v.owner);
      for (const p of v.pages) e.pages.push({ page: p.page, peer, stats: p.stats, load: loadOf(p.stats), local: p.local ?? 0 });
      for (const f of v.forwarded ?? []) e.forwarded.push({ page: f.page, peer, load: f.load });
    }
  }
  const volumes = [...byId.entries()]
    .map(([volumeId, e]): VolumeLoadView => {
      const owner = sumStats(e.owners);
      const pages = e.pages.sort((a, b) => b.load - a.load || a.page - b.page).slice(0, hottestPages);
      return { volumeId, volumeName: e.name, owner, load: loadOf(owner), pages, forwarded: e.forwarded };
    })
    .sort((a, b) => b.load - a.load || a.volumeName.localeCompare(b.volumeName));
  let left = pagesMax;
  for (const v of volumes) {
    v.pages = v.pages.slice(0, Math.max(0, left));
    left -= v.pages.length;
    // Only the kept pages' arrivals: the balancer weighs no other, and so the view stays bounded.
    const kept = new Set(v.pages.map((p) => p.page));
    v.forwarded = (v.forwarded ?? []).filter((f) => kept.has(f.page)).sort((a, b) => a.page - b.page || a.peer.localeCompare(b.peer));
  }
  return volumes;
}

function mergeHosts(fresh: [string, Heard][]): HostLoadView[] {
  return fresh
    .flatMap(([peer, h]) => h.summary.hosts.map((x): HostLoadView => ({ ...x, peer, load: loadOf(x.stats) })))
    .sort((a, b) => Number(a.ended) - Number(b.ended) || b.load - a.load || a.initiatorPort.localeCompare(b.initiatorPort));
}

// ---- cleaning what came off the wire -----------------------------------------------------

function num(v: unknown): number {
  const n = Number(v);
  return Number.isFinite(n) && n >= 0 ? n : 0;
}

function triple(v: unknown): number[] {
  const a = Array.isArray(v) ? v : [];
  return [num(a[0]), num(a[1]), num(a[2])];
}

export function cleanStats(s: Partial<LoadStats> | undefined): LoadStats {
  return {
    iops: triple(s?.iops), bytesPerSec: triple(s?.bytesPerSec), latencyMs: triple(s?.latencyMs),
    outstandingAvg: triple(s?.outstandingAvg), outstanding: num(s?.outstanding),
  };
}

const text = (v: unknown, max = 256): string => String(v ?? '').slice(0, max);
const list = <T>(v: unknown, max: number): T[] => (Array.isArray(v) ? (v.slice(0, max) as T[]) : []);

/** Bound every list and replace every malformed number by 0, so a bad summary cannot grow memory or poison sums. */
export function cleanSummary(s: LoadSummary): LoadSummary {
  return {
    peerId: text(s.peerId, 64), seq: num(s.seq), owner: cleanStats(s.owner), received: cleanStats(s.received),
    sessions: num(s.sessions), freeBytes: num(s.freeBytes), totalBytes: num(s.totalBytes), allocatedBytes: num(s.allocatedBytes),
    volumes: list<LoadSummary['volumes'][number]>(s.volumes, loadVolumesPerSummaryMax).map((v) => ({
      volumeId: text(v.volumeId, 64), volumeName: text(v.volumeName, 64), owner: cleanStats(v.owner), pagesTracked: num(v.pagesTracked),
      pages: list<LoadSummary['volumes'][number]['pages'][number]>(v.pages, loadHottestPagesPerVolume).map((p) => ({ page: Math.floor(num(p.page)), stats: cleanStats(p.stats), local: num(p.local) })),
      forwarded: list<PageArrival>(v.forwarded, loadForwardedPagesPerVolume).map((f) => ({ page: Math.floor(num(f.page)), load: num(f.load) })),
    })),
    hosts: list<HostLoad>(s.hosts, loadHostsPerSummaryMax).map((h) => ({ initiatorPort: text(h.initiatorPort), targetName: text(h.targetName), ended: h.ended === true, stats: cleanStats(h.stats) })),
    recentMoves: list<RecentMove>(s.recentMoves, loadRecentMovesMax).map((m) => ({ volumeId: text(m.volumeId, 64), page: Math.floor(num(m.page)), to: text(m.to, 64), agoMs: num(m.agoMs), state: text(m.state, 16) })),
  };
}
