// Where each piece of a migrating page lives (DESIGN.md 4). A move copies a page from its
// source S to a destination D piece by piece, in order. Pieces before `done` are on D (S
// forwards their I/O there); the piece in transit is being copied: its writes go to both
// copies, its reads to the copy being copied from; pieces after it are still only on S.
// Cancelling copies the done pieces back from D in reverse order, the same way. Pure.

export type PieceHome = 'source' | 'dest' | 'transit';

export type MoveState = 'copying' | 'committing' | 'cancelling';

export interface MoveCursor {
  pieces: number;
  /** Pieces [0, done) hold their current data on the destination only. */
  done: number;
  /** The piece being copied (forward: piece `done`; cancelling: piece `done - 1`), or -1. */
  transit: number;
  state: MoveState;
}

export function homeOf(c: MoveCursor, piece: number): PieceHome {
  if (piece === c.transit) return 'transit';
  return piece < c.done ? 'dest' : 'source';
}

/** The copy a piece in transit is read from: S when moving forward, D when copying back. */
export function transitReadsFromDest(c: MoveCursor): boolean {
  return c.state === 'cancelling';
}

export interface Segment {
  piece: number;
  lba: number;
  blocks: number;
  /** Blocks before this segment in the request. */
  offsetBlocks: number;
}

/** Cut [lba, lba + blocks), all inside the page starting at `pageLba`, at piece boundaries. */
export function segmentsOf(pageLba: number, pieceBlocks: number, lba: number, blocks: number): Segment[] {
  const out: Segment[] = [];
  let offset = 0;
  while (offset < blocks) {
    const at = lba + offset;
    const piece = Math.floor((at - pageLba) / pieceBlocks);
    const n = Math.min(blocks - offset, pageLba + (piece + 1) * pieceBlocks - at);
    out.push({ piece, lba: at, blocks: n, offsetBlocks: offset });
    offset += n;
  }
  return out;
}

/** Pieces of a page: `pieceBytes` of data each (the last may be shorter at the volume's end). */
export function pieceGeometry(pageBlocks: number, blockBytes: number, pieceBytes: number): { pieceBlocks: number; pieces: number } {
  const pieceBlocks = Math.max(1, Math.min(pageBlocks, Math.floor(pieceBytes / blockBytes)));
  return { pieceBlocks, pieces: Math.ceil(pageBlocks / pieceBlocks) };
}

/** The durable record of a move, kept by the source (and its intent in the catalog). */
export interface MoveCheckpoint {
  volumeId: string;
  page: number;
  from: string;
  to: string;
  /** The route version the move started from; the commit makes it version + 1 on `to`. */
  routeVersion: number;
  pieces: number;
  pieceBlocks: number;
  done: number;
  state: MoveState;
  startedAtMs: number;
  /**
   * This move's own id, also in its catalog intent: two attempts to move a page from the same
   * route version to the same peer are told apart (a failed start's clean-up must not remove
   * the next attempt's intent). Absent in checkpoints written before it existed.
   */
  id?: string;
}

export function encodeCheckpoint(c: MoveCheckpoint): Buffer {
  return Buffer.from(JSON.stringify(c));
}

export function decodeCheckpoint(b: Buffer): MoveCheckpoint | undefined {
  try {
    const c = JSON.parse(b.toString('utf8')) as MoveCheckpoint;
    const ints = [c.page, c.routeVersion, c.pieces, c.pieceBlocks, c.done, c.startedAtMs];
    if (typeof c.volumeId !== 'string' || typeof c.from !== 'string' || typeof c.to !== 'string') return undefined;
    if (!ints.every((n) => Number.isSafeInteger(n) && n >= 0) || c.done > c.pieces) return undefined;
    if (!['copying', 'committing', 'cancelling'].includes(c.state)) return undefined;
    return c;
  } catch {
    return undefined;
  }
}

export const checkpointKey = (volumeId: string, page: number): string => `move-out/${volumeId}/${String(page).padStart(10, '0')}`;
export const incomingKey = (volumeId: string, page: number): string => `move-in/${volumeId}/${String(page).padStart(10, '0')}`;
