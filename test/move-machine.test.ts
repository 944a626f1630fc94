// The page move's state machine (src/migration/move-machine.ts) without I/O: events in, actions
// out. A scripted world answers each action with its usual outcome unless a test says otherwise;
// the tests read the actions as a transcript.

import t from 'tap';
import { ConflictError, NotFoundError, PeersanError } from '../src/errors';
import { MoveMachine, retryMs, type MoveAction, type MoveEvent } from '../src/migration/move-machine';
import type { MoveCheckpoint } from '../src/migration/pieces';

const blockBytes = 512;
const chunkBlocks = (64 * 1024) / blockBytes; // 128
const pieceBlocks = 2 * chunkBlocks; // two chunks a piece
const pageLba = 8192;

function checkpoint(over: Partial<MoveCheckpoint> = {}): MoveCheckpoint {
  return { volumeId: 'v1', page: 1, from: 'p1', to: 'p2', routeVersion: 4, pieces: 2, pieceBlocks, done: 0, state: 'copying', startedAtMs: 0, id: 'm1', ...over };
}

function machine(over: Partial<MoveCheckpoint> = {}, opts: { resumed?: boolean; duty?: number; pieceBlocks?: number } = {}): MoveMachine {
  const cp = checkpoint({ pieceBlocks: opts.pieceBlocks ?? pieceBlocks, ...over });
  return new MoveMachine(cp, { pageLba, blockCount: 1 << 20, blockBytes }, { resumed: opts.resumed ?? false, duty: opts.duty ?? 1 });
}

/** An action as one line of a transcript. */
function line(a: MoveAction): string {
  switch (a.kind) {
    case 'setTransit':
    case 'clearTransit':
      return `${a.kind} ${a.piece}`;
    case 'copyChunk':
      return `copy${a.back ? 'Back' : ''} ${a.piece} @${a.lba - pageLba}+${a.blocks}${a.last ? ' FUA' : ''}`;
    case 'markPiece':
      return `markPiece ${a.piece} done=${a.done}${a.ifClean ? ' ifClean' : ''} (checkpoint done=${a.checkpoint.done} ${a.checkpoint.state})`;
    case 'persist':
      return `persist ${a.checkpoint.state} done=${a.checkpoint.done}`;
    case 'setRoute':
      return `setRoute from v${a.version}${a.confirm ? '' : ' unconfirmed'}`;
    case 'finish':
      return `finish ${a.committed ? `committed v${a.version}` : 'cancelled'}`;
    case 'release':
      return `release${a.free ? ' free' : ''}`;
    case 'armTimer':
      return `armTimer ${a.ms}`;
    case 'throttle':
      return `throttle ${a.bytes}`;
    case 'ended':
      return `ended ${a.outcome}${a.outcome === 'committed' ? ` v${a.version}` : ''}${a.outcome === 'stopped' ? `: ${a.error.message}` : ''}`;
    default:
      return a.kind;
  }
}

/** The usual outcome of an action: everything succeeds, the CAS makes version + 1. */
function usual(m: MoveMachine, a: MoveAction): MoveEvent | undefined {
  switch (a.kind) {
    case 'prepare':
      return { kind: 'prepared' };
    case 'enterStep':
      return { kind: 'stepEntered' };
    case 'throttle':
      return { kind: 'throttled' };
    case 'setTransit':
      return { kind: 'transitSet' };
    case 'copyChunk':
      return { kind: 'chunkCopied', ms: 1 };
    case 'markPiece':
      return { kind: 'pieceMarked' };
    case 'clearTransit':
      return { kind: 'transitCleared' };
    case 'persist':
      return { kind: 'persisted' };
    case 'setRoute':
      return { kind: 'routeSet', version: a.version + 1 };
    case 'readRoute':
      return { kind: 'routeRead', owner: m.cp.from, version: m.cp.routeVersion };
    case 'finish':
      return { kind: 'finished' };
    case 'deleteIntent':
      return { kind: 'intentDeleted' };
    case 'release':
      return { kind: 'released' };
    case 'armTimer':
      return { kind: 'timer' };
    case 'handOff':
      return { kind: 'handedOff', handed: true };
    default:
      return undefined;
  }
}

/**
 * Step the machine from `first`, answering each pending action with `answer` (undefined: the usual
 * outcome), until it is over or `until` says stop (checked after every step). Returns the transcript.
 */
function run(m: MoveMachine, answer: (a: MoveAction, n: number) => MoveEvent | undefined = () => undefined, until: (m: MoveMachine, lines: string[]) => boolean = () => false, first: MoveEvent = { kind: 'begin' }): string[] {
  const lines: string[] = [];
  let ev: MoveEvent | undefined = first;
  for (let n = 0; ev && n < 1000; n++) {
    const out = m.step(ev);
    lines.push(...out.map(line));
    if (m.over || until(m, lines)) break;
    const pending = out.at(-1);
    if (!pending) throw new Error(`nothing pending after ${ev.kind}`);
    ev = answer(pending, n) ?? usual(m, pending);
  }
  return lines;
}

/** The transcript of one forward piece, every chunk and the mark. */
function forwardPiece(piece: number): string[] {
  const at = piece * pieceBlocks;
  return [
    'enterStep', `setTransit ${piece}`, 'leaveStep',
    'throttle 65536', 'enterStep', `copy ${piece} @${at}+128`, 'leaveStep',
    'throttle 65536', 'enterStep', `copy ${piece} @${at + 128}+128 FUA`, 'leaveStep',
    'enterStep', `markPiece ${piece} done=${piece + 1} ifClean (checkpoint done=${piece + 1} copying)`, 'leaveStep',
  ];
}

function backPiece(piece: number): string[] {
  const at = piece * pieceBlocks;
  return [
    'enterStep', `setTransit ${piece}`, 'leaveStep',
    'throttle 65536', 'enterStep', `copyBack ${piece} @${at}+128`, 'leaveStep',
    'throttle 65536', 'enterStep', `copyBack ${piece} @${at + 128}+128 FUA`, 'leaveStep',
    'enterStep', `markPiece ${piece} done=${piece} (checkpoint done=${piece} cancelling)`, 'leaveStep',
  ];
}

const commitLines = ['enterStep', 'persist committing done=2', 'readRoute', 'setRoute from v4', 'finish committed v5', 'deleteIntent', 'release free', 'leaveStep', 'ended committed v5'];
const rollbackEnd = ['finish cancelled', 'deleteIntent', 'release', 'ended cancelled'];

t.test('a fresh move: each piece set in transit, copied in chunks (the last FUA), marked; then the commit as one step', async (t) => {
  const m = machine();
  t.equal(m.phase, 'copying');
  t.same(run(m), [...forwardPiece(0), ...forwardPiece(1), ...commitLines]);
  t.equal(m.phase, 'committed');
  t.equal(m.done, 2);
  t.equal(m.bytesCopied, 2 * pieceBlocks * blockBytes, 'bytes copied: the whole page');
  t.equal(m.lastError, '');
});

t.test('inspectable state along the way: piece in transit, cursor, phase', async (t) => {
  const m = machine();
  const seen: string[] = [];
  run(m, () => undefined, (mm, lines) => {
    const last = lines.at(-1) ?? '';
    if (last.startsWith('copy ') || last.startsWith('markPiece') || last.startsWith('persist')) seen.push(`${mm.phase} transit=${mm.transit} done=${mm.done}`);
    return false;
  });
  t.same(seen, [
    'copying transit=0 done=0', 'copying transit=0 done=0', 'copying transit=0 done=0',
    'copying transit=1 done=1', 'copying transit=1 done=1', 'copying transit=1 done=1',
    'committing transit=-1 done=2',
  ]);
});

t.test('a failed chunk starts its piece again from the first chunk, after retryMs', async (t) => {
  const m = machine();
  let failed = false;
  const lines = run(m, (a) => {
    if (a.kind === 'copyChunk' && a.piece === 0 && a.last && !failed) {
      failed = true;
      return { kind: 'chunkFailed', error: new PeersanError('peer p2 is unreachable') };
    }
    return undefined;
  }, (mm, l) => l.at(-1) === `armTimer ${retryMs}` && mm.lastError !== '');
  t.same(lines.slice(-4), ['enterStep', 'copy 0 @128+128 FUA', 'leaveStep', `armTimer ${retryMs}`]);
  t.equal(m.lastError, 'peer p2 is unreachable', 'the failure is shown');
  t.equal(m.transit, 0, 'the piece stays in transit');
  t.equal(m.bytesCopied, 128 * blockBytes);
  const again = run(m, undefined, undefined, { kind: 'timer' });
  t.same(again.slice(0, 4), ['throttle 65536', 'enterStep', 'copy 0 @0+128', 'leaveStep'], 'the first chunk again, not the failed one');
  t.same(again.slice(4, 11), forwardPiece(0).slice(7), 'then the rest of the piece and its mark');
  t.equal(m.phase, 'committed');
  t.equal(m.lastError, '', 'a success clears the failure');
});

t.test('a chunk refused with a conflict or a missing record stops the move (its checkpoint resumes it)', async (t) => {
  for (const error of [new ConflictError('no recorded move'), new NotFoundError('no volume')]) {
    const m = machine();
    const lines = run(m, (a) => (a.kind === 'copyChunk' ? { kind: 'chunkFailed', error } : undefined));
    t.same(lines.slice(-3), [`copy 0 @0+128`, 'leaveStep', `ended stopped: ${error.message}`]);
    t.equal(m.phase, 'stopped');
    t.equal(m.lastError, error.message);
  }
});

t.test('a piece a dual write missed on D is set in transit and copied again, not marked', async (t) => {
  const m = machine();
  let dirty = true;
  const lines = run(m, (a) => {
    if (a.kind === 'markPiece' && dirty) {
      dirty = false;
      return { kind: 'pieceDirty' };
    }
    return undefined;
  });
  t.same(lines, [...forwardPiece(0).slice(0, 13), 'leaveStep', ...forwardPiece(0), ...forwardPiece(1), ...commitLines]);
});

t.test('cancel before the commit: the forward copy stops at the next chunk, the piece is cleared, done pieces come back last first', async (t) => {
  const m = machine({ pieces: 3 });
  const lines = run(m, (a) => {
    if (a.kind === 'copyChunk' && a.piece === 2 && !a.last) {
      t.ok(m.cancellable);
      t.same(m.step({ kind: 'cancel' }), [], 'a cancel is recorded; the pending action goes on');
      t.ok(m.cancelRequested);
    }
    return undefined;
  });
  const copied = [...forwardPiece(0), ...forwardPiece(1)];
  t.same(lines.slice(0, copied.length), copied);
  t.same(lines.slice(copied.length), [
    'enterStep', 'setTransit 2', 'leaveStep', 'throttle 65536', 'enterStep', 'copy 2 @512+128', 'leaveStep',
    'enterStep', 'clearTransit 2', 'leaveStep',
    'turnBack', 'persist cancelling done=2',
    ...backPiece(1), ...backPiece(0),
    'prepare', // D confirms what came back from it (it did not restart meanwhile)
    ...rollbackEnd,
  ]);
  t.equal(m.phase, 'cancelled');
  t.equal(m.done, 0);
});

t.test('cancel while the commit step waits for its turn (a snapshot holds the volume): honoured, nothing decided yet', async (t) => {
  const m = machine();
  const lines = run(m, (a) => {
    if (a.kind === 'enterStep' && m.done === 2 && !m.cancelRequested) m.step({ kind: 'cancel' });
    return undefined;
  });
  t.same(lines.slice(forwardPiece(0).length * 2), ['enterStep', 'leaveStep', 'turnBack', 'persist cancelling done=2', ...backPiece(1), ...backPiece(0), 'prepare', ...rollbackEnd]);
});

t.test('cancel after the commit is decided: refused (a CAS may be on its way); the move commits', async (t) => {
  const m = machine();
  const lines = run(m, (a) => {
    if (a.kind === 'persist' && a.checkpoint.state === 'committing') {
      t.notOk(m.cancellable, 'not cancellable once committing');
      t.same(m.step({ kind: 'cancel' }), []);
      t.notOk(m.cancelRequested, 'the cancel is not recorded');
    }
    if (a.kind === 'setRoute') m.step({ kind: 'cancel' });
    return undefined;
  });
  t.same(lines.slice(-commitLines.length), commitLines);
  t.equal(m.phase, 'committed');
});

t.test('a cancel during a copy back is a no-op; a cancelled or ended move ignores events', async (t) => {
  const m = machine({ done: 1, state: 'cancelling' });
  t.ok(m.cancelRequested, 'a cancelling checkpoint: cancel asked');
  const lines = run(m, (a) => {
    if (a.kind === 'copyChunk') m.step({ kind: 'cancel' });
    return undefined;
  });
  t.same(lines, ['turnBack', 'persist cancelling done=1', ...backPiece(0), 'prepare', ...rollbackEnd]);
  t.same(m.step({ kind: 'cancel' }), []);
  t.same(m.step({ kind: 'timer' }), [], 'over: nothing more');
});

t.test('restart: resumes from the checkpoint after PREPARE (not fresh), copying the piece in transit again from its first chunk', async (t) => {
  const m = machine({ done: 1 }, { resumed: true });
  t.equal(m.phase, 'preparing');
  let refusals = 1;
  const lines = run(m, (a) => (a.kind === 'prepare' && refusals-- > 0 ? { kind: 'prepareFailed', error: new PeersanError('peer p2 is starting') } : undefined));
  t.same(lines.slice(0, 3), ['prepare', `armTimer ${retryMs}`, 'prepare'], 'PREPARE until D answers');
  t.same(lines.slice(3), [...forwardPiece(1), ...commitLines], 'pieces [0, done) stay on D: the copy goes on at piece 1');
});

t.test('restart of a cancelling move goes on copying back; of a committing one, commits and cannot be cancelled', async (t) => {
  const c = machine({ done: 2, state: 'cancelling' }, { resumed: true });
  t.ok(c.cancelRequested);
  t.same(run(c), ['prepare', 'turnBack', 'persist cancelling done=2', ...backPiece(1), ...backPiece(0), 'prepare', ...rollbackEnd]);
  const m = machine({ done: 2, state: 'committing' }, { resumed: true });
  t.notOk(m.cancellable);
  m.step({ kind: 'cancel' });
  t.same(run(m), ['prepare', ...commitLines]);
});

t.test('the commit CAS: a lost answer or a conflict is settled by reading the route', async (t) => {
  t.test('ok', async (t) => {
    t.same(run(machine({ done: 2 })).slice(0, 5), ['enterStep', 'persist committing done=2', 'readRoute', 'setRoute from v4', 'finish committed v5']);
  });
  t.test('the copies changed since the move began (resync, a copy dropped: the epoch moved on): the CAS starts from the version read', async (t) => {
    const lines = run(machine({ done: 2 }), (a) => (a.kind === 'readRoute' ? { kind: 'routeRead', owner: 'p1', version: 7 } : undefined));
    t.same(lines.slice(2, 5), ['readRoute', 'setRoute from v7', 'finish committed v8']);
  });
  t.test('conflict while this peer is still primary (a change of the copies meanwhile): read again and CAS again at once', async (t) => {
    let reads = 0;
    const lines = run(machine({ done: 2 }), (a) => {
      if (a.kind === 'setRoute' && a.version === 4) return { kind: 'routeSetFailed', error: new ConflictError('page 1 is at p1 v5, not p1 v4') };
      if (a.kind === 'readRoute') return { kind: 'routeRead', owner: 'p1', version: reads++ === 0 ? 4 : 5 };
      return undefined;
    });
    t.same(lines.slice(2, 7), ['readRoute', 'setRoute from v4', 'readRoute', 'setRoute from v5', 'finish committed v6']);
  });
  t.test('conflict, and the route is already ours-committed ({D, v + 1}: a CAS before a restart, or whose answer was lost)', async (t) => {
    const m = machine({ done: 2 });
    let reads = 0;
    const lines = run(m, (a) => {
      if (a.kind === 'setRoute') return { kind: 'routeSetFailed', error: new ConflictError('page 1 is at p2 v5, not p1 v4') };
      if (a.kind === 'readRoute' && reads++ > 0) return { kind: 'routeRead', owner: 'p2', version: 5 };
      return undefined;
    });
    t.same(lines, ['enterStep', 'persist committing done=2', 'readRoute', 'setRoute from v4', 'readRoute', 'finish committed v5', 'deleteIntent', 'release free', 'leaveStep', 'ended committed v5']);
    t.equal(m.lastError, '');
  });
  t.test('D as primary before any CAS of this move (made so by another move, simulator seed 23891): not ours; abandoned, nothing freed here', async (t) => {
    const m = machine({ done: 2 });
    const lines = run(m, (a) => (a.kind === 'readRoute' ? { kind: 'routeRead', owner: 'p2', version: 7 } : undefined));
    t.same(lines, ['enterStep', 'persist committing done=2', 'readRoute', 'lostPage', 'finish cancelled', 'deleteIntent', 'release', 'leaveStep', 'ended cancelled']);
  });
  t.test('resumed after a restart while committing: D as primary at the first read is our CAS from before the restart', async (t) => {
    const m = machine({ done: 2, state: 'committing' }, { resumed: true });
    const lines = run(m, (a) => (a.kind === 'readRoute' ? { kind: 'routeRead', owner: 'p2', version: 5 } : undefined));
    t.ok(lines.includes('finish committed v5'), lines.join(', '));
    t.ok(lines.includes('release free'));
  });
  t.test('another primary (a takeover): the move is abandoned, nothing copied back, D frees its copy', async (t) => {
    const m = machine({ done: 2 });
    const lines = run(m, (a) => (a.kind === 'readRoute' ? { kind: 'routeRead', owner: 'p3', version: 5 } : undefined));
    t.same(lines, ['enterStep', 'persist committing done=2', 'readRoute', 'lostPage', 'finish cancelled', 'deleteIntent', 'release', 'leaveStep', 'ended cancelled']);
  });
  t.test('ambiguous (no answer): the route read shows it did not happen, or cannot be read; the CAS is tried again', async (t) => {
    const m = machine({ done: 2 });
    let cas = 0;
    let reads = 0;
    const lines = run(m, (a) => {
      if (a.kind === 'setRoute' && cas++ < 2) return { kind: 'routeSetFailed', error: new PeersanError('catalog unreachable') };
      if (a.kind === 'readRoute' && reads++ === 2) return { kind: 'routeReadFailed', error: new PeersanError('catalog still unreachable') };
      return undefined;
    });
    t.same(lines, [
      'enterStep', 'persist committing done=2', 'readRoute',
      'setRoute from v4', 'readRoute', `armTimer ${retryMs}`,
      'setRoute from v4', 'readRoute', `armTimer ${retryMs}`, 'readRoute', `armTimer ${retryMs}`,
      'setRoute from v4', 'finish committed v5', 'deleteIntent', 'release free', 'leaveStep', 'ended committed v5',
    ], 'all inside the one commit step');
  });
  t.test('ambiguous, and the CAS did go through', async (t) => {
    const m = machine({ done: 2 });
    let reads = 0;
    const lines = run(m, (a) => {
      if (a.kind === 'setRoute') return { kind: 'routeSetFailed', error: new PeersanError('timed out') };
      if (a.kind === 'readRoute' && reads++ > 0) return { kind: 'routeRead', owner: 'p2', version: 5 };
      return undefined;
    });
    t.same(lines.slice(2, 6), ['readRoute', 'setRoute from v4', 'readRoute', 'finish committed v5']);
  });
});

t.test('the page has another primary while it moves (lost): abandoned at the next piece boundary; a role got back does not commit', async (t) => {
  const m = machine();
  const lines = run(m, (a) => {
    if (a.kind === 'copyChunk' && a.piece === 0) t.same(m.step({ kind: 'lost' }), [], 'recorded; the pending action goes on');
    return undefined;
  });
  t.same(lines, [...forwardPiece(0), 'lostPage', ...rollbackEnd]);
  const back = machine({ done: 2 });
  const commit = run(back, (a) => {
    if (a.kind === 'persist') back.step({ kind: 'lost' });
    return undefined;
  });
  t.same(commit, ['enterStep', 'persist committing done=2', 'readRoute', 'lostPage', 'finish cancelled', 'deleteIntent', 'release', 'leaveStep', 'ended cancelled'], 'this peer primary again: its copy misses what went to D');
});

t.test('clean-up: FINISH after a commit is tried once (D reads the catalog); after a cancel, until D answers; the intent until it is gone', async (t) => {
  const m = machine({ done: 2 });
  let intentFails = 1;
  const lines = run(m, (a) => {
    if (a.kind === 'finish') return { kind: 'finishFailed', error: new PeersanError('p2 down') };
    if (a.kind === 'deleteIntent' && intentFails-- > 0) return { kind: 'intentDeleteFailed', error: new PeersanError('catalog down') };
    return undefined;
  }, (mm, l) => {
    if (l.at(-1) === 'deleteIntent' && l.length === 6) t.match(mm.lastError, /did not confirm the commit.*p2 down/);
    return false;
  });
  t.same(lines, ['enterStep', 'persist committing done=2', 'readRoute', 'setRoute from v4', 'finish committed v5', 'deleteIntent', `armTimer ${retryMs}`, 'deleteIntent', 'release free', 'leaveStep', 'ended committed v5']);
  const c = machine({ done: 0, state: 'cancelling' });
  let finishFails = 2;
  const back = run(c, (a) => (a.kind === 'finish' && finishFails-- > 0 ? { kind: 'finishFailed', error: new PeersanError('p2 down') } : undefined));
  t.same(back, ['turnBack', 'persist cancelling done=0', 'finish cancelled', `armTimer ${retryMs}`, 'finish cancelled', `armTimer ${retryMs}`, ...rollbackEnd]);
});

t.test('stop (the peer stopping, an action that failed): inside a step it leaves the step first', async (t) => {
  const m = machine();
  t.same(m.step({ kind: 'begin' }), [{ kind: 'enterStep' }]);
  t.same(m.step({ kind: 'stepEntered' }), [{ kind: 'setTransit', piece: 0 }]);
  const out = m.step({ kind: 'stop', error: new PeersanError('peer stopping') });
  t.same(out.map(line), ['leaveStep', 'ended stopped: peer stopping']);
  t.equal(m.phase, 'stopped');
  const w = machine();
  w.step({ kind: 'begin' });
  t.same(w.step({ kind: 'stop', error: new PeersanError('peer stopping') }).map(line), ['ended stopped: peer stopping'], 'waiting for its turn: no step to leave');
});

t.test('an outcome the machine does not wait for is a broken invariant', async (t) => {
  const m = machine();
  t.throws(() => m.step({ kind: 'chunkCopied', ms: 1 }), /assertion failed: move machine: chunkCopied while awaiting begin/);
  m.step({ kind: 'begin' });
  t.throws(() => m.step({ kind: 'pieceMarked' }), /while awaiting stepEntered/);
});

t.test('pacing: after a chunk that waited behind other work, a pause (ChunkPacer); none after a piece\'s last chunk', async (t) => {
  const m = machine({ pieces: 1 }, { duty: 0.5, pieceBlocks: 3 * chunkBlocks });
  const ms = [10, 100, 1000];
  let i = 0;
  const lines = run(m, (a) => (a.kind === 'copyChunk' ? { kind: 'chunkCopied', ms: ms[i++] } : undefined));
  t.same(lines.slice(3, 16), [
    'throttle 65536', 'enterStep', 'copy 0 @0+128', 'leaveStep',
    'throttle 65536', 'enterStep', 'copy 0 @128+128', 'leaveStep', 'armTimer 80',
    'throttle 65536', 'enterStep', 'copy 0 @256+128 FUA', 'leaveStep',
  ], '100 ms against a fastest 10: 80 ms waited, paused as long at duty 0.5');
  t.equal(lines[16], 'enterStep');
});

t.test('a short last piece at the end of the volume', async (t) => {
  const m = new MoveMachine(checkpoint(), { pageLba, blockCount: pageLba + pieceBlocks + 100, blockBytes }, { resumed: false, duty: 1 });
  const lines = run(m);
  t.same(lines.filter((l) => l.startsWith('copy')), ['copy 0 @0+128', 'copy 0 @128+128 FUA', 'copy 1 @256+100 FUA']);
});

t.test('D restarted while receiving a replicated page (it refuses the confirm, a PREPARE again): no commit; the role goes to an in-sync copy, the move is abandoned', async (t) => {
  const refused = (): MoveEvent => ({ kind: 'prepareFailed', error: new ConflictError('p2 restarted while receiving page 1') });
  t.test('at the commit: the confirm runs with the CAS (the same quiet); refused, the page is handed off and the move abandoned', async (t) => {
    const m = machine({ done: 2 });
    const lines = run(m, (a) => (a.kind === 'setRoute' ? refused() : undefined));
    t.same(lines, ['enterStep', 'persist committing done=2', 'readRoute', 'setRoute from v4', 'handOff', 'lostPage', 'finish cancelled', 'deleteIntent', 'release', 'leaveStep', 'ended cancelled']);
    t.equal(m.phase, 'cancelled');
  });
  t.test('no in-sync copy took the role yet: tried again; none exists: D\'s copy is the best there is, committed unconfirmed', async (t) => {
    let tries = 0;
    const lines = run(machine({ done: 2 }), (a) => {
      if (a.kind === 'setRoute' && a.confirm) return refused();
      if (a.kind === 'handOff') return tries++ === 0 ? { kind: 'handOffFailed', error: new PeersanError('no in-sync copy of page 1 took it over yet') } : { kind: 'handedOff', handed: false };
      return undefined;
    });
    t.same(lines, [
      'enterStep', 'persist committing done=2', 'readRoute', 'setRoute from v4', 'handOff', `armTimer ${retryMs}`, 'handOff',
      'readRoute', 'setRoute from v4 unconfirmed', 'finish committed v5', 'deleteIntent', 'release free', 'leaveStep', 'ended committed v5',
    ]);
  });
  t.test('the confirm unanswered (D down): the commit is tried again, from the route read', async (t) => {
    let confirms = 0;
    const lines = run(machine({ done: 2 }), (a) => (a.kind === 'setRoute' && confirms++ === 0 ? { kind: 'prepareFailed', error: new PeersanError('p2 unreachable') } : undefined));
    t.same(lines, ['enterStep', 'persist committing done=2', 'readRoute', 'setRoute from v4', `armTimer ${retryMs}`, 'readRoute', 'setRoute from v4', 'finish committed v5', 'deleteIntent', 'release free', 'leaveStep', 'ended committed v5']);
  });
  t.test('at the end of a roll-back: what came back from D is not trusted either', async (t) => {
    const m = machine({ done: 1, state: 'cancelling' });
    const lines = run(m, (a) => (a.kind === 'prepare' ? refused() : undefined));
    t.same(lines, ['turnBack', 'persist cancelling done=1', ...backPiece(0), 'prepare', 'handOff', 'lostPage', ...rollbackEnd]);
  });
  t.test('at a resume after a restart of S too (it used to stop the move for good)', async (t) => {
    const m = machine({ done: 1 }, { resumed: true });
    t.same(run(m, (a) => (a.kind === 'prepare' ? refused() : undefined)), ['prepare', 'handOff', 'lostPage', ...rollbackEnd]);
  });
});
