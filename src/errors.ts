// One root error with a stable `code`; subclasses fix `name` and `code`. Operating errors
// (bad input, a peer gone) are these; broken invariants are plain assertion failures.
//
// Errors on the block path also carry a `kind`: what went wrong in terms a host can act on.
// The kind is what crosses peers (a failed reply frame carries it, src/routing/frame.ts), so
// the peer that answers the host maps the owner's failure, however many hops away, to the
// same sense data (src/scsi/sense.ts senseForKind), never to a message turned into text.

/** Stable numbers: they travel in reply frames between peers of different versions. */
export const ErrorKind = {
  /** Not classified: a bug or something unexpected (the host sees HARDWARE ERROR). */
  other: 0,
  /** The store could not read the blocks. */
  storeRead: 1,
  /** The store could not write the blocks (or make them durable). */
  storeWrite: 2,
  /** The store has no space for new blocks (a thin volume over-committed). */
  noSpace: 3,
  /** A transient state the host should retry: a route in flux, a peer being reconnected. */
  busy: 4,
  /** No reachable copy of the data: its owner is down. */
  unavailable: 5,
  /** The owner did not answer in time. */
  timedOut: 6,
  /** A change to something read-only (a snapshot). */
  readOnly: 7,
  /** The request itself was refused (bad fields, out of range): a bug or a hostile sender. */
  invalid: 8,
} as const;
export type ErrorKind = (typeof ErrorKind)[keyof typeof ErrorKind];
const errorKinds = new Set<number>(Object.values(ErrorKind));

export function isErrorKind(n: number): n is ErrorKind {
  return errorKinds.has(n);
}

export class PeersanError extends Error {
  readonly code: string;
  /** What the failure means on the block path (see ErrorKind); set by subclasses. */
  readonly kind: ErrorKind;
  constructor(message: string, code = 'PEERSAN_ERR', options?: { cause?: unknown; kind?: ErrorKind }) {
    super(message, options);
    this.name = 'PeersanError';
    this.code = code;
    this.kind = options?.kind ?? ErrorKind.other;
  }
}

export class InvalidArgumentError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_INVALID_ARGUMENT', { ...options, kind: ErrorKind.invalid });
    this.name = 'InvalidArgumentError';
  }
}

export class NotFoundError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_NOT_FOUND', options);
    this.name = 'NotFoundError';
  }
}

export class AlreadyExistsError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_ALREADY_EXISTS', options);
    this.name = 'AlreadyExistsError';
  }
}

/** A compare-and-swap in the catalog lost: somebody changed the record first. */
export class ConflictError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_CONFLICT', options);
    this.name = 'ConflictError';
  }
}

export class UnauthorizedError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_UNAUTHORIZED', options);
    this.name = 'UnauthorizedError';
  }
}

/** Work refused because the component is closing or closed. */
export class ClosedError extends PeersanError {
  constructor(message = 'closed', options?: { cause?: unknown }) {
    // A closing volume or peer: the host retries, and finds the volume again elsewhere or later.
    super(message, 'PEERSAN_ERR_CLOSED', { ...options, kind: ErrorKind.busy });
    this.name = 'ClosedError';
  }
}

/** A write to something read-only (a snapshot's view); the SCSI layer answers DATA PROTECT / WRITE PROTECTED. */
export class ReadOnlyError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_READ_ONLY', { ...options, kind: ErrorKind.readOnly });
    this.name = 'ReadOnlyError';
  }
}

/** Protocol violation on the wire: the connection gets a Reject or is dropped. */
export class ProtocolError extends PeersanError {
  /** RFC 7143 Reject reason code to send, when a Reject is the answer. */
  readonly rejectReason: number | undefined;
  constructor(message: string, rejectReason?: number, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_PROTOCOL', options);
    this.name = 'ProtocolError';
    this.rejectReason = rejectReason;
  }
}

/**
 * A peer that owns the data could not be reached, or did not answer in time. The host sees
 * ABORTED COMMAND with LOGICAL UNIT COMMUNICATION FAILURE / TIME-OUT, never a hang; or BUSY
 * when `transient` (the stream to a live peer broke: the next try reconnects, and either
 * reaches the peer or finds it down).
 */
export class PeerUnavailableError extends PeersanError {
  readonly peer: string;
  /** The request never reached the peer (refused, or no channel): nothing of it can have been applied there. */
  readonly unsent: boolean;
  constructor(peer: string, message: string, timedOut: boolean, options?: { cause?: unknown; transient?: boolean; unsent?: boolean }) {
    const kind = options?.transient ? ErrorKind.busy : timedOut ? ErrorKind.timedOut : ErrorKind.unavailable;
    super(`peer ${peer}: ${message}`, 'PEERSAN_ERR_PEER_UNAVAILABLE', { cause: options?.cause, kind });
    this.name = 'PeerUnavailableError';
    this.peer = peer;
    this.unsent = options?.unsent === true;
  }
}

/** The store failed to read (EIO and the like, wrapped where the file is read: src/store/data-file.ts). */
export class StoreReadError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_STORE_READ', { ...options, kind: ErrorKind.storeRead });
    this.name = 'StoreReadError';
  }
}

/** The store failed to write or to make a write durable. */
export class StoreWriteError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_STORE_WRITE', { ...options, kind: ErrorKind.storeWrite });
    this.name = 'StoreWriteError';
  }
}

/** The store's file system is full (ENOSPC, EDQUOT): thin volumes promised more than there is. */
export class NoSpaceError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_NO_SPACE', { ...options, kind: ErrorKind.noSpace });
    this.name = 'NoSpaceError';
  }
}

/**
 * A failure another peer reported in a reply frame: its kind, as the peer classified it, and
 * its text for the log. Rebuilt on this side so that the kind, not the text, decides.
 */
export class RemoteFailureError extends PeersanError {
  readonly peer: string;
  constructor(peer: string, kind: ErrorKind, message: string) {
    super(`peer ${peer}: ${message}`, 'PEERSAN_ERR_REMOTE', { kind });
    this.name = 'RemoteFailureError';
    this.peer = peer;
  }
}

/** errno codes that mean "no space left", whatever layer reports them. */
const noSpaceCodes = new Set(['ENOSPC', 'EDQUOT']);

function errnoCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^E[A-Z0-9]+$/.test(code) ? code : undefined;
}

/**
 * The kind of any error reaching the block path. Ours carry it; a system error (an `errno`
 * code such as EIO from a file or a decorator below the store) is a read or a write failure
 * by what the command was doing, or no space; anything else is `other` (a bug).
 */
export function errorKindOf(err: unknown, writing: boolean): ErrorKind {
  if (err instanceof PeersanError) return err.kind;
  const code = errnoCode(err);
  return code === undefined ? ErrorKind.other : errnoKind(code, writing);
}

/** A system error code as a store failure: no space, else a read or write error by what was being done. */
function errnoKind(code: string, writing: boolean): ErrorKind {
  if (noSpaceCodes.has(code)) return ErrorKind.noSpace;
  return writing ? ErrorKind.storeWrite : ErrorKind.storeRead;
}

const storeErrorOfKind = { [ErrorKind.noSpace]: NoSpaceError, [ErrorKind.storeWrite]: StoreWriteError, [ErrorKind.storeRead]: StoreReadError } as const;

/** A system error from the store's file as one of ours (the original attached as `cause`). */
export function storeError(err: unknown, writing: boolean, what: string): PeersanError {
  if (err instanceof PeersanError) return err;
  const message = `${what}: ${err instanceof Error ? err.message : String(err)}`;
  const kind = errnoKind(errnoCode(err) ?? '', writing) as keyof typeof storeErrorOfKind;
  return new storeErrorOfKind[kind](message, { cause: err });
}

export function assert(cond: unknown, message: string): asserts cond {
  if (!cond) throw new Error(`assertion failed: ${message}`);
}
