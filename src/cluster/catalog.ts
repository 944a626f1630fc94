// Typed cluster catalog over a MetaStore: volume records with their validation. Keeps an
// in-memory copy fed by the watch, so lookups on the data path never wait on storage.

import type { Env } from '../env/env';
import { AlreadyExistsError, ConflictError, InvalidArgumentError, NotFoundError } from '../errors';
import { blockBytesAllowed, volumeBytesMax, volumeNameBytesMax } from '../limits';
import { copiesOf, inSyncOf, RouteTable, type Route } from '../routing/table';
import type { MembersView } from './members';
import type { MetaStore, WatchEvent } from './metastore';

export interface ChapSettings {
  user: string;
  secret: string;
  mutualUser?: string;
  mutualSecret?: string;
}

export interface VolumeRecord {
  name: string;
  /** 16 hex digits, random at creation and stable: the SCSI NAA identifier and serial. */
  id: string;
  sizeBytes: number;
  blockBytes: number;
  allow: string[];
  chap?: ChapSettings;
  /**
   * The peers of the placement rule, in stripe order (routing/table.ts: where a page without a
   * route record lives), fixed at creation. Where copies may go now is spanOf(volume).
   */
  peers: string[];
  /** Created without `--peers`: the volume spans every placeable member, later ones too. */
  spansGroup?: boolean;
  pageBlocks: number;
  createdAtMs: number;
  version: number;
  /** Automatic page balancing for this volume (absent: on). `peersan volume set NAME --auto-balance on|off`. */
  autoBalance?: boolean;
  /** Copies of each page asked for, 1-3 (absent: 1). Kept as asked even while fewer peers are up. */
  replicas?: number;
  /**
   * Copies per page of the placement rule (routing/table.ts), fixed at creation: min(replicas,
   * peers). Pages gain or lose copies after that only by route records (absent: 1).
   */
  placedCopies?: number;
}

export interface CreateVolumeInput {
  name: string;
  size: string | number;
  blockBytes?: number;
  allow?: string[];
  chap?: ChapSettings;
  /** Place the volume on these peers only (default: every peer of the group). */
  peers?: string[];
  /** Copies of each page, 1-3 (default: 2 when the volume spans at least 2 peers, else 1). */
  replicas?: number;
  /** The volume spans the group (later members too) though `peers` is given: it only orders the stripe (zones). */
  spansGroup?: boolean;
}

export const replicasMax = 3;

/** Copies per page when the creator does not say: two once the volume spans two peers. */
export function defaultReplicas(spanPeers: number): number {
  return spanPeers >= 2 ? defaultReplicasWhenSpread : 1;
}

/** The default for a volume spanning two peers or more (DESIGN.md 10): one peer may be lost. */
const defaultReplicasWhenSpread = 2;

export interface CatalogOptions {
  /** The group's members (src/cluster/members.ts): placement defaults to the placeable ones. */
  members: MembersView;
  pageBlocks: number;
  /** Volume ids (random) and creation stamps (wall clock). */
  env: Env;
}

const volumePrefix = 'volumes/';
const routePrefix = 'routes/';
export const reservationPrefix = 'reservations/';
/** Pages being moved: the intent record of a move (DESIGN.md 4, step 1), deleted at commit or cancel. */
export const movePrefix = 'moves/';

export interface MoveIntent {
  from: string;
  to: string;
  routeVersion: number;
  startedAtMs: number;
  /** The move's id (migration/pieces.ts MoveCheckpoint.id); absent in intents recorded before it existed. */
  id?: string;
}

function moveKey(volumeId: string, page: number): string {
  return `${movePrefix}${volumeId}/${String(page).padStart(10, '0')}`;
}

function routeKey(volumeId: string, page: number): string {
  return `${routePrefix}${volumeId}/${String(page).padStart(10, '0')}`;
}
const volumeNamePattern = /^[a-z0-9][a-z0-9-]*$/;
const iqnPattern = /^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:.+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$/;
const units: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

/** "1G", "512M", "10GiB", "1T", "4096" → bytes (binary units). */
export function parseSize(size: string | number): number {
  if (typeof size === 'number') return size;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$/.exec(size);
  if (!m) throw new InvalidArgumentError(`cannot read size "${size}" (use e.g. 10G, 512M, 1T or a byte count)`);
  return Math.round(Number(m[1]) * units[m[2].toLowerCase()]);
}

export function formatBytes(n: number): string {
  const steps = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < steps.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)} ${steps[i]}`;
}

export function validateVolumeName(name: string): void {
  if (!name || name.length > volumeNameBytesMax || !volumeNamePattern.test(name)) {
    throw new InvalidArgumentError(`bad volume name "${name}": use 1-${volumeNameBytesMax} of a-z, 0-9 and '-', starting with a letter or digit`);
  }
}

function validAllowList(list: string[]): string[] {
  const allow = [...new Set(list)];
  for (const iqn of allow) {
    if (!iqnPattern.test(iqn)) throw new InvalidArgumentError(`"${iqn}" is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id], eui. or naa.)`);
  }
  return allow;
}

function validateChap(chap: ChapSettings): void {
  // RFC 7143 12.1.3: CHAP secrets of at least 12 bytes; initiators like open-iscsi cap them at 16.
  const check = (what: string, secret: string): void => {
    if (secret.length < 12 || secret.length > 16) throw new InvalidArgumentError(`${what} must be 12 to 16 characters (RFC 7143), got ${secret.length}`);
  };
  if (!chap.user) throw new InvalidArgumentError('CHAP needs a user name');
  check('CHAP secret', chap.secret);
  if (chap.mutualUser !== undefined || chap.mutualSecret !== undefined) {
    if (!chap.mutualUser || !chap.mutualSecret) throw new InvalidArgumentError('mutual CHAP needs both a user and a secret');
    check('mutual CHAP secret', chap.mutualSecret);
    if (chap.mutualSecret === chap.secret) throw new InvalidArgumentError('mutual CHAP secret must differ from the CHAP secret');
  }
}

function validateSize(sizeBytes: number, blockBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) throw new InvalidArgumentError('size must be positive');
  if (sizeBytes % blockBytes !== 0) throw new InvalidArgumentError(`size must be a multiple of the block size (${blockBytes})`);
  if (sizeBytes > volumeBytesMax) throw new InvalidArgumentError(`size above the ${formatBytes(volumeBytesMax)} limit`);
}

export class Catalog {
  readonly store: MetaStore;
  readonly options: CatalogOptions;
  private readonly volumes = new Map<string, VolumeRecord>();
  /** volume id → moved pages (the exceptions to the placement rule), fed by the watch. */
  private readonly movedPages = new Map<string, Map<number, Route>>();
  private readonly tables = new Map<string, RouteTable>();
  private readonly listeners = new Set<(name: string, record: VolumeRecord | undefined) => void>();
  private unwatchers: (() => void)[] = [];
  /** Route events held back by holdRouteEvents() (fault injection: a lagging watch). */
  private heldRouteEvents: WatchEvent[] | undefined;

  private constructor(store: MetaStore, options: CatalogOptions) {
    this.store = store;
    this.options = options;
  }

  static async open(store: MetaStore, options: CatalogOptions): Promise<Catalog> {
    const c = new Catalog(store, options);
    // Watch first, then list: a change between the two is seen twice (harmless), never missed.
    c.unwatchers.push(await store.watch(routePrefix, (ev) => c.onRouteEvent(ev)));
    c.unwatchers.push(await store.watch(volumePrefix, (ev) => {
      const name = (ev.type === 'put' ? ev.record.key : ev.key).slice(volumePrefix.length);
      const record = ev.type === 'put' ? decodeVolume(ev.record.value, ev.record.version, options) : undefined;
      const previous = c.volumes.get(name);
      if (previous && previous.id !== record?.id) c.tables.delete(previous.id);
      if (record) c.volumes.set(name, record);
      else c.volumes.delete(name);
      for (const l of c.listeners) l(name, record);
    }));
    for (const r of await store.list(routePrefix)) c.onRouteEvent({ type: 'put', record: r });
    for (const r of await store.list(volumePrefix)) {
      const v = decodeVolume(r.value, r.version, options);
      c.volumes.set(v.name, v);
    }
    return c;
  }

  /**
   * Test hook: stop applying route changes from the watch until the returned function is
   * called, as a slow watch would. Requests still learn routes from MOVED answers.
   */
  holdRouteEvents(): () => void {
    this.heldRouteEvents ??= [];
    return () => {
      const held = this.heldRouteEvents ?? [];
      this.heldRouteEvents = undefined;
      for (const ev of held) this.onRouteEvent(ev);
    };
  }

  private onRouteEvent(ev: WatchEvent): void {
    if (this.heldRouteEvents) {
      this.heldRouteEvents.push(ev);
      return;
    }
    this.applyRouteEvent(ev);
  }

  private applyRouteEvent(ev: WatchEvent): void {
    const key = ev.type === 'put' ? ev.record.key : ev.key;
    const [volumeId, pageText] = key.slice(routePrefix.length).split('/');
    const page = Number(pageText);
    if (!volumeId || !Number.isSafeInteger(page)) return;
    const moved = this.movedFor(volumeId);
    if (ev.type === 'delete') {
      moved.delete(page);
      return;
    }
    const route = JSON.parse(ev.record.value.toString()) as Route;
    // Through the table when it exists, so that its listeners hear the change (failover waits on it).
    const table = this.tables.get(volumeId);
    if (table) table.learn(page, route);
    else if ((moved.get(page)?.version ?? 0) < route.version) moved.set(page, route);
  }

  private movedFor(volumeId: string): Map<number, Route> {
    let m = this.movedPages.get(volumeId);
    if (!m) this.movedPages.set(volumeId, (m = new Map()));
    return m;
  }

  /** The in-memory routing table of a volume (never waits on the catalog). */
  routes(volume: VolumeRecord): RouteTable {
    let t = this.tables.get(volume.id);
    if (!t) this.tables.set(volume.id, (t = new RouteTable(volume.peers, volume.pageBlocks, this.movedFor(volume.id), volume.placedCopies ?? 1)));
    return t;
  }

  /**
   * The peers a volume's copies may be placed on now: every placeable member for a volume that
   * spans the group (later members too), else its own peers that are placeable.
   */
  spanOf(volume: VolumeRecord): readonly string[] {
    const placeable = this.options.members.placeable();
    return volume.spansGroup ? placeable : volume.peers.filter((p) => placeable.includes(p));
  }

  volumeById(id: string): VolumeRecord | undefined {
    for (const v of this.volumes.values()) if (v.id === id) return v;
    return undefined;
  }

  /**
   * Read every route record from the catalog itself, whatever the watch has delivered: a
   * primary whose lease lapsed learns every page taken over meanwhile (src/replication/leases.ts).
   */
  async fetchRoutes(): Promise<void> {
    for (const r of await this.store.list(routePrefix)) this.applyRouteEvent({ type: 'put', record: r });
  }

  /** Read a page's route from the catalog itself (an owner asked about a newer version than it knows). */
  async fetchRoute(volume: VolumeRecord, page: number): Promise<Route> {
    const r = await this.store.get(routeKey(volume.id, page));
    const table = this.routes(volume);
    if (r) table.learn(page, JSON.parse(r.value.toString()) as Route);
    return table.route(page);
  }

  /**
   * Give a page a new owner by a move: compare-and-swap from the route `from` (which must
   * still be current in the catalog) to `owner` in the place of from.owner, in the copies and
   * the in-sync set alike (the move copied the primary's data), at from.version + 1.
   * ConflictError if it changed.
   */
  async setRoute(volume: VolumeRecord, page: number, from: Route, owner: string): Promise<Route> {
    if (!this.options.members.ids().includes(owner)) throw new InvalidArgumentError(`no peer ${owner} in the group`);
    return this.casRoute(volume, page, from, (now) => {
      const swap = (peers: readonly string[]): string[] => peers.map((p) => (p === now.owner ? owner : p));
      return now.copies ? { owner, copies: swap(copiesOf(now)), inSync: swap(inSyncOf(now)) } : { owner };
    });
  }

  /**
   * The one way a route changes (DESIGN.md 10): compare-and-swap from `from` (owner and version
   * must still be current in the catalog) to `change(current)` at from.version + 1. Copies and
   * in-sync set are checked: distinct peers of the group, the primary first and in sync.
   * ConflictError if the route changed meanwhile; the table learns the new route.
   */
  async casRoute(volume: VolumeRecord, page: number, from: Route, change: (now: Route) => Omit<Route, 'version'>): Promise<Route> {
    const key = routeKey(volume.id, page);
    const current = await this.store.get(key);
    const now = current ? (JSON.parse(current.value.toString()) as Route) : this.routes(volume).placed(page);
    if (now.owner !== from.owner || now.version !== from.version) {
      throw new ConflictError(`page ${page} of ${volume.name} is at ${now.owner} v${now.version}, not ${from.owner} v${from.version}`);
    }
    const next: Route = { ...change(now), version: from.version + 1 };
    checkRoute(next, (p) => this.options.members.get(p) !== undefined);
    await this.store.put(key, Buffer.from(JSON.stringify(next)), current?.version ?? 0);
    this.routes(volume).learn(page, next);
    return next;
  }

  /** Record the intent to move a page; ConflictError if a move of the page is already recorded. */
  async createMoveIntent(volume: VolumeRecord, page: number, intent: MoveIntent): Promise<void> {
    try {
      await this.store.put(moveKey(volume.id, page), Buffer.from(JSON.stringify(intent)), 0);
    } catch (err) {
      if (err instanceof ConflictError) throw new ConflictError(`page ${page} of ${volume.name} is already moving`);
      throw err;
    }
  }

  async moveIntent(volumeId: string, page: number): Promise<MoveIntent | undefined> {
    const r = await this.store.get(moveKey(volumeId, page));
    return r ? (JSON.parse(r.value.toString()) as MoveIntent) : undefined;
  }

  /**
   * Remove the intent of THIS move (same source, destination and route version), if it is still
   * recorded. A move's clean-up can come late (a restart, a slow catalog): by then the page may
   * have moved on and a new move of it recorded its own intent, which must stay (the simulator
   * found a late clean-up deleting the next move's intent, seed 98, and a failed start's clean-up
   * deleting the intent of the next attempt from the same route to the same peer, seed 935).
   */
  async deleteMoveIntent(volumeId: string, page: number, move: Pick<MoveIntent, 'from' | 'to' | 'routeVersion' | 'id'>): Promise<void> {
    for (;;) {
      const r = await this.store.get(moveKey(volumeId, page));
      if (!r) return;
      const recorded = JSON.parse(r.value.toString()) as MoveIntent;
      if (recorded.from !== move.from || recorded.to !== move.to || recorded.routeVersion !== move.routeVersion || recorded.id !== move.id) return;
      try {
        return await this.store.delete(r.key, r.version);
      } catch (err) {
        // Changed under us: look again. Anything else (the catalog out of reach) is the caller's to retry.
        if (!(err instanceof ConflictError)) throw err;
      }
    }
  }

  /** Every recorded move intent (restart recovery looks for this peer's stale ones). */
  async moveIntents(): Promise<{ volumeId: string; page: number; intent: MoveIntent }[]> {
    return (await this.store.list(movePrefix)).map((r) => {
      const [volumeId, page] = r.key.slice(movePrefix.length).split('/');
      return { volumeId, page: Number(page), intent: JSON.parse(r.value.toString()) as MoveIntent };
    });
  }

  /** Called after every committed change (record undefined: deleted). */
  onVolumeChange(listener: (name: string, record: VolumeRecord | undefined) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  volume(name: string): VolumeRecord | undefined {
    return this.volumes.get(name);
  }

  listVolumes(): VolumeRecord[] {
    return [...this.volumes.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  async createVolume(input: CreateVolumeInput): Promise<VolumeRecord> {
    validateVolumeName(input.name);
    const blockBytes = input.blockBytes || 512;
    if (!blockBytesAllowed.includes(blockBytes)) throw new InvalidArgumentError(`block size must be 512 or 4096, got ${blockBytes}`);
    const sizeBytes = parseSize(input.size);
    validateSize(sizeBytes, blockBytes);
    const allow = validAllowList(input.allow ?? []);
    if (input.chap) validateChap(input.chap);
    const spansGroup = input.spansGroup ?? !(input.peers && input.peers.length > 0);
    const placeable = this.options.members.placeable();
    const peers = input.peers && input.peers.length > 0 ? [...new Set(input.peers)] : [...placeable];
    if (peers.length === 0) throw new InvalidArgumentError('no peer of the group is up to place a volume on');
    for (const p of peers) {
      const m = this.options.members.get(p);
      if (!m || m.state === 'removed') throw new InvalidArgumentError(`no peer "${p}" in the group (peers: ${this.options.members.ids().join(', ')})`);
      if (m.state !== 'up') throw new InvalidArgumentError(`peer ${p} is ${m.state}: nothing new is placed on it`);
    }
    const replicas = input.replicas ?? defaultReplicas(peers.length);
    checkReplicas(replicas);
    const record: Omit<VolumeRecord, 'version'> = {
      name: input.name, id: this.options.env.random.bytes(8).toString('hex'), sizeBytes, blockBytes, allow,
      chap: input.chap, peers, pageBlocks: this.options.pageBlocks, createdAtMs: this.options.env.clock.nowMs(),
      replicas, placedCopies: Math.min(replicas, peers.length), ...(spansGroup ? { spansGroup } : {}),
    };
    try {
      const r = await this.store.put(volumePrefix + input.name, encodeVolume(record), 0);
      return { ...record, version: r.version };
    } catch (err) {
      if (err instanceof ConflictError) throw new AlreadyExistsError(`volume ${input.name} already exists`);
      throw err;
    }
  }

  async resizeVolume(name: string, size: string | number): Promise<VolumeRecord> {
    const current = this.require(name);
    const sizeBytes = parseSize(size);
    validateSize(sizeBytes, current.blockBytes);
    if (sizeBytes < current.sizeBytes) throw new InvalidArgumentError(`shrinking is not supported (${formatBytes(current.sizeBytes)} → ${formatBytes(sizeBytes)}): it would destroy data`);
    const { version: _v, ...rest } = current;
    const next = { ...rest, sizeBytes };
    const r = await this.store.put(volumePrefix + name, encodeVolume(next), current.version);
    return { ...next, version: r.version };
  }

  /**
   * Replace a volume's allow list and CHAP settings (chap null: CHAP off; undefined: keep).
   * Hosts already logged in stay; the next login is checked against the new settings.
   */
  async setAccess(name: string, access: { allow: string[]; chap?: ChapSettings | null }): Promise<VolumeRecord> {
    const current = this.require(name);
    const allow = validAllowList(access.allow);
    const chap = access.chap === undefined ? current.chap : (access.chap ?? undefined);
    if (chap) validateChap(chap);
    const { version: _v, ...rest } = current;
    const next = { ...rest, allow, chap };
    const r = await this.store.put(volumePrefix + name, encodeVolume(next), current.version);
    return { ...next, version: r.version };
  }

  /** Switch automatic page balancing for one volume (compare-and-swap on the record). */
  async setAutoBalance(name: string, on: boolean): Promise<VolumeRecord> {
    const current = this.require(name);
    const { version: _v, ...rest } = current;
    const next = { ...rest, autoBalance: on };
    const r = await this.store.put(volumePrefix + name, encodeVolume(next), current.version);
    return { ...next, version: r.version };
  }

  /**
   * Record the copies asked per page, 1-3 (compare-and-swap on the record). Pages gain or lose
   * copies afterwards, each by its primary (src/replication/rebuild.ts), paced.
   */
  async setReplicas(name: string, replicas: number): Promise<VolumeRecord> {
    const current = this.require(name);
    checkReplicas(replicas);
    const { version: _v, ...rest } = current;
    const next = { ...rest, replicas };
    const r = await this.store.put(volumePrefix + name, encodeVolume(next), current.version);
    return { ...next, version: r.version };
  }

  /** Delete the record, then the volume's route and reservation records (peers free their pages on the watch). */
  async deleteVolume(name: string): Promise<VolumeRecord> {
    const current = this.require(name);
    await this.store.delete(volumePrefix + name, current.version);
    for (const prefix of [routePrefix, movePrefix]) {
      for (const r of await this.store.list(`${prefix}${current.id}/`)) await this.store.delete(r.key, r.version).catch(() => undefined);
    }
    const pr = await this.store.get(reservationPrefix + current.id);
    if (pr) await this.store.delete(pr.key, pr.version).catch(() => undefined);
    this.movedPages.delete(current.id);
    return current;
  }

  require(name: string): VolumeRecord {
    const v = this.volumes.get(name);
    if (!v) throw new NotFoundError(`no volume named ${name}`);
    return v;
  }

  close(): void {
    for (const u of this.unwatchers) u();
    this.unwatchers = [];
    this.listeners.clear();
  }
}

function checkReplicas(replicas: number): void {
  if (!Number.isInteger(replicas) || replicas < 1 || replicas > replicasMax) throw new InvalidArgumentError(`replicas must be 1 to ${replicasMax}, got ${replicas}`);
}

/** A route a CAS would write: broken ones are bugs of the caller (assertion). */
function checkRoute(r: Route, member: (peer: string) => boolean): void {
  const copies = copiesOf(r);
  const inSync = inSyncOf(r);
  const ok =
    copies[0] === r.owner && inSync[0] === r.owner && new Set(copies).size === copies.length && new Set(inSync).size === inSync.length &&
    inSync.every((p) => copies.includes(p)) && copies.every(member);
  if (!ok) throw new Error(`assertion failed: bad route ${JSON.stringify(r)}`);
}

function encodeVolume(v: Omit<VolumeRecord, 'version'>): Buffer {
  return Buffer.from(JSON.stringify(v));
}

function decodeVolume(b: Buffer, version: number, options: CatalogOptions): VolumeRecord {
  const v = JSON.parse(b.toString()) as Omit<VolumeRecord, 'version'>;
  // Records written before placement existed live on the group's first peer.
  return { ...v, peers: v.peers ?? options.members.ids().slice(0, 1), pageBlocks: v.pageBlocks ?? options.pageBlocks, version };
}
