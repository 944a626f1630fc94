// What the simulator's hosts do (issue 16): each host runs one command at a time (closed
// loop), drawn here from a seeded Random: mostly small writes, some FUA, reads, COMPARE AND
// WRITEs against what the host last knew of those blocks (so some miscompare), UNMAPs (and WRITE
// SAME with UNMAP, the same request below the SCSI layer: the blocks read as zeros after) and
// SYNCHRONIZE CACHE. Most land on a few hot regions around page boundaries, so requests
// cross pages and hosts collide on the same blocks; the rest anywhere on the volume.
//
// `perform` runs one command on a backend (the router of the peer the host uses) and records
// it in the History: begin before the call, end when the answer arrives, in that order, so the
// history's order is the real one.

import type { Random } from '../../src/env/env';
import type { BlockBackend } from '../../src/store/types';
import { decodeBlocks, encodeBlock, encodeBlocks, type History, type Op, type Seen } from './history';

export interface Geometry {
  blockCount: number;
  pageBlocks: number;
  blockBytes: number;
}

export interface Mix {
  /** Relative weights of the commands. */
  write: number;
  read: number;
  caw: number;
  unmap: number;
  flush: number;
  /** Share of writes, caws and unmaps sent with FUA. */
  fuaShare: number;
  /** Share of commands outside the hot regions. */
  coldShare: number;
  hotRegions: number;
  hotRegionBlocks: number;
  /** Blocks per read or write: 1..this. */
  transferBlocksMax: number;
  cawBlocksMax: number;
}

export const defaultMix: Mix = {
  write: 41,
  read: 35,
  caw: 10,
  unmap: 4,
  flush: 10,
  fuaShare: 0.2,
  coldShare: 0.1,
  hotRegions: 8,
  hotRegionBlocks: 32,
  transferBlocksMax: 16,
  cawBlocksMax: 4,
};

export type HostOpKind = 'write' | 'read' | 'caw' | 'unmap' | 'flush';

/** A command drawn for a host, not yet run. */
export interface HostOp {
  host: number;
  kind: HostOpKind;
  lba: number;
  blocks: number;
  fua: boolean;
}

interface Region {
  lba: number;
  blocks: number;
}

export class Workload {
  readonly mix: Mix;
  /** The hot regions: page boundaries first (k * pageBlocks - hotRegionBlocks / 2 …), then anywhere. */
  readonly regions: Region[];
  /** Per host, what it last read or wrote on each block (lba → writeId, 0 for zeros). */
  private readonly known = new Map<number, Map<number, number>>();

  constructor(
    private readonly random: Random,
    readonly geometry: Geometry,
    mix: Partial<Mix> = {},
    /** Tags the ops this workload records (several volumes in one run). */
    readonly volume?: string,
  ) {
    this.mix = { ...defaultMix, ...mix };
    this.regions = this.drawRegions();
  }

  next(host: number): HostOp {
    const kind = this.drawKind();
    if (kind === 'flush') return { host, kind, lba: 0, blocks: 0, fua: false };
    const blocks = 1 + this.random.int(kind === 'caw' ? this.mix.cawBlocksMax : this.mix.transferBlocksMax);
    const fua = kind !== 'read' && this.random.float() < this.mix.fuaShare;
    return { host, kind, ...this.drawExtent(blocks), fua };
  }

  /** Run `op` through `backend` (the router of `peer`) and record it; an exception is outcome 'error'. */
  async perform(op: HostOp, backend: BlockBackend, history: History, peer: string): Promise<Op> {
    const { host, kind, lba, blocks, fua } = op;
    const rec = history.begin({ host, peer, kind, lba, blocks, ...(kind === 'read' || kind === 'flush' ? {} : { fua }), ...(this.volume === undefined ? {} : { volume: this.volume }) });
    const compared = kind === 'caw' ? this.expected(host, lba, blocks) : [];
    try {
      await this.run(rec, compared, backend, history);
    } catch (err) {
      history.fail(rec, err);
      this.forget(host, lba, blocks); // a failed write may or may not have landed
    }
    return rec;
  }

  private async run(rec: Op, compared: number[], backend: BlockBackend, history: History): Promise<void> {
    const { host, lba, blocks, fua } = rec;
    const bs = this.geometry.blockBytes;
    switch (rec.kind) {
      case 'write':
        await backend.write(lba, encodeBlocks(rec.id, lba, blocks, bs), { fua });
        history.end(rec, 'ok');
        return this.learn(host, lba, Array(blocks).fill(rec.id));
      case 'read': {
        const seen = decodeBlocks(await backend.read(lba, blocks), lba, bs, blocks);
        history.end(rec, 'ok', seen);
        return this.learn(host, lba, seen);
      }
      case 'caw': {
        const r = await backend.compareAndWrite(lba, expectedBlocks(compared, lba, bs), encodeBlocks(rec.id, lba, blocks, bs), { fua });
        history.end(rec, r.ok ? 'ok' : 'miscompare', compared);
        return r.ok ? this.learn(host, lba, Array(blocks).fill(rec.id)) : this.forget(host, lba, blocks);
      }
      case 'unmap':
        await backend.unmap(lba, blocks, { fua });
        history.end(rec, 'ok');
        return this.learn(host, lba, Array(blocks).fill(0));
      default:
        await backend.flush();
        history.end(rec, 'ok');
    }
  }

  private drawKind(): HostOpKind {
    const { write, read, caw, unmap, flush } = this.mix;
    let x = this.random.float() * (write + read + caw + unmap + flush);
    for (const [kind, weight] of [['write', write], ['read', read], ['caw', caw], ['unmap', unmap]] as const) {
      if (x < weight) return kind;
      x -= weight;
    }
    return 'flush';
  }

  private drawExtent(blocksWanted: number): Region {
    const cold = this.regions.length === 0 || this.random.float() < this.mix.coldShare;
    const within = cold ? { lba: 0, blocks: this.geometry.blockCount } : this.regions[this.random.int(this.regions.length)];
    const blocks = Math.min(blocksWanted, within.blocks);
    return { lba: within.lba + this.random.int(within.blocks - blocks + 1), blocks };
  }

  private drawRegions(): Region[] {
    const { blockCount, pageBlocks } = this.geometry;
    const span = Math.min(this.mix.hotRegionBlocks, blockCount);
    const boundaries = Array.from({ length: Math.max(0, Math.ceil(blockCount / pageBlocks) - 1) }, (_, k) => (k + 1) * pageBlocks);
    const regions: Region[] = [];
    for (let i = 0; i < this.mix.hotRegions; i++) {
      const centre = boundaries.length > 0 ? boundaries.splice(this.random.int(boundaries.length), 1)[0] : this.random.int(blockCount);
      const lba = Math.max(0, Math.min(blockCount - span, centre - Math.floor(span / 2)));
      regions.push({ lba, blocks: span });
    }
    return regions;
  }

  /** What `host` believes blocks lba.. hold (zeros where it knows nothing): the compare of its caw. */
  private expected(host: number, lba: number, blocks: number): number[] {
    const known = this.known.get(host);
    return Array.from({ length: blocks }, (_, i) => known?.get(lba + i) ?? 0);
  }

  private learn(host: number, lba: number, seen: Seen[]): void {
    let known = this.known.get(host);
    if (!known) this.known.set(host, (known = new Map()));
    seen.forEach((s, i) => (s === 'garbage' ? known!.delete(lba + i) : known!.set(lba + i, s)));
  }

  private forget(host: number, lba: number, blocks: number): void {
    for (let i = 0; i < blocks; i++) this.known.get(host)?.delete(lba + i);
  }
}

/** The blocks a caw compares against: each writeId's pattern, zeros for 0. */
function expectedBlocks(seen: number[], lba: number, blockBytes: number): Buffer {
  return Buffer.concat(seen.map((id, i) => (id === 0 ? Buffer.alloc(blockBytes) : encodeBlock(id, lba + i, blockBytes))));
}

/**
 * Record an admin snapshot of one volume, or of several as one consistency group (their ops
 * share `group` = the name): begin, `take` it (the command), end when it answers, then `read`
 * each volume's snapshot, blocks 0..blocks, into `seen` (after the end: reading is not part
 * of the command).
 */
export async function recordSnapshot(
  history: History,
  at: { peer: string; name: string; blockBytes: number; volumes: { volume?: string; blocks: number }[] },
  take: () => Promise<void>,
  read: (volume: string | undefined) => Promise<Buffer>,
): Promise<Op[]> {
  const { peer, name } = at;
  const group = at.volumes.length > 1 ? { group: name } : {};
  const recs = at.volumes.map(({ volume, blocks }) => history.begin({ host: -1, peer, kind: 'snapshot', lba: 0, blocks, snapshot: name, ...group, ...(volume === undefined ? {} : { volume }) }));
  try {
    await take();
  } catch (err) {
    for (const rec of recs) history.fail(rec, err);
    return recs;
  }
  for (const rec of recs) history.end(rec, 'ok');
  for (const rec of recs) rec.seen = decodeBlocks(await read(rec.volume), 0, at.blockBytes, rec.blocks);
  return recs;
}
