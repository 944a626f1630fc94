// One root error with a stable `code`; subclasses fix `name` and `code`. Operating errors
// (bad input, a peer gone) are these; broken invariants are plain assertion failures.

export class PeersanError extends Error {
  readonly code: string;
  constructor(message: string, code = 'PEERSAN_ERR', options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'PeersanError';
    this.code = code;
  }
}

export class InvalidArgumentError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_INVALID_ARGUMENT', options);
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
    super(message, 'PEERSAN_ERR_CLOSED', options);
    this.name = 'ClosedError';
  }
}

/** A write to something read-only (a snapshot's view); the SCSI layer answers DATA PROTECT / WRITE PROTECTED. */
export class ReadOnlyError extends PeersanError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, 'PEERSAN_ERR_READ_ONLY', options);
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
 * ABORTED COMMAND with LOGICAL UNIT COMMUNICATION FAILURE / TIME-OUT, never a hang.
 */
export class PeerUnavailableError extends PeersanError {
  readonly peer: string;
  readonly timedOut: boolean;
  constructor(peer: string, message: string, timedOut: boolean, options?: { cause?: unknown }) {
    super(`peer ${peer}: ${message}`, 'PEERSAN_ERR_PEER_UNAVAILABLE', options);
    this.name = 'PeerUnavailableError';
    this.peer = peer;
    this.timedOut = timedOut;
  }
}

export function assert(cond: unknown, message: string): asserts cond {
  if (!cond) throw new Error(`assertion failed: ${message}`);
}
