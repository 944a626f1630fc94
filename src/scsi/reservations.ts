// Reservations of one logical unit: SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations.
// Kept behind this class so a later issue can hold the state with the page owner or in the
// cluster catalog (reservations must hold across paths through different peers). Pure: the
// device turns the verdicts into status and sense.

import { prRegistrationsMax } from '../limits';
import { Asc } from './sense';

export const PrType = {
  writeExclusive: 1,
  exclusiveAccess: 3,
  writeExclusiveRegistrantsOnly: 5,
  exclusiveAccessRegistrantsOnly: 6,
  writeExclusiveAllRegistrants: 7,
  exclusiveAccessAllRegistrants: 8,
} as const;
const validTypes = new Set<number>(Object.values(PrType));

export const PrOutAction = {
  register: 0,
  reserve: 1,
  release: 2,
  clear: 3,
  preempt: 4,
  preemptAndAbort: 5,
  registerAndIgnore: 6,
  registerAndMove: 7,
} as const;

/** How a command is treated under a reservation (SPC-4 table 5.9). */
export type AccessKind = 'read' | 'write' | 'always';

export interface Registration {
  nexusKey: string;
  initiatorPort: string;
  relativeTargetPort: number;
  key: bigint;
}

export type PrVerdict =
  | { ok: true }
  | { ok: false; conflict: true }
  | { ok: false; conflict: false; asc: number; field?: { inCdb: boolean; byte: number } };

export interface PrOutParams {
  action: number;
  type: number;
  scope: number;
  key: bigint;
  serviceActionKey: bigint;
  aptpl: boolean;
  specIPt: boolean;
  allTgPt: boolean;
}

/** Unit attentions the device must post to other nexuses. */
export type UnitAttentionSink = (nexusKey: string, asc: number) => void;

const ok: PrVerdict = { ok: true };
const conflict: PrVerdict = { ok: false, conflict: true };
const invalidParam = (byte: number): PrVerdict => ({ ok: false, conflict: false, asc: Asc.invalidFieldInParameterList, field: { inCdb: false, byte } });

/** The whole state, as kept in the cluster catalog (keys as decimal strings). */
export interface ReservationState {
  generation: number;
  registrations: { nexusKey: string; initiatorPort: string; relativeTargetPort: number; key: string }[];
  holder?: string;
  type: number;
  legacyHolder?: string;
}

/**
 * Where a logical unit's reservations live. One peer alone keeps them in memory
 * (LocalReservationKeeper); a peer group keeps them in the catalog so that every path
 * through every peer sees the same state (src/cluster/shared-reservations.ts).
 */
export interface ReservationKeeper {
  /** The state access checks and PERSISTENT RESERVE IN read; never waits. */
  readonly current: Reservations;
  /** Where unit attentions raised by changes made anywhere in the group are delivered. */
  attach(sink: UnitAttentionSink): void;
  /** Apply a change; `fn` may run more than once, each time on a fresh copy of the state. */
  change<T>(fn: (r: Reservations) => T): Promise<T>;
  /** Deliver unit attentions to nexuses wherever they are logged in ("*": every nexus). */
  announce(unitAttentions: [nexusKey: string, asc: number][]): Promise<void>;
}

/** The nexus key that stands for every I_T nexus of the logical unit. */
export const everyNexus = '*';

export class LocalReservationKeeper implements ReservationKeeper {
  private sink: UnitAttentionSink = () => undefined;
  readonly current = new Reservations((k, asc) => this.sink(k, asc));
  attach(sink: UnitAttentionSink): void {
    this.sink = sink;
  }
  async change<T>(fn: (r: Reservations) => T): Promise<T> {
    return fn(this.current);
  }
  async announce(unitAttentions: [nexusKey: string, asc: number][]): Promise<void> {
    for (const [k, asc] of unitAttentions) this.sink(k, asc);
  }
}

export class Reservations {
  generation = 0;
  private readonly registrations = new Map<string, Registration>();
  private holder: string | undefined; // nexus key; unused for all-registrants types
  private type = 0;
  /** SPC-2 RESERVE(6)/(10) holder. */
  private legacyHolder: string | undefined;

  constructor(private readonly unitAttention: UnitAttentionSink) {}

  state(): ReservationState {
    return {
      generation: this.generation,
      registrations: [...this.registrations.values()].map((r) => ({ ...r, key: r.key.toString() })),
      holder: this.holder,
      type: this.type,
      legacyHolder: this.legacyHolder,
    };
  }

  load(s: ReservationState): void {
    this.generation = s.generation;
    this.registrations.clear();
    for (const r of s.registrations) this.registrations.set(r.nexusKey, { ...r, key: BigInt(r.key) });
    this.holder = s.holder;
    this.type = s.type;
    this.legacyHolder = s.legacyHolder;
  }

  // ---- access checks -------------------------------------------------------------------

  /** May this nexus run a command of this kind now? */
  allows(nexusKey: string, kind: AccessKind, isLegacyReservationCommand: boolean): boolean {
    if (this.legacyHolder !== undefined && this.legacyHolder !== nexusKey) {
      // RELEASE from a non-holder is GOOD and changes nothing; RESERVE conflicts in reserve().
      return kind === 'always' || isLegacyReservationCommand;
    }
    if (this.type === 0 || kind === 'always') return true;
    if (this.isHolder(nexusKey)) return true;
    const registered = this.registrations.has(nexusKey);
    switch (this.type) {
      case PrType.writeExclusive:
        return kind === 'read';
      case PrType.exclusiveAccess:
        return false;
      case PrType.writeExclusiveRegistrantsOnly:
      case PrType.writeExclusiveAllRegistrants:
        return registered || kind === 'read';
      default:
        return registered;
    }
  }

  private allRegistrantsType(): boolean {
    return this.type === PrType.writeExclusiveAllRegistrants || this.type === PrType.exclusiveAccessAllRegistrants;
  }

  private isHolder(nexusKey: string): boolean {
    if (this.type === 0) return false;
    if (this.allRegistrantsType()) return this.registrations.has(nexusKey);
    return this.holder === nexusKey;
  }

  // ---- SPC-2 RESERVE / RELEASE ---------------------------------------------------------

  legacyReserve(nexusKey: string): boolean {
    if (this.type !== 0 || this.registrations.size > 0) return false;
    if (this.legacyHolder !== undefined && this.legacyHolder !== nexusKey) return false;
    this.legacyHolder = nexusKey;
    return true;
  }

  legacyRelease(nexusKey: string): void {
    if (this.legacyHolder === nexusKey) this.legacyHolder = undefined;
  }

  hasLegacyReservation(): boolean {
    return this.legacyHolder !== undefined;
  }

  /** LU reset and nexus loss drop the SPC-2 reservation (persistent ones survive). */
  resetLegacy(nexusKey?: string): void {
    if (nexusKey === undefined || this.legacyHolder === nexusKey) this.legacyHolder = undefined;
  }

  // ---- PERSISTENT RESERVE OUT -------------------------------------------------------------

  out(nexusKey: string, initiatorPort: string, relativeTargetPort: number, p: PrOutParams): PrVerdict {
    if (this.legacyHolder !== undefined) return conflict;
    if (p.aptpl) return invalidParam(20);
    if (p.specIPt) return invalidParam(20);
    if (p.allTgPt) return invalidParam(20);
    const mine = this.registrations.get(nexusKey);
    if (p.action === PrOutAction.register || p.action === PrOutAction.registerAndIgnore) {
      return this.register(nexusKey, initiatorPort, relativeTargetPort, mine, p);
    }
    if (!mine || mine.key !== p.key) return conflict;
    switch (p.action) {
      case PrOutAction.reserve:
        return this.reserve(nexusKey, p);
      case PrOutAction.release:
        return this.release(nexusKey, p);
      case PrOutAction.clear:
        return this.clear(nexusKey);
      case PrOutAction.preempt:
      case PrOutAction.preemptAndAbort:
        return this.preempt(nexusKey, p);
      default:
        return { ok: false, conflict: false, asc: Asc.invalidFieldInCdb, field: { inCdb: true, byte: 1 } };
    }
  }

  private register(nexusKey: string, initiatorPort: string, relativeTargetPort: number, mine: Registration | undefined, p: PrOutParams): PrVerdict {
    const ignore = p.action === PrOutAction.registerAndIgnore;
    if (!mine) {
      if (!ignore && p.key !== 0n) return conflict;
      if (p.serviceActionKey === 0n) return ok;
      if (this.registrations.size >= prRegistrationsMax) return { ok: false, conflict: false, asc: 0x5504 /* insufficient registration resources */ };
      this.registrations.set(nexusKey, { nexusKey, initiatorPort, relativeTargetPort, key: p.serviceActionKey });
      this.generation++;
      return ok;
    }
    if (!ignore && p.key !== mine.key) return conflict;
    if (p.serviceActionKey === 0n) {
      this.unregister(nexusKey);
    } else {
      mine.key = p.serviceActionKey;
    }
    this.generation++;
    return ok;
  }

  private unregister(nexusKey: string): void {
    this.registrations.delete(nexusKey);
    if (this.type === 0) return;
    if (this.allRegistrantsType() ? this.registrations.size === 0 : this.holder === nexusKey) {
      const releasedType = this.type;
      this.dropReservation();
      if (releasedType === PrType.writeExclusiveRegistrantsOnly || releasedType === PrType.exclusiveAccessRegistrantsOnly) {
        this.notifyRegistrants(undefined, Asc.reservationsReleased);
      }
    }
  }

  private reserve(nexusKey: string, p: PrOutParams): PrVerdict {
    if (p.scope !== 0) return { ok: false, conflict: false, asc: Asc.invalidFieldInCdb, field: { inCdb: true, byte: 2 } };
    if (!validTypes.has(p.type)) return { ok: false, conflict: false, asc: Asc.invalidFieldInCdb, field: { inCdb: true, byte: 2 } };
    if (this.type === 0) {
      this.type = p.type;
      this.holder = nexusKey;
      return ok;
    }
    if (this.isHolder(nexusKey) && this.type === p.type) return ok;
    return conflict;
  }

  private release(nexusKey: string, p: PrOutParams): PrVerdict {
    if (this.type === 0 || !this.isHolder(nexusKey)) return ok;
    if (p.type !== this.type || p.scope !== 0) return { ok: false, conflict: false, asc: Asc.invalidReleaseOfPersistentReservation };
    const releasedType = this.type;
    this.dropReservation();
    if (releasedType !== PrType.writeExclusive && releasedType !== PrType.exclusiveAccess) {
      this.notifyRegistrants(nexusKey, Asc.reservationsReleased);
    }
    return ok;
  }

  private clear(nexusKey: string): PrVerdict {
    this.notifyRegistrants(nexusKey, Asc.reservationsPreempted);
    this.registrations.clear();
    this.dropReservation();
    this.generation++;
    return ok;
  }

  private preempt(nexusKey: string, p: PrOutParams): PrVerdict {
    const holderKey = this.holder !== undefined ? this.registrations.get(this.holder)?.key : undefined;
    if (this.type !== 0 && this.allRegistrantsType() && p.serviceActionKey === 0n) {
      // All-registrants reservation: preempting key 0 removes every other registrant and takes it over.
      for (const k of [...this.registrations.keys()]) {
        if (k !== nexusKey) this.removePreempted(k);
      }
      this.type = p.type;
      this.holder = nexusKey;
      this.generation++;
      return ok;
    }
    if (this.type === 0 || this.allRegistrantsType() || holderKey !== p.serviceActionKey) {
      if (p.serviceActionKey === 0n) return invalidParam(8);
      let removed = 0;
      for (const r of [...this.registrations.values()]) {
        if (r.key === p.serviceActionKey) {
          this.removePreempted(r.nexusKey);
          removed++;
        }
      }
      if (removed === 0) return conflict;
      this.generation++;
      return ok;
    }
    // The reservation holder is preempted: remove every registration with that key, take the reservation.
    for (const r of [...this.registrations.values()]) {
      if (r.key === p.serviceActionKey && r.nexusKey !== nexusKey) this.removePreempted(r.nexusKey);
    }
    this.type = p.type;
    this.holder = nexusKey;
    this.generation++;
    return ok;
  }

  private removePreempted(nexusKey: string): void {
    this.registrations.delete(nexusKey);
    this.unitAttention(nexusKey, Asc.registrationsPreempted);
  }

  private dropReservation(): void {
    this.type = 0;
    this.holder = undefined;
  }

  private notifyRegistrants(except: string | undefined, asc: number): void {
    for (const k of this.registrations.keys()) {
      if (k !== except) this.unitAttention(k, asc);
    }
  }

  // ---- PERSISTENT RESERVE IN ------------------------------------------------------------

  readKeys(): Buffer {
    const keys = [...this.registrations.values()];
    const b = Buffer.alloc(8 + 8 * keys.length);
    b.writeUInt32BE(this.generation >>> 0, 0);
    b.writeUInt32BE(8 * keys.length, 4);
    keys.forEach((r, i) => b.writeBigUInt64BE(r.key, 8 + 8 * i));
    return b;
  }

  readReservation(): Buffer {
    if (this.type === 0) {
      const b = Buffer.alloc(8);
      b.writeUInt32BE(this.generation >>> 0, 0);
      return b;
    }
    const b = Buffer.alloc(24);
    b.writeUInt32BE(this.generation >>> 0, 0);
    b.writeUInt32BE(16, 4);
    const key = this.allRegistrantsType() ? 0n : (this.registrations.get(this.holder!)?.key ?? 0n);
    b.writeBigUInt64BE(key, 8);
    b[21] = this.type & 0x0f;
    return b;
  }

  static reportCapabilities(): Buffer {
    const b = Buffer.alloc(8);
    b.writeUInt16BE(8, 0);
    b[2] = 0x10; // CRH: RESERVE/RELEASE(6) behave per SPC-3 when registrations exist
    b[3] = 0x80 | (1 << 4); // TMV, ALLOW COMMANDS = 1
    b[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02; // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
    b[5] = 0x01; // EX_AC_AR
    return b;
  }

  readFullStatus(): Buffer {
    const parts: Buffer[] = [];
    for (const r of this.registrations.values()) {
      const name = Buffer.from(r.initiatorPort + '\0', 'utf8');
      const idLength = (4 + name.length + 3) & ~3;
      const d = Buffer.alloc(24 + idLength);
      d.writeBigUInt64BE(r.key, 0);
      if (this.isHolder(r.nexusKey)) {
        d[12] = 0x01;
        d[13] = this.type & 0x0f;
      }
      d.writeUInt16BE(r.relativeTargetPort, 18);
      d.writeUInt32BE(idLength, 20);
      d[24] = 0x40 | 0x05; // TransportID format 01 (initiator port name), protocol iSCSI
      d.writeUInt16BE(idLength - 4, 26);
      name.copy(d, 28);
      parts.push(d);
    }
    const body = Buffer.concat(parts);
    const head = Buffer.alloc(8);
    head.writeUInt32BE(this.generation >>> 0, 0);
    head.writeUInt32BE(body.length, 4);
    return Buffer.concat([head, body]);
  }
}
