// One peer's load monitor (DESIGN.md 5): meters per page this peer serves as owner, per host
// session that sends commands to this peer, per volume and for the peer itself, and the
// bounded summary it gossips. Pure apart from the clock the caller passes in.
//
// Memory is bounded: at most loadPagesTrackedMax pages and loadHostsTrackedMax sessions are
// metered (more pages count only in the volume and peer totals); a page or ended session
// without I/O for loadEntryIdleMs is dropped at the next tick; a summary carries only each
// volume's loadHottestPagesPerVolume hottest pages.
//
// The traffic matrix (pages follow their hosts): the router of the peer a host is logged in to
// reports every run of a host request as it routes it (VolumeMeter.arrived), local or forwarded
// to the page's owner. Each peer meters its own arrivals per page, apart from what it serves as
// owner, and its summary carries both halves: with each hot page it owns, the part that arrived
// through its own portal (`local`); per volume, the pages it forwarded most (`forwarded`). So
// every peer's view has, for each hot page, its load by receiving peer. Bounded like the owner
// meters: loadArrivalPagesTrackedMax pages, idle ones dropped, loadForwardedPagesPerVolume and
// loadSummaryForwardedMax in a summary.

import {
  loadArrivalPagesTrackedMax, loadForwardedPagesPerVolume, loadSummaryForwardedMax, loadEntryIdleMs, loadHostsPerSummaryMax, loadHostsTrackedMax, loadHottestPagesPerVolume, loadPagesTrackedMax, loadRecentMovesMax, loadSummaryPagesMax, loadVolumesPerSummaryMax,
} from '../limits';
import type { Clock } from '../env/env';
import type { Nexus } from '../scsi/types';
import { LoadMeter, type LoadStats } from './ewma';

export interface PageLoad {
  page: number;
  stats: LoadStats;
  /** Of its load, what arrived through this peer's own portal (balancer figure, 10 s window); absent: 0. */
  local?: number;
}

/** A page's load that arrived through this peer's portal and was forwarded to its owner (balancer figure). */
export interface PageArrival {
  page: number;
  load: number;
}

export interface VolumeLoad {
  volumeId: string;
  volumeName: string;
  /** Everything this peer served for the volume as page owner. */
  owner: LoadStats;
  /** Pages metered on this peer (the summary carries only the hottest). */
  pagesTracked: number;
  pages: PageLoad[];
  /** The pages this peer forwarded most to their owners (absent: none). */
  forwarded?: PageArrival[];
}

export interface HostLoad {
  /** "<InitiatorName>,i,0x<ISID>": one initiator port. */
  initiatorPort: string;
  targetName: string;
  ended: boolean;
  stats: LoadStats;
}

/** A page move a peer started, as gossiped (the age, not a clock reading, crosses peers). */
export interface RecentMove {
  volumeId: string;
  page: number;
  to: string;
  agoMs: number;
  /** moving, done or failed. */
  state: string;
}

/** What one peer gossips each tick. Field names match LoadSummary in proto/peersan.proto. */
export interface LoadSummary {
  peerId: string;
  /** Increases with every summary of this peer's run (older ones arriving late are ignored). */
  seq: number;
  /** Served as page owner (local and forwarded requests). */
  owner: LoadStats;
  /** Commands received from hosts on this peer's portal. */
  received: LoadStats;
  sessions: number;
  freeBytes: number;
  totalBytes: number;
  allocatedBytes: number;
  volumes: VolumeLoad[];
  hosts: HostLoad[];
  recentMoves: RecentMove[];
}

export interface PeerFacts {
  sessions: number;
  freeBytes: number;
  totalBytes: number;
  allocatedBytes: number;
}

/**
 * The meters of one volume on one peer. The metered backend resolves it once and calls
 * begin/end per request, so the hot path costs two clock reads and a map lookup per page.
 */
/** One page's arrivals at this peer's portal: served here (this peer owned it) or forwarded. */
export interface ArrivalMeters {
  local: LoadMeter;
  forwarded: LoadMeter;
}

export class VolumeMeter {
  readonly volumeId: string;
  volumeName: string;
  readonly meter: LoadMeter;
  readonly pages = new Map<number, LoadMeter>();
  readonly arrivals = new Map<number, ArrivalMeters>();
  private readonly monitor: LoadMonitor;
  private readonly pageBlocks: number;

  constructor(monitor: LoadMonitor, volumeId: string, volumeName: string, pageBlocks: number, nowMs: number) {
    this.monitor = monitor;
    this.volumeId = volumeId;
    this.volumeName = volumeName;
    this.pageBlocks = pageBlocks;
    this.meter = new LoadMeter(nowMs);
  }

  /** A request for `blocks` blocks at `lba` starts; returns its start time for end(). */
  begin(lba: number, blocks: number): number {
    const now = this.monitor.clock.monotonicMs();
    this.monitor.owner.begin(now);
    this.meter.begin(now);
    this.eachPage(lba, blocks, (page) => this.page(page, now), (m, weight) => m.begin(now, weight));
    return now;
  }

  /** The request begun at `startMs` completed; `bytes` of data moved (0 for unmap). */
  end(lba: number, blocks: number, startMs: number, bytes: number): void {
    const now = this.monitor.clock.monotonicMs();
    this.monitor.owner.end(startMs, now, bytes);
    this.meter.end(startMs, now, bytes);
    // A request that spans pages counts for each page by its share of the blocks.
    this.eachPage(lba, blocks, (page) => this.page(page, now), (m, weight) => m.end(startMs, now, bytes * weight, weight));
  }

  /**
   * A run of a host request arrived through this peer's portal (the router's hook, as it routes
   * the run): `local` when this peer owns its pages, else forwarded to their owner.
   */
  arrived(lba: number, blocks: number, local: boolean, bytes: number): void {
    const now = this.monitor.clock.monotonicMs();
    this.eachPage(lba, blocks, (page) => this.arrival(page, now), (a, weight) => (local ? a.local : a.forwarded).record(now, bytes * weight, weight));
  }

  private eachPage<T>(lba: number, blocks: number, get: (page: number) => T | undefined, fn: (m: T, weight: number) => void): void {
    const pb = this.pageBlocks;
    const first = Math.floor(lba / pb);
    const count = Math.max(blocks, 1);
    const last = Math.floor((lba + count - 1) / pb);
    if (first === last) {
      const m = get(first);
      if (m) fn(m, 1);
      return;
    }
    for (let page = first; page <= last; page++) {
      const from = Math.max(lba, page * pb);
      const to = Math.min(lba + count, (page + 1) * pb);
      const m = get(page);
      if (m) fn(m, (to - from) / count);
    }
  }

  private arrival(page: number, nowMs: number): ArrivalMeters | undefined {
    const a = this.arrivals.get(page);
    if (a) return a;
    if (!this.monitor.admitArrival()) return undefined;
    const fresh = { local: new LoadMeter(nowMs), forwarded: new LoadMeter(nowMs) };
    this.arrivals.set(page, fresh);
    return fresh;
  }

  private page(page: number, nowMs: number): LoadMeter | undefined {
    const m = this.pages.get(page);
    if (m) return m;
    if (!this.monitor.admitPage()) return undefined;
    const fresh = new LoadMeter(nowMs);
    this.pages.set(page, fresh);
    return fresh;
  }
}

interface HostEntry {
  initiatorPort: string;
  targetName: string;
  ended: boolean;
  meter: LoadMeter;
}

export interface LoadMonitorOptions {
  self: string;
  /** The environment's clock; meters run on its monotonic milliseconds. */
  clock: Clock;
  pagesTrackedMax?: number;
  arrivalPagesTrackedMax?: number;
  hostsTrackedMax?: number;
  hottestPagesPerVolume?: number;
  entryIdleMs?: number;
}

export class LoadMonitor {
  readonly self: string;
  readonly clock: Clock;
  /** Served as page owner, all volumes. */
  readonly owner: LoadMeter;
  /** Received from hosts on this peer's portal, all sessions. */
  readonly received: LoadMeter;
  private readonly volumes = new Map<string, VolumeMeter>();
  /** Keyed by the session's Nexus object (one per session, passed by reference with every command). */
  private readonly hostsByNexus = new WeakMap<Nexus, HostEntry>();
  private readonly hosts = new Set<HostEntry>();
  private pagesTracked = 0;
  private arrivalPagesTracked = 0;
  /** Requests whose page could not be metered because the page table was full (counted once per page touch). */
  pagesRefused = 0;
  private seq = 0;
  private readonly pagesTrackedMax: number;
  private readonly arrivalPagesTrackedMax: number;
  private readonly hostsTrackedMax: number;
  private readonly hottestPagesPerVolume: number;
  private readonly entryIdleMs: number;

  constructor(opts: LoadMonitorOptions) {
    this.self = opts.self;
    this.clock = opts.clock;
    const now = opts.clock.monotonicMs();
    this.owner = new LoadMeter(now);
    this.received = new LoadMeter(now);
    this.pagesTrackedMax = opts.pagesTrackedMax ?? loadPagesTrackedMax;
    this.arrivalPagesTrackedMax = opts.arrivalPagesTrackedMax ?? loadArrivalPagesTrackedMax;
    this.hostsTrackedMax = opts.hostsTrackedMax ?? loadHostsTrackedMax;
    this.hottestPagesPerVolume = opts.hottestPagesPerVolume ?? loadHottestPagesPerVolume;
    this.entryIdleMs = opts.entryIdleMs ?? loadEntryIdleMs;
  }

  /** The meters of a volume (created on first use; the same object for the volume's life). */
  volume(volumeId: string, volumeName: string, pageBlocks: number): VolumeMeter {
    let v = this.volumes.get(volumeId);
    if (!v) this.volumes.set(volumeId, (v = new VolumeMeter(this, volumeId, volumeName, pageBlocks, this.clock.monotonicMs())));
    return v;
  }

  /** The balancer's load figure of a page this peer serves as owner (0 when not metered: no recent I/O, or past the bound). */
  pageLoad(volumeId: string, page: number): number {
    return this.volumes.get(volumeId)?.pages.get(page)?.load() ?? 0;
  }

  /** Forget volumes that are gone (deleted from the catalog). */
  retainVolumes(ids: ReadonlySet<string>): void {
    for (const [id, v] of this.volumes) {
      if (ids.has(id)) continue;
      this.pagesTracked -= v.pages.size;
      this.arrivalPagesTracked -= v.arrivals.size;
      this.volumes.delete(id);
    }
  }

  /** Called by a VolumeMeter before it meters a new page. */
  admitPage(): boolean {
    if (this.pagesTracked >= this.pagesTrackedMax) {
      this.pagesRefused++;
      return false;
    }
    this.pagesTracked++;
    return true;
  }

  /** Called by a VolumeMeter before it meters a new page's arrivals. */
  admitArrival(): boolean {
    if (this.arrivalPagesTracked >= this.arrivalPagesTrackedMax) return false;
    this.arrivalPagesTracked++;
    return true;
  }

  get arrivalPagesTrackedCount(): number {
    return this.arrivalPagesTracked;
  }

  get pagesTrackedCount(): number {
    return this.pagesTracked;
  }

  get hostsTrackedCount(): number {
    return this.hosts.size;
  }

  // ---- host sessions (the receiving side) --------------------------------------------------

  /** A command from this session starts; returns its start time for hostEnd(). */
  hostBegin(nexus: Nexus): number {
    const now = this.clock.monotonicMs();
    this.received.begin(now);
    this.host(nexus, now)?.meter.begin(now);
    return now;
  }

  hostEnd(nexus: Nexus, startMs: number, bytes: number): void {
    const now = this.clock.monotonicMs();
    this.received.end(startMs, now, bytes);
    this.hostsByNexus.get(nexus)?.meter.end(startMs, now, bytes);
  }

  /** The session is gone: its entry stays (marked ended) until it has been idle long enough. */
  hostEnded(nexus: Nexus): void {
    const h = this.hostsByNexus.get(nexus);
    if (h) h.ended = true;
  }

  private host(nexus: Nexus, nowMs: number): HostEntry | undefined {
    const h = this.hostsByNexus.get(nexus);
    if (h) return h;
    if (this.hosts.size >= this.hostsTrackedMax) return undefined;
    const targetName = nexus.targetPort.replace(/,t,0x[0-9a-f]+$/i, '');
    const fresh: HostEntry = { initiatorPort: nexus.initiatorPort, targetName, ended: false, meter: new LoadMeter(nowMs) };
    this.hostsByNexus.set(nexus, fresh);
    this.hosts.add(fresh);
    return fresh;
  }

  // ---- tick and summary --------------------------------------------------------------------

  /** Fold every meter and drop idle entries. Call once per loadTickMs. */
  tick(): void {
    const now = this.clock.monotonicMs();
    this.owner.fold(now);
    this.received.fold(now);
    for (const v of this.volumes.values()) {
      v.meter.fold(now);
      for (const [page, m] of v.pages) {
        m.fold(now);
        if (m.idleFor(now, this.entryIdleMs)) {
          v.pages.delete(page);
          this.pagesTracked--;
        }
      }
      for (const [page, a] of v.arrivals) {
        a.local.fold(now);
        a.forwarded.fold(now);
        if (a.local.idleFor(now, this.entryIdleMs) && a.forwarded.idleFor(now, this.entryIdleMs)) {
          v.arrivals.delete(page);
          this.arrivalPagesTracked--;
        }
      }
    }
    for (const h of this.hosts) {
      h.meter.fold(now);
      // A live session stays however idle it is (the view lists sessions); an ended one goes when idle.
      if (h.ended && h.meter.idleFor(now, this.entryIdleMs)) this.hosts.delete(h);
    }
  }

  /** This peer's summary: totals, per volume the hottest pages, per host session. */
  summary(facts: PeerFacts, recentMoves: RecentMove[] = []): LoadSummary {
    let pagesLeft = loadSummaryPagesMax;
    let forwardedLeft = loadSummaryForwardedMax;
    const volumes = [...this.volumes.values()]
      .sort((a, b) => b.meter.load() - a.meter.load() || a.volumeId.localeCompare(b.volumeId))
      .slice(0, loadVolumesPerSummaryMax)
      .map((v): VolumeLoad => ({
        volumeId: v.volumeId,
        volumeName: v.volumeName,
        owner: v.meter.stats(),
        pagesTracked: v.pages.size,
        pages: hottest(v.pages, Math.min(this.hottestPagesPerVolume, pagesLeft)).map(([page, m]) => {
          pagesLeft--;
          return { page, stats: m.stats(), local: v.arrivals.get(page)?.local.load() ?? 0 };
        }),
        forwarded: mostForwarded(v.arrivals, Math.min(loadForwardedPagesPerVolume, forwardedLeft)).map((a) => {
          forwardedLeft--;
          return a;
        }),
      }));
    const hosts = [...this.hosts]
      .sort((a, b) => Number(a.ended) - Number(b.ended) || b.meter.load() - a.meter.load())
      .slice(0, loadHostsPerSummaryMax)
      .map((h): HostLoad => ({ initiatorPort: h.initiatorPort, targetName: h.targetName, ended: h.ended, stats: h.meter.stats() }));
    return {
      peerId: this.self, seq: ++this.seq, owner: this.owner.stats(), received: this.received.stats(),
      sessions: facts.sessions, freeBytes: facts.freeBytes, totalBytes: facts.totalBytes, allocatedBytes: facts.allocatedBytes,
      volumes, hosts, recentMoves: recentMoves.slice(0, loadRecentMovesMax),
    };
  }
}

/** The n pages with the most forwarded load, most first (ties by page number). */
function mostForwarded(arrivals: Map<number, ArrivalMeters>, n: number): PageArrival[] {
  const all: PageArrival[] = [];
  for (const [page, a] of arrivals) {
    const load = a.forwarded.load();
    if (load > 0) all.push({ page, load });
  }
  all.sort((a, b) => b.load - a.load || a.page - b.page);
  return all.slice(0, n);
}

/** The n entries with the highest load, hottest first (ties by page number). */
function hottest(pages: Map<number, LoadMeter>, n: number): [number, LoadMeter][] {
  const all = [...pages.entries()].filter(([, m]) => m.load() > 0 || m.outstanding > 0);
  all.sort((a, b) => b[1].load() - a[1].load() || a[0] - b[0]);
  return all.slice(0, n);
}
