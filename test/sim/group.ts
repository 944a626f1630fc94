// A simulated peer group: N peers built by the production composition root (composePeer) on
// simulated disks, catalog and network, hosts writing and reading through any peer, an
// administrator moving pages, taking snapshots, draining and undraining peers and letting a
// spare join, and the faults of the seed. The membership is one SimMembers (members.ts) every
// peer shares; a spare is a peer of the simulation that is not a member (not started, nothing
// placed on it) until join().
//
// A run has three phases:
// 1. faults: hosts and admin actions run while the fault schedule crashes and restarts peers
//    (some kept down past the faults), partitions peers from each other and from the catalog
//    (or one peer from both at once), loses, delays and duplicates messages, stalls disks and
//    skews clocks;
// 2. calm: faults stop (partitions healed, every peer restarted, disks fast), hosts go on for a
//    while, then stop; the group must converge: every move ends, every peer's routes agree with
//    the catalog, every page has its copies in sync, every host command ends;
// 3. check: the route history and the copies of every page are checked (copies.ts), every block
//    hosts touched is read back through every peer, every snapshot that was taken is read, and
//    the history goes through the checker (checker.ts).

import pino from 'pino';
import type { Logger } from 'pino';
import type { CreateVolumeInput } from '../../src/cluster/catalog';
import { balancerDefaults } from '../../src/loadmon/balancer';
import type { Random, Timers } from '../../src/env/env';
import type { SeededRandom } from '../../src/env/manual';
import { composePeer, type PeerCore, type PeerProtocols, type ReplicationSettings } from '../../src/server/compose';
import { PageStore } from '../../src/store/page-store';
import type { BlockBackend } from '../../src/store/types';
import { SimCatalog, type SimCatalogClient } from './catalog';
import { SimMedia } from './disk';
import { SimNetwork, calmNetwork, type Endpoint } from './network';
import { PeerClock, PeerEnv, SimWorld, driftMax, skewUsMax, type PeerTimers } from './world';
import { followMembers } from '../../src/server/member-effects';
import { SimMembers } from './members';

const silent: Logger = pino({ level: 'silent' });

export interface FaultCounts {
  crashes: number;
  /** Crashes that keep the peer down past the faults (calm does not restart it early). */
  longKills: number;
  /** A peer cut from the catalog and from every other peer at once. */
  isolations: number;
  partitions: number;
  drops: number;
  reorders: number;
  duplicates: number;
  diskStalls: number;
  /** Latent sector errors put on a peer's disk (a read fails until the sector is rewritten). */
  latentErrors: number;
  skews: number;
}

/** One peer: its disk and clock outlive crashes; everything else is one incarnation. */
export class SimPeer implements Endpoint {
  readonly media: SimMedia;
  readonly clock: PeerClock;
  env!: PeerEnv;
  private live: PeerCore | undefined;
  private inc = 0;
  meta: SimCatalogClient | undefined;
  store: PageStore | undefined;
  /** Set while the peer is down (crashed, not restarted yet). */
  down = false;
  /** True time before which calm() leaves it down (a long kill restarts at its own time). */
  heldUntilMs = 0;
  starting = false;

  constructor(readonly id: string, private readonly group: SimGroup, random: SeededRandom) {
    this.clock = new PeerClock(group.world);
    // A disk operation takes 20–320 µs (an SSD), more while the disk stalls (group.stallDisk).
    const w = group.world;
    const exact: Timers = {
      setTimeout: (fn, ms) => w.after(ms, fn),
      clearTimeout: (h) => w.timers.clearTimeout(h),
      setInterval: (fn, ms) => w.timers.setInterval(fn, ms),
      clearInterval: (h) => w.timers.clearInterval(h),
    };
    this.media = new SimMedia({ timers: exact, random, now: () => w.now(), latencyMs: () => 0.02 + random.float() * 0.3 });
  }

  core(): PeerCore | undefined {
    return this.live;
  }

  incarnation(): number {
    return this.inc;
  }

  timers(): PeerTimers {
    return this.env.timers;
  }

  private readonly crashListeners = new Set<() => void>();

  onCrash(fn: () => void): void {
    this.crashListeners.add(fn);
  }

  offCrash(fn: () => void): void {
    this.crashListeners.delete(fn);
  }

  /** Start a new incarnation from what the disk and the catalog hold. Resolves when it serves (or never, if it crashes meanwhile). */
  async start(): Promise<void> {
    // One process per disk: a restart asked for twice (the crash's timer, calm()) starts once.
    if (this.starting || this.live) return;
    const g = this.group;
    const inc = ++this.inc;
    this.down = false;
    this.starting = true;
    this.env = new PeerEnv(g.world, this.clock, g.world.fork());
    const meta = (this.meta = g.catalog.client(this.id, this.env.timers));
    try {
      const log = process.env.SIM_LOG ? pino({ timestamp: false, level: 'info', base: { peer: this.id } }, { write: (line: string) => g.trace(`${this.id} log ${line.trim()}`) }) : silent;
      const store = (this.store = await PageStore.openOn(this.media, { log }));
      g.trace(`${this.id} store open`);
      const core = await composePeer({
        self: this.id, members: g.members, pageBlocks: 8192, env: this.env, log, store, meta, transport: g.network.transport(this.id),
        portal: { address: `sim:${this.id}` },
        migration: { rateBytesPerSec: g.moveRateBytesPerSec, pieceBytes: 256 * 1024, duty: 1 },
        balancer: { ...balancerDefaults, intervalMs: 1_000, cooldownMs: 5_000, minMeanLoad: 1 },
        facts: async () => ({ sessions: 0, freeBytes: 1 << 30, totalBytes: 1 << 30, allocatedBytes: store.usage().allocatedBytes }),
        event: (kind, message) => g.trace(`${this.id} ${kind}: ${message}`),
        ...(g.protocols ? { protocols: g.protocols } : {}),
        ...(g.replication ? { replication: g.replication } : {}),
      });
      if (inc !== this.inc) return;
      core.load.start();
      this.live = core;
      g.trace(`${this.id} up (incarnation ${inc})`);
      this.followMembers(core, log);
      // Serving: a joining peer is up (src/server/membership.ts markUp); a draining one stays so.
      if (g.members.get(this.id)?.state === 'joining') {
        g.members.setState(this.id, 'up', this.id);
        g.trace(`${this.id} member state up (it serves)`);
      }
    } catch (err) {
      if (inc !== this.inc) return;
      // The catalog was out of reach, most likely: a supervisor starts the process again.
      g.trace(`${this.id} failed to start: ${(err as Error).message}; retrying`);
      // The process exits; the simulator treats it as a crash (what was not durable may be lost).
      g.noteCrash(this.id);
      this.crash();
      g.world.after(200, () => void (this.down && this.start()));
    } finally {
      if (inc === this.inc) this.starting = false;
    }
  }

  /**
   * What a peer process does on a member change (src/server/peer.ts): its moves aimed at a peer
   * turned draining are cancelled, the change is told (the trace), and the keeper looks at once.
   * No portal here: the hosts are the simulator's (they pick any up peer).
   */
  private followMembers(core: PeerCore, log: Logger): void {
    const g = this.group;
    const unfollow = followMembers({
      self: this.id, members: g.members, migrator: core.migrator, portal: () => undefined, pinned: () => false, logoutSeconds: 0,
      event: (kind, message) => g.trace(`${this.id} ${kind}: ${message}`), removed: () => undefined, log,
    });
    const unkick = g.members.onChange(() => core.replication.keeper.kick());
    this.onCrash(() => (unfollow(), unkick()));
  }

  /** kill -9 and a power loss: the incarnation stops at this instant; the disk keeps what was durable. */
  crash(): void {
    this.kill();
    this.media.crash();
    this.down = true;
  }

  private kill(): void {
    const listeners = [...this.crashListeners];
    this.crashListeners.clear();
    for (const fn of listeners) fn();
    this.inc++;
    this.env?.timers.kill();
    this.meta?.kill();
    this.live = undefined;
    this.starting = false;
  }
}

export interface SimGroupOptions {
  world: SimWorld;
  /** Members from the start (p1..pN). */
  peers: number;
  /** One more peer, p(N+1), that is not a member until join(). */
  spare?: boolean;
  protocols?: Partial<PeerProtocols>;
  /** Lost-peer interval (default: the production default). */
  replication?: ReplicationSettings;
  /** Page moves' copy rate in bytes a second (default: unlimited). */
  moveRateBytesPerSec?: number;
  trace(line: string): void;
}

export class SimGroup {
  readonly world: SimWorld;
  readonly catalog: SimCatalog;
  readonly network: SimNetwork;
  readonly peers = new Map<string, SimPeer>();
  /** Every peer of the simulation: the members from the start, then the spare if any. */
  readonly peerIds: string[];
  readonly members: SimMembers;
  /** The peer that is not a member at the start (undefined: none). */
  readonly spare: string | undefined;
  readonly protocols: Partial<PeerProtocols> | undefined;
  readonly replication: ReplicationSettings | undefined;
  readonly moveRateBytesPerSec: number;
  readonly counts: FaultCounts = { crashes: 0, longKills: 0, isolations: 0, partitions: 0, drops: 0, reorders: 0, duplicates: 0, diskStalls: 0, latentErrors: 0, skews: 0 };
  readonly trace: (line: string) => void;

  constructor(o: SimGroupOptions) {
    this.world = o.world;
    this.protocols = o.protocols;
    this.replication = o.replication;
    this.moveRateBytesPerSec = o.moveRateBytesPerSec ?? 0;
    this.trace = (line) => o.trace(`[${o.world.now().toFixed(3)}] ${line}`);
    this.catalog = new SimCatalog(o.world, o.world.fork());
    this.peerIds = Array.from({ length: o.peers + (o.spare ? 1 : 0) }, (_, i) => `p${i + 1}`);
    this.spare = o.spare ? this.peerIds[o.peers] : undefined;
    this.members = new SimMembers(this.peerIds.slice(0, o.peers), () => o.world.now());
    this.network = new SimNetwork(o.world, o.world.fork(), this.peers as Map<string, Endpoint>, this.trace);
    for (const id of this.peerIds) this.peers.set(id, new SimPeer(id, this, o.world.fork()));
  }

  up(): SimPeer[] {
    return [...this.peers.values()].filter((p) => p.core() !== undefined);
  }

  core(id: string): PeerCore | undefined {
    return this.peers.get(id)?.core();
  }

  /** Members (not removed) that are not up. */
  membersDown(): string[] {
    return this.members.ids().filter((id) => !this.core(id));
  }

  /** Start every member and create the volume; resolves once every member has it open. */
  async boot(volume: CreateVolumeInput): Promise<void> {
    const started = Promise.all(this.members.ids().map((id) => this.peers.get(id)!.start()));
    await this.world.run(this.world.now() + 5_000, Number.MAX_SAFE_INTEGER, () => this.membersDown().length === 0);
    await started;
    const p1 = this.core(this.peerIds[0])!;
    let created = false;
    void p1.catalog.createVolume(volume).then(() => (created = true));
    await this.world.run(this.world.now() + 5_000, Number.MAX_SAFE_INTEGER, () => created && this.up().every((p) => p.core()!.targets.hostPathFor(volume.name) !== undefined));
    if (!this.up().every((p) => p.core()!.targets.hostPathFor(volume.name))) throw new Error('the volume did not open on every peer at boot');
  }

  hostPath(peer: string, volume: string): BlockBackend | undefined {
    return this.core(peer)?.targets.hostPathFor(volume);
  }

  // ---- membership (the administrator's) --------------------------------------------------------

  /** The spare starts as a new peer would: registered (joining), then up once it serves. */
  join(id: string): void {
    this.members.register(id, 'joining', id);
    this.trace(`${id} JOINS the group (registered joining)`);
    void this.peers.get(id)!.start();
  }

  /** `peersan peer drain ID`: nothing new placed there, its copies leave (src/replication/rebuild.ts). */
  drain(id: string): void {
    this.members.setState(id, 'draining', 'admin');
    this.trace(`${id} DRAINS (member state draining)`);
  }

  /** `peersan peer undrain ID`: up again. */
  undrain(id: string): void {
    this.members.setState(id, 'up', 'admin');
    this.trace(`${id} UNDRAINED (member state up)`);
  }

  // ---- faults --------------------------------------------------------------------------------

  /** Told of every crash of a peer (the history: writes not durable there may be gone). */
  noteCrash: (id: string) => void = () => undefined;

  /** kill -9 and power loss of a peer, restarted `downMs` later; `held`: calm() does not restart it sooner. */
  crash(id: string, downMs: number, held = false): void {
    const p = this.peers.get(id)!;
    if (p.down) return;
    this.counts.crashes++;
    if (held) this.counts.longKills++;
    p.heldUntilMs = held ? this.world.now() + downMs : 0;
    this.noteCrash(id);
    this.trace(`${id} CRASH (down ${downMs.toFixed(0)} ms${held ? ', kept down' : ''})`);
    p.crash();
    this.world.after(downMs, () => {
      if (p.down) {
        this.trace(`${id} restarts`);
        void p.start();
      }
    });
  }

  /** Cut a peer from the catalog and from every other peer for `ms` (its hosts still reach it). */
  isolate(id: string, ms: number): void {
    const others = this.members.ids().filter((p) => p !== id);
    this.counts.isolations++;
    this.trace(`${id} ISOLATED from the catalog and the other peers for ${ms.toFixed(0)} ms`);
    const cut = (on: boolean): void => {
      for (const p of others) this.network.partition(id, p, on);
      this.catalog.partition(id, on);
    };
    cut(true);
    this.world.after(ms, () => cut(false));
  }

  skew(id: string, random: SeededRandom): void {
    const c = this.peers.get(id)!.clock;
    c.skewUs = (random.float() * 2 - 1) * skewUsMax;
    c.setDrift((random.float() * 2 - 1) * driftMax);
    this.counts.skews++;
    this.trace(`${id} clock skew ${c.skewUs.toFixed(0)} µs, drift ${(c.drift * 1e6).toFixed(0)} ppm`);
  }

  stallDisk(id: string, ms: number): void {
    this.counts.diskStalls++;
    this.trace(`${id} disk stalls ${ms.toFixed(0)} ms`);
    this.peers.get(id)!.media.stallUntil(this.world.now() + ms);
  }

  /** A latent sector error on a written sector of `id`'s disk, drawn from `random`. */
  latentError(id: string, random: Random): void {
    const at = this.peers.get(id)!.media.failWrittenSector(random);
    if (!at) return;
    this.counts.latentErrors++;
    this.trace(`${id} disk: sector ${at.sector} of ${at.name} fails to read until rewritten`);
  }

  /** Faults stop: partitions heal, messages flow, latent sector errors are remapped, every down peer restarts (a long kill at its own time). */
  calm(): void {
    for (const p of this.peers.values()) p.media.healSectors();
    this.network.faults = calmNetwork();
    this.network.healAll();
    this.catalog.dropRate = 0;
    this.catalog.healAll();
    for (const p of this.peers.values()) if (p.down && p.heldUntilMs <= this.world.now()) void p.start();
    this.trace('faults stop');
  }

  faultCounts(): FaultCounts {
    return {
      ...this.counts,
      partitions: this.network.counts.partitions + this.catalog.counts.partitions,
      drops: this.network.counts.drops + this.catalog.counts.drops,
      reorders: this.network.counts.reorders,
      duplicates: this.network.counts.duplicates,
    };
  }
}
