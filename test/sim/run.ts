// One simulated run from a seed (DESIGN.md 12): a group of 3–5 peers (and, in some seeds, a spare
// that joins during the run), one volume spanning them (created without --peers: it spans the
// members as they change) with 1–3 copies of each page, hosts, an administrator and the seed's
// faults; then calm, convergence and the checks. Everything the run does is drawn from the seed, so
// `simulate({ seed })` twice gives the same trace, line for line.

import { defaultReplicas } from '../../src/cluster/catalog';
import type { SeededRandom } from '../../src/env/manual';
import { copiesOf, inSyncOf, type Route } from '../../src/routing/table';
import { planSpread } from '../../src/replication/spread';
import { decodeSnapshot, routesAtCut, snapshotHolders, snapshotKey } from '../../src/snapshot/records';
import type { PeerProtocols } from '../../src/server/compose';
import type { BlockBackend } from '../../src/store/types';
import { check, traceOf, type Violation } from './checker';
import { checkConvergence, checkProtection, checkRouteHistory, type CopiesHeld, type RouteRules } from './copies';
import { SimGroup, type FaultCounts } from './group';
import type { Endpoint } from './network';
import { History, decodeBlocks, type Op } from './history';
import { Workload, type HostOp } from './workload';
import { SimWorld } from './world';

export interface SimOptions {
  seed: number;
  /** Events (timer firings) at most; the run stops where it is and is checked as it stands. */
  stepsMax?: number;
  /** A protocol variant with a known bug (test/sim/controls). */
  protocols?: Partial<PeerProtocols>;
  /** Copies per page of the volume (1-3); default: drawn from the seed (drawReplicas). */
  replicas?: number;
  /**
   * Draw latent sector errors among the disk faults (disk.ts failSector: a read fails until the
   * sector is rewritten; a primary serves it from another copy, src/replication/read-repair.ts).
   * Opt-in: a copy-on-write fill whose read of the old grain fails leaves the grain's allocation
   * failed for good in the page store (every later I/O of the grain fails), so a page can stay
   * under-replicated past the calm (seeds 24 and 80 with --replicas 2).
   */
  latentErrors?: boolean;
  /** Keep the trace (always kept when a violation is found). */
  keepTrace?: boolean;
  /** Debugging: look at the group once it has converged, before the checks. */
  inspect?(group: SimGroup, drive: <T>(p: Promise<T>) => Promise<T | undefined>): Promise<void>;
}

export interface SimResult {
  seed: number;
  violations: Violation[];
  /** The events up to the first violation (or all, with keepTrace). */
  trace: string[];
  /** The shortest story of the first wrong answer: the commands, flushes and crashes that touched its block, in order. */
  story: string[];
  faults: FaultCounts;
  steps: number;
  ops: number;
  moves: { committed: number; cancelled: number };
  snapshots: number;
  /** Copies per page the run's volume asked for. */
  replicas: number;
  /** The administrator's membership changes: a spare joined, drains, undrains. */
  membership: MembershipCounts;
}

export interface MembershipCounts {
  joins: number;
  drains: number;
  undrains: number;
}

const volume = 'vol';
const blockBytes = 512;
const pageBlocks = 8192;
const pages = 4;
/** How long faults go on, then how long hosts keep going once they stop (true ms). */
const faultMs = 3_000;
const calmHostsMs = 500;
/** Once calm: every host command, move and catalog change must have settled within this. */
const convergeMsMax = 60_000;
/**
 * And then stayed settled this long before the copies are compared: a new primary reconciles
 * just after its compare-and-swap, a restarted peer steps out of the in-sync set of its suspect
 * pages just after it starts (DESIGN.md 10); either unsettles the group again.
 */
const steadyMs = 1_000;
/** Seeds that start with a spare (a peer not in the group) that joins during the faults. */
const spareShare = 0.35;
/** A host gives a command up after this (an initiator's command timeout) and retries elsewhere. */
const hostCommandMsMax = 8_000;

export async function simulate(o: SimOptions): Promise<SimResult> {
  const world = new SimWorld(o.seed);
  const lines: string[] = [];
  const trace = (line: string): void => void lines.push(line);
  const rnd = world.fork();
  const peers = 3 + rnd.int(3);
  const replicas = o.replicas ?? drawReplicas(rnd, peers);
  // Some seeds start a spare: a peer that is not a member, with nothing placed on it, until it joins.
  const spare = rnd.float() < spareShare;
  const group = new SimGroup({ world, peers, spare, trace, ...(o.protocols ? { protocols: o.protocols } : {}) });
  const membership: MembershipCounts = { joins: 0, drains: 0, undrains: 0 };
  const stepsMax = o.stepsMax ?? Number.MAX_SAFE_INTEGER;
  const history = new History(() => world.now());
  const violations: Violation[] = [];
  const fail = (invariant: string, message: string): void => {
    violations.push({ invariant: invariant as Violation['invariant'], opId: 0, message });
    trace(`VIOLATION ${invariant}: ${message}`);
  };

  await group.boot({ name: volume, size: pages * pageBlocks * blockBytes, blockBytes, replicas });
  trace(`booted ${peers} peers${group.spare ? ` and ${group.spare}, a spare not in the group` : ''}; volume ${volume} (${pages} pages, ${replicas} ${replicas === 1 ? 'copy' : 'copies'} of each)`);

  // ---- hosts --------------------------------------------------------------------------------
  const workload = new Workload(world.fork(), { blockCount: pages * pageBlocks, pageBlocks, blockBytes });
  const hosts = 2 + rnd.int(3);
  let hostsOn = true;
  let inFlight = 0;
  const hostRnd = world.fork();
  const via = new Map<number, string>();
  const runHost = (host: number): void => {
    if (!hostsOn) return;
    const up = group.up().map((p) => p.id);
    if (up.length === 0) return void world.after(5, () => runHost(host));
    // Hosts stick to a peer, and move (as a multipath initiator would) when it fails them.
    let peer = via.get(host);
    if (!peer || !up.includes(peer) || hostRnd.float() < 0.05) via.set(host, (peer = up[hostRnd.int(up.length)]));
    const backend = group.hostPath(peer, volume);
    if (!backend) return void world.after(5, () => runHost(host));
    const op = workload.next(host);
    inFlight++;
    trace(`host${host} ${describeOp(op)} via ${peer} …`);
    const rec = workload.perform(op, bounded(backend, world, hostCommandMsMax, group.peers.get(peer)!), history, peer);
    void rec.then((r) => {
      inFlight--;
      trace(`host${host} ${describeOp(op)} via ${peer}: ${r.outcome}${r.kind === 'read' && r.seen ? ` ${summarise(r.seen)}` : ''} (#${r.id})`);
      if (r.outcome === 'error') via.delete(host);
      // At least 1 ms between an answer and the next command (the hybrid clock's assumption, world.ts).
      world.after(1 + hostRnd.float() * 3, () => runHost(host));
    });
  };
  for (let h = 0; h < hosts; h++) world.after(1 + h, () => runHost(h));

  // ---- the administrator ----------------------------------------------------------------------
  const snapshotOps: { rec: Op; name: string; peer: string }[] = [];
  let adminOn = true;
  let snapshotSeq = 0;
  /** Admin commands not answered yet: the group has not settled while one runs. */
  let adminInFlight = 0;
  // The administrator's connection breaks when the peer it talks to dies (its command then fails).
  const tracked = <T>(p: Promise<T>, via: Endpoint): Promise<T> => {
    adminInFlight++;
    return new Promise<T>((resolve, reject) => {
      const reset = (): void => reject(new Error(`connection to the peer reset`));
      via.onCrash(reset);
      p.then(resolve, reject).finally(() => via.offCrash(reset));
    }).finally(() => adminInFlight--);
  };
  const adminRnd = world.fork();
  const admin = (): void => {
    if (!adminOn) return;
    world.after(50 + adminRnd.float() * 250, admin);
    const up = group.up();
    if (up.length === 0) return;
    const actor = up[adminRnd.int(up.length)];
    const core = actor.core()!;
    const x = adminRnd.float();
    if (x < 0.4) {
      const page = adminRnd.int(pages);
      const ownerId = core.catalog.routes(core.catalog.require(volume)).route(page).owner;
      const owner = group.core(ownerId);
      const others = group.peerIds.filter((id) => id !== actor.id);
      const to = others[adminRnd.int(others.length)];
      if (!owner) return;
      trace(`admin: move page ${page} (on ${core.catalog.routes(core.catalog.require(volume)).route(page).owner}) to ${to}`);
      tracked(owner.migrator.start(volume, page, to), group.peers.get(ownerId)!).then(() => trace(`admin: move of page ${page} to ${to} started`), (err: Error) => trace(`admin: move of page ${page} refused: ${err.message}`));
    } else if (x < 0.5) {
      const m = core.migrator.list()[0];
      if (!m) return;
      trace(`admin: cancel the move of page ${m.page}`);
      try {
        core.migrator.cancel(m.volumeId, m.page);
      } catch (err) {
        trace(`admin: cancel refused: ${(err as Error).message}`);
      }
    } else if (x < 0.54) {
      changeMembership();
    } else if (x < 0.9) {
      const mode = x < 0.72 ? 'barrier' : 'timestamp';
      const name = `s${++snapshotSeq}`;
      const rec = history.begin({ host: -1, peer: actor.id, kind: 'snapshot', lba: 0, blocks: pages * pageBlocks, snapshot: name });
      trace(`admin: ${mode} snapshot ${name} through ${actor.id} (#${rec.id} begins)`);
      tracked(core.snapshots.create([volume], { name, mode }), actor).then(
        () => {
          history.end(rec, 'ok');
          snapshotOps.push({ rec, name, peer: actor.id });
          trace(`admin: snapshot ${name} taken (#${rec.id})`);
        },
        (err: Error) => {
          history.end(rec, 'error');
          trace(`admin: snapshot ${name} failed: ${err.message} (#${rec.id})`);
        },
      );
    } else {
      trace(`admin: rebalance through ${actor.id}`);
      tracked(core.load.rebalance(false), actor).then((r) => trace(`admin: rebalance planned ${r.moves.length} moves`), (err: Error) => trace(`admin: rebalance failed: ${err.message}`));
    }
  };
  // One peer drains at a time, and only while the peers that stay up can hold every copy of a
  // page (copies go on distinct peers; a drain the others lack room for is an operator's mistake
  // the CLI answers with a refusal or a warning, issue 18). A draining peer is undrained later,
  // or drains through the calm and must then end empty (drainsLeft).
  const changeMembership = (): void => {
    const draining = group.members.ids().find((id) => group.members.get(id)!.state === 'draining');
    if (draining) {
      membership.undrains++;
      return group.undrain(draining);
    }
    const up = group.members.placeable();
    if (up.length - 1 < replicas) return;
    membership.drains++;
    group.drain(up[adminRnd.int(up.length)]);
  };
  world.after(20, admin);
  // The spare joins once, during the faults: capacity spreading gives it copies (spareWanting).
  if (group.spare) {
    const id = group.spare;
    world.after(200 + adminRnd.float() * (faultMs - 700), () => {
      membership.joins++;
      group.join(id);
    });
  }

  // ---- faults ---------------------------------------------------------------------------------
  let faultsOn = true;
  const faultRnd = world.fork();
  group.network.faults = { dropRate: 0.01, duplicateRate: 0.05, spikeRate: 0.02, spikeMsMax: 40 };
  group.catalog.dropRate = 0.01;
  const fault = (): void => {
    if (!faultsOn) return;
    world.after(20 + faultRnd.float() * 200, fault);
    const ids = group.members.ids();
    const id = ids[faultRnd.int(ids.length)];
    const x = faultRnd.float();
    if (x < 0.17) {
      // Usually one peer down at a time (with one copy per page, more is mostly more errors);
      // one crash in four may take a second peer down meanwhile (a move's source and
      // destination both restarting).
      if (group.up().length === ids.length || (group.up().length === ids.length - 1 && faultRnd.float() < 0.25)) group.crash(id, 50 + faultRnd.float() * 1_500);
    } else if (x < 0.21) {
      // Killed and kept down past the leases (its in-sync copies take over and go on without
      // it), into the calm: it comes back to resync what changed meanwhile.
      if (group.up().length === ids.length) group.crash(id, 1_500 + faultRnd.float() * 3_500, true);
    } else if (x < 0.38) {
      const other = ids.filter((p) => p !== id)[faultRnd.int(ids.length - 1)];
      const ms = 20 + faultRnd.float() * 800;
      trace(`partition ${id} | ${other} for ${ms.toFixed(0)} ms`);
      group.network.partition(id, other, true);
      world.after(ms, () => group.network.partition(id, other, false));
    } else if (x < 0.45) {
      const ms = 20 + faultRnd.float() * 800;
      trace(`partition ${id} | catalog for ${ms.toFixed(0)} ms`);
      group.catalog.partition(id, true);
      world.after(ms, () => group.catalog.partition(id, false));
    } else if (x < 0.49) {
      // Cut off from everything but its hosts, often past its leases: as a primary it must stop
      // serving reads before another copy takes over, and its hosts' writes must fail (it can
      // neither reach its copies nor drop them from the in-sync set).
      group.isolate(id, 300 + faultRnd.float() * 2_200);
    } else if (x < 0.74) {
      group.stallDisk(id, 5 + faultRnd.float() * 300);
    } else if (o.latentErrors && x < 0.8) {
      // A sector that fails to read until rewritten: a primary serves the read from another
      // in-sync copy and rewrites it (src/replication/read-repair.ts); calm remaps what is left.
      group.latentError(id, faultRnd);
    } else {
      group.skew(id, faultRnd);
    }
  };
  world.after(10, fault);
  // A crash is in the history too: writes not yet durable on that peer may be gone.
  group.noteCrash = (id) => history.crash(id);

  // ---- one owner per route version ----------------------------------------------------------
  // Sampled through the run: every (page, version) any peer's table shows has one owner, the
  // same at every peer and at every moment (the catalog's compare-and-swap is the only writer).
  const owners = new Map<string, string>();
  let sampling = true;
  const sample = (): void => {
    if (!sampling) return;
    world.after(5, sample);
    for (const p of group.up()) {
      const c = p.core()!;
      const v = c.catalog.volume(volume);
      if (!v) continue;
      const table = c.catalog.routes(v);
      for (let page = 0; page < pages; page++) {
        const r = table.route(page);
        const k = `${page}@${r.version}`;
        const first = owners.get(k);
        if (first === undefined) owners.set(k, r.owner);
        else if (first !== r.owner) fail('two-owners', `page ${page} version ${r.version}: ${p.id} says ${r.owner} owns it, another peer said ${first}`);
      }
    }
  };
  world.after(1, sample);

  // ---- run ------------------------------------------------------------------------------------
  await world.run(world.now() + faultMs, stepsMax);
  faultsOn = false;
  group.calm();
  await world.run(world.now() + calmHostsMs, stepsMax);
  hostsOn = false;
  adminOn = false;
  const calmAt = world.now();
  const settled = (): boolean =>
    inFlight === 0 && adminInFlight === 0 && group.membersDown().length === 0 && group.up().every((p) => p.core()!.migrator.list().length === 0 && group.hostPath(p.id, volume) !== undefined) &&
    routesAgree(group, volume) === undefined && group.catalog.list('moves/').length === 0 && protection(group, volume).length === 0 &&
    drainsLeft(group, volume).length === 0 && spareWanting(group) === undefined && heldPage(group, volume) === undefined;
  await settle(world, calmAt + convergeMsMax, stepsMax, settled);
  if (world.steps < stepsMax) {
    if (inFlight > 0) fail('host-command-stuck', `${inFlight} host command(s) still unanswered ${convergeMsMax} ms after the faults stopped`);
    if (adminInFlight > 0) fail('admin-command-stuck', `${adminInFlight} admin command(s) (move, snapshot, rebalance) still unanswered ${convergeMsMax} ms after the faults stopped`);
    for (const p of group.up()) for (const m of p.core()!.migrator.list()) fail('move-not-ended', `${p.id}'s move of page ${m.page} to ${m.to} is still ${m.state} (${m.done}/${m.pieces}; ${m.lastError}) ${convergeMsMax} ms after the faults stopped`);
    if (group.membersDown().length > 0) fail('peer-not-up', `peers ${group.membersDown().join(', ')} not up ${convergeMsMax} ms after the faults stopped`);
    const disagree = routesAgree(group, volume);
    if (disagree) fail('routes-disagree', disagree);
    const held = heldPage(group, volume);
    if (held) fail('page-held', `${held} ${convergeMsMax} ms after the faults stopped`);
    // Every move ended: none left recorded in the catalog (a stale intent blocks the page's moves for good).
    for (const r of group.catalog.list('moves/')) fail('move-intent-left', `${r.key} is still recorded (${r.value.toString()}) with no move running`);
  }

  sampling = false;

  // ---- check ----------------------------------------------------------------------------------
  await o.inspect?.(group, (p) => drive(world, p, stepsMax));
  const ranges = touched(history.ops);
  // The group settled: its snapshots are read below (else they may not be readable yet).
  const settledOk = violations.length === 0 && world.steps < stepsMax;
  for (const f of checkRouteHistory(group.catalog.routePuts, routeRules(group, replicas))) fail(f.invariant, f.message);
  // With every peer up and no host command running, whatever else went wrong: every page has the
  // copies asked for, all in sync (resync finished); its in-sync copies hold the same blocks (read
  // below the data path, before the read-back: a read may drop a copy whose lease ran out); and
  // what hosts wrote is read back through every peer (a read that fails is judged as no answer).
  if (inFlight === 0 && group.membersDown().length === 0 && world.steps < stepsMax) {
    for (const f of protection(group, volume)) fail(f.invariant, `${f.message}, ${convergeMsMax} ms after the faults stopped`);
    // A drain that lasted through the calm ended: the peer holds no copy (the others have room).
    for (const m of drainsLeft(group, volume)) fail('drain-incomplete', `${m}, ${convergeMsMax} ms after the faults stopped`);
    const wanting = spareWanting(group);
    if (wanting) fail('spare-empty', `${wanting}, ${convergeMsMax} ms after the faults stopped`);
    for (const held of await readCopies(world, group, volume, ranges, stepsMax)) for (const f of checkConvergence(held, blockBytes)) fail(f.invariant, f.message);
    for (const p of group.up()) {
      const path = group.hostPath(p.id, volume);
      if (!path) fail('volume-not-open', `${p.id} is up but has not opened volume ${volume}`);
      else for (const r of ranges) await readBack(world, history, p.id, path, r, stepsMax);
    }
  }
  if (settledOk) {
    for (const s of snapshotOps) {
      const reader = group.core(s.peer)?.snapshotTargets.reader(volume, s.name);
      if (!reader) {
        fail('snapshot-missing', `snapshot ${s.name} (#${s.rec.id}) was taken but ${s.peer} cannot read it`);
        continue;
      }
      const seen = new Array<number | 'garbage'>(pages * pageBlocks).fill(0);
      for (const r of ranges) {
        let reason = '';
        const data = await drive(world, reader.read(r.lba, r.blocks), stepsMax, (why) => (reason = why));
        if (!data) fail('snapshot-unreadable', `snapshot ${s.name}: blocks ${r.lba}+${r.blocks} did not read through ${s.peer}: ${reason}`);
        else decodeBlocks(data, r.lba, blockBytes, r.blocks).forEach((v, i) => (seen[r.lba + i] = v));
        if (data) for (const f of await holdersDiffer(world, group, volume, s.name, r, data, stepsMax)) fail('snapshot-holders-differ', f);
      }
      s.rec.seen = seen;
    }
  }
  for (const v of check(history)) {
    violations.push(v);
    trace(`VIOLATION ${v.invariant}: ${v.message}`);
  }
  const committed = group.up().reduce((n, p) => n + p.core()!.migrator.counters.committed, 0);
  const cancelled = group.up().reduce((n, p) => n + p.core()!.migrator.counters.cancelled, 0);
  return {
    seed: o.seed, violations, trace: violations.length > 0 || o.keepTrace ? lines : [], faults: group.faultCounts(), steps: world.steps,
    story: storyOf(history, violations),
    ops: history.ops.length, moves: { committed, cancelled }, snapshots: snapshotOps.length, replicas, membership,
  };
}

/** The rules the route history is checked against (copies.ts): who was a member when, the replicas, the placed routes. */
function routeRules(group: SimGroup, replicas: number): RouteRules {
  const catalog = group.up()[0]?.core()?.catalog;
  return {
    member: (peer, atMs) => group.members.memberAt(peer, atMs),
    replicas,
    placed: (volumeId, page) => {
      const v = catalog?.volumeById(volumeId);
      return v && catalog!.routes(v).placed(page);
    },
  };
}

/**
 * Each draining member that still holds copies: a drain ends with none (its copies rebuilt on the
 * peers that stay, one-copy pages moved), the peers that stay having room for them all (the
 * administrator drains only then).
 */
function drainsLeft(group: SimGroup, volume: string): string[] {
  const c = catalogRoutes(group, volume);
  const draining = group.members.ids().filter((id) => group.members.get(id)!.state === 'draining');
  if (!c || draining.length === 0) return [];
  return draining.flatMap((id) => {
    const held = c.routes.flatMap((r, page) => (copiesOf(r).includes(id) ? [page] : []));
    return held.length > 0 ? [`${id} has drained since ${group.members.get(id)!.changedAtMs.toFixed(0)} ms but still holds copies of pages ${held.join(', ')}`] : [];
  });
}

/**
 * A joined spare with no copy while the capacity spread's own plan (src/replication/spread.ts
 * planSpread, on the final figures) still sends it some: the spread did not finish. (Not "while
 * the volume has more pages than peers": the plan gives an empty peer nothing when its share is
 * one copy or less, or when no other peer is a whole copy above its share, e.g. 4 pages of 2
 * copies on 4 peers and a fifth joining: 2 each, a share of 1.6.)
 */
function spareWanting(group: SimGroup): string | undefined {
  const spare = group.spare;
  const core = group.up()[0]?.core();
  if (!spare || !core || group.members.get(spare)?.state !== 'up') return undefined;
  const plan = planSpread(core.replication.spread.peers([]));
  const fill = plan.fills.find((f) => f.id === spare);
  if (!fill || fill.copies > 0 || !plan.flows.some((f) => f.to === spare)) return undefined;
  return `${spare} joined and holds no copy; the spread plans ${plan.reason}`;
}

/**
 * Copies per page of the run's volume: 1-3, mostly 2 — once the replicated data path is complete,
 * which the catalog's default says (2 for a volume spread over peers; 1 until then, DESIGN.md 10):
 * before, a volume of 2 copies is not replicated, and `--replicas 2` shows the checks catching it.
 */
function drawReplicas(rnd: SeededRandom, peers: number): number {
  if (defaultReplicas(peers) === 1) return 1;
  const x = rnd.float();
  return x < 0.15 ? 1 : x < 0.75 ? 2 : Math.min(3, peers);
}

/** The shortest story of the first wrong answer to a command (a copy check's finding names no block). */
function storyOf(history: History, violations: readonly Violation[]): string[] {
  const first = violations.find((v) => v.lba !== undefined);
  return first ? traceOf(history, first) : [];
}

/** Run until `settled` holds and has held for steadyMs (or the deadline, or the steps, run out). */
async function settle(world: SimWorld, deadline: number, stepsMax: number, settled: () => boolean): Promise<void> {
  for (;;) {
    await world.run(deadline, stepsMax, settled);
    if (!settled() || world.steps >= stepsMax) return;
    await world.run(Math.min(deadline, world.now() + steadyMs), stepsMax, () => !settled());
    if (settled() || world.now() >= deadline) return;
  }
}

/** Every page's route as the catalog has it (its record, or the placement rule), and the copies it should have. */
function catalogRoutes(group: SimGroup, volume: string): { routes: Route[]; want: number } | undefined {
  const core = group.up()[0]?.core();
  const v = core?.catalog.volume(volume);
  if (!core || !v) return undefined;
  const table = core.catalog.routes(v);
  return { routes: Array.from({ length: pages }, (_, page) => group.catalog.route(v.id, page) ?? table.placed(page)), want: table.copyCount };
}

function protection(group: SimGroup, volume: string): ReturnType<typeof checkProtection> {
  const c = catalogRoutes(group, volume);
  return c ? checkProtection(volume, c.routes, c.want) : [];
}

/** Each touched range, cut at page boundaries, as every in-sync copy of its page holds it in its store (below the data path). */
async function readCopies(world: SimWorld, group: SimGroup, volume: string, ranges: readonly { lba: number; blocks: number }[], stepsMax: number): Promise<CopiesHeld[]> {
  const c = catalogRoutes(group, volume);
  const volumeId = group.up()[0]?.core()?.catalog.volume(volume)?.id;
  if (!c || !volumeId) return [];
  const out: CopiesHeld[] = [];
  for (const part of ranges.flatMap((r) => splitAtPages(r.lba, r.blocks))) {
    const inSync = inSyncOf(c.routes[part.page]);
    if (inSync.length < 2) continue;
    const held = new Map<string, Buffer | string>();
    for (const peer of inSync) {
      const store = group.core(peer)?.targets.stored(volumeId);
      let reason = 'its store of the volume is not open';
      const data = store && (await drive(world, store.read(part.lba, part.blocks), stepsMax, (why) => (reason = why)));
      held.set(peer, data ?? reason);
    }
    out.push({ ...part, held });
  }
  return out;
}

function splitAtPages(lba: number, blocks: number): { page: number; lba: number; blocks: number }[] {
  const out: { page: number; lba: number; blocks: number }[] = [];
  for (let at = lba; at < lba + blocks; ) {
    const page = Math.floor(at / pageBlocks);
    const n = Math.min(lba + blocks - at, (page + 1) * pageBlocks - at);
    out.push({ page, lba: at, blocks: n });
    at += n;
  }
  return out;
}

/**
 * A host's path to a peer: a command fails when the peer's connection breaks (it crashed) or
 * after `ms` of true time without an answer (the initiator's command timeout).
 */
function bounded(b: BlockBackend, world: SimWorld, ms: number, peer: Endpoint): BlockBackend {
  const race = <T>(p: Promise<T>): Promise<T> => new Promise<T>((resolve, reject) => {
    const reset = (): void => reject(new Error('connection reset'));
    const t = world.after(ms, () => (peer.offCrash(reset), reject(new Error(`no answer within ${ms} ms`))));
    peer.onCrash(reset);
    const done = (): void => (world.timers.clearTimeout(t), peer.offCrash(reset));
    p.then((v) => (done(), resolve(v)), (e) => (done(), reject(e)));
  });
  return {
    blockBytes: b.blockBytes, blockCount: b.blockCount, grainBlocks: b.grainBlocks,
    read: (lba, n) => race(b.read(lba, n)),
    write: (lba, data, opts) => race(b.write(lba, data, opts)),
    unmap: (lba, n, opts) => race(b.unmap(lba, n, opts)),
    compareAndWrite: (lba, c, d, opts) => race(b.compareAndWrite(lba, c, d, opts)),
    flush: () => race(b.flush()),
    lbaStatus: (lba, n) => race(b.lbaStatus(lba, n)),
  };
}

/** Run the world until `p` settles; undefined if it failed (`why` says how) or the world ran out of steps/time. */
async function drive<T>(world: SimWorld, p: Promise<T>, stepsMax: number, why?: (reason: string) => void): Promise<T | undefined> {
  let out: { v?: T; done: boolean; err?: string } = { done: false };
  p.then((v) => (out = { v, done: true }), (e: Error) => (out = { done: true, err: e.message }));
  await world.run(world.now() + hostCommandMsMax, stepsMax, () => out.done);
  if (!out.done) why?.(`no answer within ${hostCommandMsMax} ms`);
  else if (out.err !== undefined) why?.(out.err);
  return out.v;
}

/**
 * Every holder of the snapshot's layer of the range (the copies in sync at the cut, and those
 * that took the layer since: src/snapshot/layer-sync.ts) holds what the snapshot read returned:
 * any of them may serve it once the others are lost. Read from each holder's own layer.
 */
async function holdersDiffer(world: SimWorld, group: SimGroup, volume: string, name: string, r: { lba: number; blocks: number }, data: Buffer, stepsMax: number): Promise<string[]> {
  const v = group.up()[0]?.core()?.catalog.volume(volume);
  const stored = v && group.catalog.list(snapshotKey(v.id, name))[0];
  if (!v || !stored) return [];
  const record = decodeSnapshot(stored.value);
  const routes = routesAtCut(record);
  const moving = new Map(record.moving.map((m) => [m.page, m]));
  const out: string[] = [];
  for (let at = r.lba; at < r.lba + r.blocks; ) {
    const page = Math.floor(at / record.pageBlocks);
    const { holders, blocks } = snapshotHolders(record, page, at, routes, moving);
    const n = Math.min(blocks, r.lba + r.blocks - at);
    const want = data.subarray((at - r.lba) * blockBytes, (at - r.lba + n) * blockBytes);
    for (const h of holders) {
      const layer = group.core(h)?.snapshotTargets.layer(v.id, record.seq);
      const held = layer && (await drive(world, layer.read(at, n), stepsMax));
      if (!held) out.push(`snapshot ${name}: holder ${h} has no layer of blocks ${at}+${n}`);
      else if (!held.equals(want)) out.push(`snapshot ${name}: holder ${h}'s layer of blocks ${at}+${n} differs from the snapshot's read`);
    }
    at += n;
  }
  return out;
}

/** The final read of one range through one peer, as a host command in the history. */
async function readBack(world: SimWorld, history: History, peer: string, backend: BlockBackend, r: { lba: number; blocks: number }, stepsMax: number): Promise<void> {
  const rec = history.begin({ host: 1_000, peer, kind: 'read', lba: r.lba, blocks: r.blocks });
  const data = await drive(world, backend.read(r.lba, r.blocks), stepsMax);
  if (data) history.end(rec, 'ok', decodeBlocks(data, r.lba, blockBytes, r.blocks));
  else history.end(rec, 'error');
}

/** Every extent a write, caw or unmap touched, merged, in pieces of at most 256 blocks. */
function touched(ops: readonly Op[]): { lba: number; blocks: number }[] {
  const marks = new Set<number>();
  for (const op of ops) if (op.kind === 'write' || op.kind === 'caw' || op.kind === 'unmap') for (let i = 0; i < op.blocks; i++) marks.add(op.lba + i);
  const lbas = [...marks].sort((a, b) => a - b);
  const out: { lba: number; blocks: number }[] = [];
  for (const lba of lbas) {
    const last = out[out.length - 1];
    if (last && last.lba + last.blocks === lba && last.blocks < 256) last.blocks++;
    else out.push({ lba, blocks: 1 });
  }
  return out;
}

/**
 * Undefined when no up peer holds a page of the volume (failover.ts: stepping out of it as suspect
 * after a restart, or taking it over and reconciling); else which. Its in-sync copies may differ
 * until then (the reconcile makes them equal), and host I/O of it waits (seed 32800: a primary
 * restarted with a failed write its secondary never got, stepping out; the check found them apart).
 */
function heldPage(group: SimGroup, volume: string): string | undefined {
  for (const p of group.up()) {
    const c = p.core()!;
    const v = c.catalog.volume(volume);
    for (let page = 0; v && page < pages; page++) if (c.failover?.isHeld(v.id, page)) return `page ${page} is still held by ${p.id}${c.failover.isSteppingOut(v.id, page) ? ' (stepping out as suspect)' : ' (reconciling)'}`;
  }
  return undefined;
}

/** Undefined when every up peer's route table agrees with the others' and with the catalog's record; else what differs. */
function routesAgree(group: SimGroup, volume: string): string | undefined {
  const tables = group.up().map((p) => {
    const c = p.core()!;
    return { id: p.id, volumeId: c.catalog.require(volume).id, table: c.catalog.routes(c.catalog.require(volume)) };
  });
  if (tables.length === 0) return undefined;
  for (let page = 0; page < pages; page++) {
    const views = tables.map(({ id, table }) => `${id}:${routeText(table.route(page))}`);
    const route = group.catalog.route(tables[0].volumeId, page);
    const catalog = route && routeText(route);
    const seen = new Set(views.map((x) => x.split(':')[1]));
    if (seen.size > 1 || (catalog !== undefined && !seen.has(catalog))) return `page ${page}: the peers disagree on its route (${views.join(', ')}; catalog ${catalog ?? 'no record'})`;
  }
  return undefined;
}

/** owner@version, and the copies when there are several: [primary, …] with the stale ones marked. */
function routeText(r: Route): string {
  const copies = copiesOf(r);
  const inSync = inSyncOf(r);
  return copies.length === 1 ? `${r.owner}@${r.version}` : `${r.owner}@${r.version}[${copies.map((p) => (inSync.includes(p) ? p : `${p}(stale)`)).join(',')}]`;
}

function describeOp(op: HostOp): string {
  return op.kind === 'flush' ? 'flush' : `${op.kind}${op.fua ? '+fua' : ''} ${op.lba}+${op.blocks}`;
}

function summarise(seen: readonly (number | 'garbage')[]): string {
  const ids = [...new Set(seen)];
  return `[${ids.slice(0, 4).join(',')}${ids.length > 4 ? ',…' : ''}]`;
}
