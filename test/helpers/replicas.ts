// What the replication tests and the failover soak (bench/failover-soak.js) share: the CLI's
// view of a replicated volume (protection, copies), /metrics sums, and a verifying writer whose
// every block says who wrote it and when, with the ledger that tells a lost acknowledged write
// from a write whose outcome the host never learned.

import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { openSession, type RawIscsi, type ScsiResult } from './fuzz-iscsi';
import { cliPath, hasTool, qemuImg, repoRoot, type TestPeer } from './processes';

export type Protection = 'healthy' | 'degraded' | 'rebuilding' | 'unavailable';

/**
 * Whether the built CLI knows `volume create --replicas` (the replicated data path is there);
 * the reason it does not otherwise, for a test's skip message.
 */
export function replicasMissing(): string | false {
  if (!existsSync(join(repoRoot, 'dist', 'cli', 'main.js'))) return 'dist/ is not built';
  const r = spawnSync(process.execPath, [cliPath, 'volume', 'create', '--help'], { encoding: 'utf8', timeout: 30_000 });
  return /--replicas\b/.test(`${r.stdout}${r.stderr}`) ? false : 'the CLI has no `volume create --replicas` yet';
}

/** Why a replicated process test cannot run here (a tool missing, or no `--replicas`); false when it can. */
export function replicatedTestSkip(tools: string[]): string | false {
  const missing = tools.filter((x) => !hasTool(x));
  if (missing.length) return `missing ${missing.join(', ')} (.ci/run installs etcd-server, qemu-utils)`;
  const why = replicasMissing();
  return why ? `${why}: the replicated data path of issue 17 is not here` : false;
}

/** The group of these tests: pages stay where placement put them, hosts on the portal they chose. */
export const quietGroup = { clusterYaml: ['hostBalance: { enabled: false }'], rootYaml: ['balancer: { enabled: false }'] };

/** qemu-img compare of `file` with the volume through `via` (a difference or a failure is a failed check, not a throw). */
export async function identical(t: { match(found: unknown, wanted: RegExp, message: string): unknown }, file: string, via: TestPeer, volume = 'data'): Promise<void> {
  const out = await qemuImg(['compare', '-f', 'raw', '-F', 'raw', file, via.url(volume)], 600_000).catch((err: Error) => err.message.slice(0, 500));
  t.match(out, /Images are identical/, `${volume} identical through ${via.id}`);
}

/** `volume show --json`'s protection as `via` sees it; undefined when `via` does not answer. */
export async function protectionOf(via: TestPeer, volume: string): Promise<Protection | undefined> {
  const r = await via.cliAsync('--json', 'volume', 'show', volume);
  if (r.status !== 0) return undefined;
  try {
    return (JSON.parse(r.out) as { protection?: Protection }).protection;
  } catch {
    return undefined;
  }
}

/**
 * Wait (asking every 500 ms, through the first live peer of `peers()`) until the volume's
 * protection is `want`; the time it took. Throws at `timeoutMs` with what was seen last.
 */
export async function waitProtection(peers: () => TestPeer[], volume: string, want: Protection, timeoutMs: number): Promise<number> {
  const started = Date.now();
  let seen: string | undefined;
  while (Date.now() - started < timeoutMs) {
    for (const via of peers()) {
      seen = await protectionOf(via, volume);
      if (seen !== undefined) break;
    }
    if (seen === want) return Date.now() - started;
    await new Promise((r) => setTimeout(r, 500));
  }
  throw new Error(`volume ${volume} not ${want} within ${timeoutMs} ms (last seen: ${seen ?? 'no answer'})`);
}

export interface PageCopies {
  owner: string;
  /** Every peer holding a copy, primary first. */
  copies: string[];
  /** The copies that hold every acknowledged write. */
  inSync: string[];
}

/** `page map --json`'s pages: the primary, every copy (primary first), the in-sync ones. */
export async function pageCopies(via: TestPeer, volume: string): Promise<PageCopies[]> {
  const r = await via.cliAsync('--json', 'page', 'map', volume);
  if (r.status !== 0) throw new Error(`page map ${volume} through ${via.id}: ${r.out.trim()}`);
  return (JSON.parse(r.out) as { pages: Partial<PageCopies>[] }).pages.map((p) => {
    const copies = p.copies ?? [p.owner!];
    return { owner: p.owner!, copies, inSync: p.inSync ?? copies };
  });
}

/** The sum of a counter over its series in one peer's /metrics; undefined when the peer does not answer. */
export async function metricOf(p: TestPeer, name: string): Promise<number | undefined> {
  try {
    const r = await fetch(`http://127.0.0.1:${p.httpPort}/metrics`, { signal: AbortSignal.timeout(5_000) });
    if (!r.ok) return undefined;
    return sumMetric(await r.text(), name);
  } catch {
    return undefined;
  }
}

/** Sum the samples of `name` (any labels) in a Prometheus text exposition. */
export function sumMetric(text: string, name: string): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (m && m[1] === name) sum += Number(m[3]);
  }
  return sum;
}

// ---- the verifying writer ------------------------------------------------------------------------

const magic = 0x5045_4552; // "PEER"

/**
 * The content of write `seq` of `writer` to `slot`: a header naming them, then bytes derived
 * from it, so a block read back says exactly which write it holds (or that it holds none).
 */
export function blockContent(writer: number, slot: number, seq: number, bytes: number): Buffer {
  const b = Buffer.alloc(bytes);
  const digest = createHash('sha256').update(`${writer}/${slot}/${seq}`).digest();
  for (let at = 16; at < bytes; at += digest.length) digest.copy(b, at);
  b.writeUInt32BE(magic, 0);
  b.writeUInt32BE(writer, 4);
  b.writeUInt32BE(slot, 8);
  b.writeUInt32BE(seq, 12);
  return b;
}

/** Which write a block holds: its seq; 0 for a block never written (zeros); -1 for anything else. */
export function writeIn(b: Buffer, writer: number, slot: number): number {
  if (b.every((x) => x === 0)) return 0;
  if (b.length < 16 || b.readUInt32BE(0) !== magic || b.readUInt32BE(4) !== writer || b.readUInt32BE(8) !== slot) return -1;
  const seq = b.readUInt32BE(12);
  return blockContent(writer, slot, seq, b.length).equals(b) ? seq : -1;
}

interface SlotState {
  /** The last acknowledged write. */
  acked?: number;
  /** A write whose outcome is unknown (failed or timed out): the slot is retired after it. */
  unknown?: number;
}

/**
 * What each slot of one writer may hold. A slot whose write failed or timed out is never written
 * again (an aborted command may still land later, so no later write could be told from it): it
 * may hold that write or the last acknowledged one.
 */
export class Ledger {
  private readonly slots = new Map<number, SlotState>();

  constructor(readonly writer: number) {}

  usable(slot: number): boolean {
    return this.slots.get(slot)?.unknown === undefined;
  }

  acked(slot: number, seq: number): void {
    this.slots.set(slot, { acked: seq });
  }

  unknown(slot: number, seq: number): void {
    this.slots.set(slot, { ...this.slots.get(slot), unknown: seq });
  }

  written(): number[] {
    return [...this.slots.keys()];
  }

  /** Undefined when `content` is allowed for the slot; else what is wrong. */
  check(slot: number, content: Buffer): string | undefined {
    const s = this.slots.get(slot) ?? {};
    const seq = writeIn(content, this.writer, slot);
    if (seq === (s.acked ?? 0) || (seq === s.unknown && seq !== undefined)) return undefined;
    return `writer ${this.writer} slot ${slot}: holds ${seq === -1 ? 'foreign bytes' : seq === 0 ? 'zeros' : `write ${seq}`}, acknowledged ${s.acked ?? 'none'}${s.unknown !== undefined ? `, unknown ${s.unknown}` : ''}`;
  }
}

export interface SlotGeometry {
  /** Bytes per slot (one write). */
  slotBytes: number;
  blockBytes: number;
}

/** Read every written slot of `ledger` through a fresh session to `port`; the slots that hold what they must not. */
export async function verifyLedger(port: number, volume: string, ledger: Ledger, g: SlotGeometry, timeoutMs = 30_000): Promise<string[]> {
  const c = await openSession(port, volume);
  const wrong: string[] = [];
  try {
    const blocks = g.slotBytes / g.blockBytes;
    for (const slot of ledger.written()) {
      const r = await retryingUnitAttention(() => c.readBlocks(slot * blocks, blocks, g.blockBytes, timeoutMs));
      if (!r || r.status !== 0) wrong.push(`slot ${slot}: read failed (${r ? `status ${r.status}` : 'timed out'})`);
      else {
        const why = ledger.check(slot, r.data);
        if (why) wrong.push(why);
      }
    }
  } finally {
    c.close();
  }
  return wrong;
}

const unitAttention = 0x6;
/** UNIT ATTENTIONs answered in a row before a command counts as failed (a real initiator's retries). */
const unitAttentionRetriesMax = 4;

/**
 * A command as an initiator runs it: a CHECK CONDITION with UNIT ATTENTION (an ALUA state
 * change, a reset) means the command did not run; it is sent again, as Linux and libiscsi do.
 */
export async function retryingUnitAttention(run: () => Promise<ScsiResult | undefined>): Promise<ScsiResult | undefined> {
  for (let i = 0; ; i++) {
    const r = await run();
    if (r?.status !== 0x02 || r.sense?.key !== unitAttention || i >= unitAttentionRetriesMax) return r;
  }
}

/**
 * One write of the verifying writer: acknowledged (GOOD), else failed or timed out; its ledger
 * updated. `failed(why)` hears how a write that was not acknowledged ended (status and sense, or
 * no answer in time).
 */
export async function verifiedWrite(c: RawIscsi, ledger: Ledger, slot: number, seq: number, g: SlotGeometry, timeoutMs: number, failed?: (why: string) => void): Promise<boolean> {
  const r = await retryingUnitAttention(() => c.writeBlocks(slot * (g.slotBytes / g.blockBytes), blockContent(ledger.writer, slot, seq, g.slotBytes), g.blockBytes, timeoutMs));
  const ok = r !== undefined && r.status === 0;
  if (ok) ledger.acked(slot, seq);
  else {
    ledger.unknown(slot, seq);
    failed?.(outcome(r, timeoutMs));
  }
  return ok;
}

/** A command's end in words: its status and sense (key/ASC/ASCQ in hex), or that it had no answer. */
export function outcome(r: ScsiResult | undefined, timeoutMs: number): string {
  if (!r) return `no answer within ${timeoutMs} ms (or the connection ended)`;
  const hex = (n: number) => n.toString(16).padStart(2, '0');
  return `status 0x${hex(r.status)}${r.sense ? ` sense ${hex(r.sense.key)}/${hex(r.sense.asc)}/${hex(r.sense.ascq)}` : ''}`;
}
