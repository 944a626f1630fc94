// The snapshot coordinator and participant as state machines (src/snapshot/coordinator.ts,
// participant.ts), without I/O: events in, actions out. Coordinator: both modes' happy paths, a
// failure at each phase, a deadline, late and duplicated answers. Participant: PREPARE, TAKE,
// RELEASE / FINISH / ABORT in both modes, the expiry, refusals, holds counted across snapshots. Actions are shown as short strings ("send PREPARE p1", "arm TAKE p2 3000")
// so that each test reads as the exchange it checks.

import t, { type Test } from 'tap';
import { SnapshotCoordinator, type Answer, type CoordinatorAction, type Step } from '../src/snapshot/coordinator';
import { SnapshotParticipant, type ParticipantAction, type ParticipantEvent } from '../src/snapshot/participant';
import type { SnapshotMode } from '../src/snapshot/records';

const peers = ['p1', 'p2', 'p3'];

function machine(mode: SnapshotMode, volumeIds = ['v1'], clock = 0): SnapshotCoordinator {
  return new SnapshotCoordinator({ snapshotId: 's1', mode, volumeIds, peers, clock: () => clock });
}

function show(actions: CoordinatorAction[]): string[] {
  return actions.map((a) => {
    switch (a.kind) {
      case 'send': return `send ${a.step} ${a.peer}`;
      case 'arm': return `arm ${a.step} ${a.peer} ${a.ms}`;
      case 'disarm': return `disarm ${a.step} ${a.peer}`;
      case 'createRecord': return `createRecord ${a.volume}`;
      case 'updateRecord': return `updateRecord ${a.volume} held ${a.heldMs}`;
      case 'deleteRecord': return `deleteRecord ${a.volume}`;
      case 'cut': return `cut moving ${a.moving.map((m) => m.page).join(',')}${a.suspect.length === 0 ? '' : ` suspect ${a.suspect.map((x) => `${x.page}@${x.peer}`).join(',')}`}${a.cut === undefined ? '' : ` T ${a.cut}`}`;
      case 'distrust': return `distrust ${a.suspect.map((x) => `${x.page}@${x.peer}`).join(',')}`;
      case 'taken': return `taken held ${a.heldMs}`;
      case 'aborted': return `aborted: ${a.reason.message}`;
    }
  });
}

const moving = (page: number) => ({ volumeId: 'v1', page, from: 'p1', to: 'p2', done: 1, pieceBlocks: 8 });
const suspect = (page: number, peer: string) => ({ volumeId: 'v1', page, peer });

/** A plain answer to `step`. */
function plain(step: Step): Answer {
  if (step === 'PREPARE') return { step, reply: { clock: 0, moving: [], suspect: [] } };
  if (step === 'TAKE') return { step, moving: [], suspect: [] };
  if (step === 'REACH') return { step };
  return { step, heldMs: 0 };
}

function answer(m: SnapshotCoordinator, peer: string, a: Answer): string[] {
  return show(m.step({ kind: 'answer', peer, ...a }));
}

/** Every peer answers the current step plainly; the actions of the last answer. */
function allAnswer(m: SnapshotCoordinator): string[] {
  const step = m.current!;
  let last: string[] = [];
  for (const p of m.waiting) last = answer(m, p, plain(step));
  return last;
}

/** Start, write the records, and answer every round plainly until the machine waits for `step`. */
function until(t: Test, m: SnapshotCoordinator, step: Step | 'publish'): void {
  m.step({ kind: 'start' });
  m.o.volumeIds.forEach((_, volume) => m.step({ kind: 'recordCreated', volume, seq: 10 + volume }));
  while (m.current !== step && m.phase === 'rounds') allAnswer(m);
  t.equal(m.current ?? m.phase, step, `waiting for ${step}`);
}

t.test('barrier: records, REACH, PREPARE, TAKE, cut, RELEASE, publish', async (t) => {
  const m = machine('barrier', ['v1', 'v2']);
  t.same(show(m.step({ kind: 'start' })), ['createRecord 0'], 'records first, one at a time');
  t.same(show(m.step({ kind: 'recordCreated', volume: 0, seq: 7 })), ['createRecord 1']);
  t.same(show(m.step({ kind: 'recordCreated', volume: 1, seq: 3 })), ['send REACH p1', 'send REACH p2', 'send REACH p3'], 'then every peer reached, without a deadline of its own');
  t.same(answer(m, 'p2', plain('REACH')), []);
  t.same(answer(m, 'p1', plain('REACH')), []);
  const prepare = m.step({ kind: 'answer', peer: 'p3', step: 'REACH' });
  t.same(show(prepare), ['send PREPARE p1', 'arm PREPARE p1 4000', 'send PREPARE p2', 'arm PREPARE p2 4000', 'send PREPARE p3', 'arm PREPARE p3 4000'], 'PREPARE once every peer is reached');
  t.same(prepare[0], { kind: 'send', peer: 'p1', step: 'PREPARE', req: { snapshotId: 's1', volumeIds: ['v1', 'v2'] } }, 'PREPARE names the volumes (barrier: no mode)');

  t.same(answer(m, 'p3', plain('PREPARE')), ['disarm PREPARE p3']);
  t.same(answer(m, 'p1', plain('PREPARE')), ['disarm PREPARE p1']);
  t.same([m.current, m.answered, m.waiting], ['PREPARE', ['p3', 'p1'], ['p2']], 'inspectable: the step, who answered, who is awaited');
  const take = m.step({ kind: 'answer', peer: 'p2', ...plain('PREPARE') });
  t.same(show(take), ['disarm PREPARE p2', 'send TAKE p1', 'arm TAKE p1 3000', 'send TAKE p2', 'arm TAKE p2 3000', 'send TAKE p3', 'arm TAKE p3 3000'], 'TAKE only once every peer is prepared (gates closed and drained)');
  t.same(take[1], { kind: 'send', peer: 'p1', step: 'TAKE', req: { snapshotId: 's1', layers: [{ volumeId: 'v1', seq: 7 }, { volumeId: 'v2', seq: 3 }] } }, 'TAKE carries the layer numbers of the records');

  t.same(answer(m, 'p1', { step: 'TAKE', moving: [moving(4)], suspect: [] }), ['disarm TAKE p1']);
  t.same(answer(m, 'p2', { step: 'TAKE', moving: [], suspect: [suspect(2, 'p2')] }), ['disarm TAKE p2']);
  t.same(answer(m, 'p3', { step: 'TAKE', moving: [moving(9)], suspect: [] }), ['disarm TAKE p3', 'cut moving 4,9 suspect 2@p2', 'send RELEASE p1', 'send RELEASE p2', 'send RELEASE p3'], 'the cut (routes read, suspect copies left out) before any RELEASE');

  t.same(answer(m, 'p1', { step: 'RELEASE', heldMs: 5 }), []);
  t.same(show(m.step({ kind: 'failed', peer: 'p2', step: 'RELEASE', error: new Error('gone') })), [], 'a RELEASE that fails does not fail the snapshot (the gates reopen by themselves)');
  t.same(answer(m, 'p3', { step: 'RELEASE', heldMs: 9 }), ['updateRecord 0 held 9'], 'records ready once every peer let go, with the longest hold');
  t.equal(m.phase, 'publish');
  t.same(show(m.step({ kind: 'recordUpdated', volume: 0 })), ['updateRecord 1 held 9']);
  t.same(show(m.step({ kind: 'recordUpdated', volume: 1 })), ['taken held 9']);
  t.equal(m.phase, 'taken');
});

t.test('timestamp: PREPARE, T past every clock, TAKE(T), FINISH', async (t) => {
  const m = machine('timestamp', ['v1'], 200);
  until(t, m, 'PREPARE');
  t.same(answer(m, 'p1', { step: 'PREPARE', reply: { clock: 100, moving: [moving(2)], suspect: [suspect(0, 'p1')] } }), ['disarm PREPARE p1']);
  t.same(answer(m, 'p2', { step: 'PREPARE', reply: { clock: 250, moving: [], suspect: [] } }), ['disarm PREPARE p2']);
  const take = m.step({ kind: 'answer', peer: 'p3', step: 'PREPARE', reply: { clock: 180, moving: [moving(5)], suspect: [suspect(3, 'p3')] } });
  t.same(show(take), ['disarm PREPARE p3', 'cut moving 2,5 suspect 0@p1,3@p3 T 251', 'send TAKE p1', 'arm TAKE p1 6000', 'send TAKE p2', 'arm TAKE p2 6000', 'send TAKE p3', 'arm TAKE p3 6000'], 'T = max(clocks, the coordinator\'s) + 1, fixed before TAKE');
  t.same(take[2], { kind: 'send', peer: 'p1', step: 'TAKE', req: { snapshotId: 's1', layers: [{ volumeId: 'v1', seq: 10 }], cut: 251 } });
  t.same(allAnswer(m), ['disarm TAKE p3', 'send FINISH p1', 'arm FINISH p1 3000', 'send FINISH p2', 'arm FINISH p2 3000', 'send FINISH p3', 'arm FINISH p3 3000'], 'FINISH once every peer sealed T');
  t.same(allAnswer(m), ['disarm FINISH p3', 'updateRecord 0 held 0'], 'nothing held in timestamp mode');
  t.same(show(m.step({ kind: 'recordUpdated', volume: 0 })), ['taken held 0']);

  // Seed 138: a copy whose drop waits for the catalog, reported by its primary at TAKE(T), is left out before FINISH.
  const late = machine('timestamp', ['v1'], 200);
  until(t, late, 'TAKE');
  t.same(answer(late, 'p1', { step: 'TAKE', moving: [], suspect: [suspect(2, 'p2')] }), ['disarm TAKE p1']);
  t.same(answer(late, 'p2', plain('TAKE')), ['disarm TAKE p2']);
  t.same(answer(late, 'p3', plain('TAKE')), ['disarm TAKE p3', 'distrust 2@p2', 'send FINISH p1', 'arm FINISH p1 3000', 'send FINISH p2', 'arm FINISH p2 3000', 'send FINISH p3', 'arm FINISH p3 3000'], 'the copies that may lack a change before T are distrusted, then FINISH');

  // The coordinator's own clock ahead of every answer: T is past it too.
  const ahead = machine('timestamp', ['v1'], 900);
  until(t, ahead, 'PREPARE');
  t.match(allAnswer(ahead), ['disarm PREPARE p3', 'cut moving  T 901']);
});

t.test('the PREPARE of timestamp mode names the mode and the layers to freeze', async (t) => {
  const m = machine('timestamp', ['v1', 'v2']);
  m.step({ kind: 'start' });
  m.step({ kind: 'recordCreated', volume: 0, seq: 4 });
  m.step({ kind: 'recordCreated', volume: 1, seq: 1 });
  const prepare = peers.flatMap((p) => m.step({ kind: 'answer', peer: p, step: 'REACH' }));
  t.same(prepare[0], { kind: 'send', peer: 'p1', step: 'PREPARE', req: { snapshotId: 's1', volumeIds: ['v1', 'v2'], mode: 'timestamp', layers: [{ volumeId: 'v1', seq: 4 }, { volumeId: 'v2', seq: 1 }] } });
});

// A failure at each phase: what is let go, what is deleted, and the reason.
const release = { barrier: 'RELEASE', timestamp: 'ABORT' } as const;
for (const mode of ['barrier', 'timestamp'] as const) {
  for (const step of ['REACH', 'PREPARE', 'TAKE', ...(mode === 'timestamp' ? ['FINISH' as const] : [])] as const) {
    t.test(`${mode}: p2 fails ${step}`, async (t) => {
      const m = machine(mode, ['v1', 'v2']);
      until(t, m, step);
      t.same(answer(m, 'p1', plain(step)), step === 'REACH' ? [] : [`disarm ${step} p1`]);
      const abort = show(m.step({ kind: 'failed', peer: 'p2', step, error: new Error('connection reset') }));
      const reason = step === 'REACH' ? 'connection reset' : `${step} failed: connection reset`;
      if (step === 'REACH') {
        t.same(abort, ['deleteRecord 0'], 'out of reach: nothing was held, nothing to let go; the records go');
      } else {
        t.same(abort, [`disarm ${step} p2`, `disarm ${step} p3`, ...peers.map((p) => `send ${release[mode]} ${p}`)], `every peer gets ${release[mode]} (its pending timers disarmed)`);
        t.equal(m.phase, 'releasing');
        t.same(answer(m, 'p3', plain(step)), [], 'a late answer to the failed step is ignored');
        t.same(answer(m, 'p1', plain(release[mode])), []);
        t.same(show(m.step({ kind: 'failed', peer: 'p3', step: release[mode], error: new Error('down') })), [], `a ${release[mode]} that fails counts as done`);
        t.same(answer(m, 'p2', plain(release[mode])), ['deleteRecord 0'], 'the records go once every peer let go');
      }
      t.same(show(m.step({ kind: 'recordDeleted', volume: 0 })), ['deleteRecord 1']);
      t.same(show(m.step({ kind: 'recordDeleted', volume: 1 })), [`aborted: ${reason}`], 'aborted with the first failure');
      t.equal(m.phase, 'aborted');
      t.same(answer(m, 'p3', plain(release[mode])), [], 'nothing after the end');
    });
  }

  t.test(`${mode}: a record that cannot be written`, async (t) => {
    const m = machine(mode, ['v1', 'v2']);
    m.step({ kind: 'start' });
    m.step({ kind: 'recordCreated', volume: 0, seq: 1 });
    t.same(show(m.step({ kind: 'recordFailed', volume: 1, error: new Error('exists') })), ['deleteRecord 0'], 'creating: only the records written go; no peer was asked anything');
    t.same(show(m.step({ kind: 'recordDeleted', volume: 0 })), ['aborted: exists']);

    const late = machine(mode, ['v1', 'v2']);
    until(t, late, 'publish');
    t.same(show(late.step({ kind: 'recordUpdated', volume: 0 })), [`updateRecord 1 held 0`]);
    t.same(show(late.step({ kind: 'recordFailed', volume: 1, error: new Error('catalog down') })), ['deleteRecord 0'], 'publishing: the peers let go already, the records go');
    late.step({ kind: 'recordDeleted', volume: 0 });
    t.same(show(late.step({ kind: 'recordDeleted', volume: 1 })), ['aborted: catalog down']);
  });
}

t.test('a deadline: the timer of a peer that has not answered aborts; stale timers are ignored', async (t) => {
  const m = machine('barrier');
  until(t, m, 'PREPARE');
  answer(m, 'p1', plain('PREPARE'));
  t.same(show(m.step({ kind: 'timer', peer: 'p1', step: 'PREPARE' })), [], 'the timer of a peer that answered (fired before its disarm took effect)');
  t.same(show(m.step({ kind: 'timer', peer: 'p3', step: 'TAKE' })), [], 'a timer of another step');
  t.same(show(m.step({ kind: 'timer', peer: 'p3', step: 'PREPARE' })), ['disarm PREPARE p2', 'disarm PREPARE p3', 'send RELEASE p1', 'send RELEASE p2', 'send RELEASE p3']);
  t.same(show(m.step({ kind: 'timer', peer: 'p2', step: 'PREPARE' })), [], 'one abort');
  allAnswer(m);
  t.same(show(m.step({ kind: 'recordDeleted', volume: 0 })), ['aborted: peer p3 did not answer PREPARE within 4000 ms']);

  const ts = machine('timestamp');
  until(t, ts, 'TAKE');
  t.same(show(ts.step({ kind: 'timer', peer: 'p1', step: 'TAKE' })).slice(-3), ['send ABORT p1', 'send ABORT p2', 'send ABORT p3']);
  allAnswer(ts);
  t.same(show(ts.step({ kind: 'recordDeleted', volume: 0 })), ['aborted: peer p1 did not answer TAKE within 6000 ms']);
});

t.test('duplicated and late answers are ignored', async (t) => {
  const m = machine('barrier');
  until(t, m, 'PREPARE');
  t.same(answer(m, 'p1', plain('PREPARE')), ['disarm PREPARE p1']);
  t.same(answer(m, 'p1', plain('PREPARE')), [], 'a duplicate');
  t.same(answer(m, 'p1', plain('REACH')), [], 'an answer to an earlier step');
  t.same(answer(m, 'p1', plain('TAKE')), [], 'an answer to a step not sent yet');
  t.same(answer(m, 'p9', plain('PREPARE')), [], 'a peer not in the group');
  t.same(show(m.step({ kind: 'failed', peer: 'p1', step: 'PREPARE', error: new Error('late') })), [], 'a failure after the answer');
  answer(m, 'p2', plain('PREPARE'));
  t.same(answer(m, 'p3', plain('PREPARE')).filter((a) => a.startsWith('send')), ['send TAKE p1', 'send TAKE p2', 'send TAKE p3'], 'the barrier still counts each peer once');
  t.same(answer(m, 'p2', plain('PREPARE')), [], 'a duplicate of the previous step');
  allAnswer(m);
  allAnswer(m);
  t.equal(m.phase, 'publish');
  t.same(answer(m, 'p2', plain('RELEASE')), [], 'a duplicated RELEASE answer while publishing');
});

// ---- participant ----------------------------------------------------------------------------

function participant(clock = 77): { p: SnapshotParticipant; on(ev: ParticipantEvent): string[] } {
  const p = new SnapshotParticipant({ self: 'p1', clock: () => clock });
  return { p, on: (ev) => showP(p.step(ev)) };
}

function showP(actions: ParticipantAction[]): string[] {
  return actions.map((a) => {
    switch (a.kind) {
      case 'answer': return `answer ${a.req} ${JSON.stringify(a.value)}`;
      case 'refuse': return `refuse ${a.req}: ${a.error.message}`;
      case 'arm': return `arm ${a.snapshotId} #${a.expiry} ${a.ms}`;
      case 'disarm': return `disarm #${a.expiry}`;
      case 'hold': case 'letGo': return `${a.kind} ${a.volumeId}`;
      case 'preflush': return `preflush ${a.req} ${a.volumeIds.join(',')}`;
      case 'close': case 'record': case 'freeze': case 'finish': return `${a.kind} ${a.req} ${a.snapshotId}`;
      case 'seal': return `seal ${a.req} T ${a.cut} ${a.volumeIds.join(',')}`;
      case 'open': return `open ${a.snapshotId} ${a.volumeIds.join(',')}${a.req === undefined ? '' : ` answers ${a.req}`}`;
      case 'dropRecording': return `dropRecording ${a.snapshotId} ${a.volumeId}`;
    }
  });
}

const layers = [{ volumeId: 'v1', seq: 3 }, { volumeId: 'v2', seq: 5 }];

t.test('participant, barrier: pre-flush, then hold and close; TAKE freezes; RELEASE opens', async (t) => {
  const { p, on } = participant();
  t.same(on({ kind: 'prepare', req: 1, prepare: { snapshotId: 's', volumeIds: ['v1', 'v2'] } }), ['preflush 1 v1,v2'], 'the pre-flush first: nothing held while hosts still run');
  t.equal(p.holding('v1'), 0);
  t.same(on({ kind: 'flushed', req: 1, ms: 4 }), ['hold v1', 'hold v2', 'arm s #1 10000', 'close 1 s'], 'then held, the expiry armed, the gates closed');
  t.same(on({ kind: 'closed', req: 1, ms: 2 }), ['answer 1 {"clock":0,"moving":[],"suspect":[]}'], 'READY once closed and drained');
  const take = p.step({ kind: 'take', req: 2, take: { snapshotId: 's', layers } });
  t.match(take, [{ kind: 'freeze', req: 2, volumeIds: ['v1', 'v2'], layers, flushMs: 4, drainMs: 2 }]);
  t.same(on({ kind: 'frozen', req: 2, moving: [moving(1)], suspect: [suspect(4, 'p1')] }), [`answer 2 ${JSON.stringify({ moving: [moving(1)], suspect: [suspect(4, 'p1')] })}`], 'with the pages moving and the suspect copies');
  t.same(on({ kind: 'release', req: 3, snapshotId: 's', abort: false, finish: false }), ['disarm #1', 'letGo v1', 'letGo v2', 'open s v1,v2 answers 3']);
  t.same(p.snapshots, { barrier: [], timestamp: [] });
  t.same(on({ kind: 'release', req: 4, snapshotId: 's', abort: false, finish: false }), ['answer 4 0'], 'a duplicated RELEASE: nothing left to open');
  t.same(on({ kind: 'take', req: 5, take: { snapshotId: 's', layers } }), ['refuse 5: snapshot s was not prepared on p1']);
});

t.test('participant, barrier: released during the pre-flush; a gate that fails; the expiry', async (t) => {
  const { p, on } = participant();
  on({ kind: 'prepare', req: 1, prepare: { snapshotId: 's', volumeIds: ['v1'] } });
  t.same(on({ kind: 'release', req: 2, snapshotId: 's', abort: false, finish: false }), ['open s v1 answers 2'], 'nothing held yet: only the gates (none closed)');
  t.same(on({ kind: 'flushed', req: 1, ms: 1 }), ['refuse 1: snapshot s was released while p1 prepared it'], 'closing now would hold hosts for nothing');
  t.equal(p.holding('v1'), 0);

  on({ kind: 'prepare', req: 3, prepare: { snapshotId: 'g', volumeIds: ['v1'] } });
  on({ kind: 'flushed', req: 3, ms: 1 });
  t.same(on({ kind: 'failed', req: 3, error: new Error('drain took too long') }), ['disarm #1', 'letGo v1', 'refuse 3: drain took too long'], 'a gate that fails lets go of everything');

  on({ kind: 'prepare', req: 4, prepare: { snapshotId: 'x', volumeIds: ['v1'] } });
  on({ kind: 'flushed', req: 4, ms: 1 });
  on({ kind: 'closed', req: 4, ms: 1 });
  t.same(on({ kind: 'expired', snapshotId: 'x', expiry: 1 }), [], 'an expiry of an earlier hold');
  t.same(on({ kind: 'expired', snapshotId: 'x', expiry: 2 }), ['disarm #2', 'letGo v1', 'open x v1'], 'the coordinator gone: after holdMsMax the gates open and the moves go on');
  t.same(on({ kind: 'take', req: 5, take: { snapshotId: 'x', layers } }), ['refuse 5: snapshot x was not prepared on p1'], 'a late TAKE is refused: the snapshot aborts');
});

t.test('participant, timestamp: hold and record at PREPARE, T at TAKE, FINISH writes and lets go', async (t) => {
  const { p, on } = participant(500);
  t.same(on({ kind: 'prepare', req: 1, prepare: { snapshotId: 's', volumeIds: ['v1', 'v2'], mode: 'timestamp', layers } }), ['arm s #1 10000', 'hold v1', 'hold v2', 'preflush 1 v1,v2']);
  t.same(on({ kind: 'prepare', req: 2, prepare: { snapshotId: 's', volumeIds: ['v1', 'v2'], mode: 'timestamp', layers } }), ['refuse 2: snapshot s is already prepared on p1']);
  t.same(on({ kind: 'flushed', req: 1, ms: 1 }), ['record 1 s']);
  t.same(on({ kind: 'frozen', req: 1, moving: [], suspect: [suspect(4, 'p1')] }), [`answer 1 ${JSON.stringify({ clock: 500, moving: [], suspect: [suspect(4, 'p1')] })}`], 'the clock once everything froze, with the suspect copies');
  t.same(on({ kind: 'release', req: 3, snapshotId: 's', abort: false, finish: true }), ['refuse 3: snapshot s was not taken on p1'], 'FINISH before TAKE(T)');
  t.same(on({ kind: 'take', req: 4, take: { snapshotId: 's', layers, cut: 900 } }), ['seal 4 T 900 v1,v2']);
  t.same(on({ kind: 'sealed', req: 4, suspect: [suspect(6, 'p3')] }), [`answer 4 ${JSON.stringify({ moving: [], suspect: [suspect(6, 'p3')] })}`], 'the freeze was reported at PREPARE; the copies a change before T may have missed now');
  t.match(p.step({ kind: 'release', req: 5, snapshotId: 's', abort: false, finish: true }), [{ kind: 'finish', req: 5, layers, cut: 900 }]);
  t.same(on({ kind: 'finished', req: 5 }), ['disarm #1', 'dropRecording s v1', 'letGo v1', 'dropRecording s v2', 'letGo v2', 'answer 5 0']);
  t.same(on({ kind: 'release', req: 6, snapshotId: 's', abort: false, finish: true }), ['refuse 6: snapshot s is not recorded on p1 (it restarted since PREPARE): the layer would miss writes before the cut'], 'FINISH of a snapshot this peer does not know (restarted since PREPARE) is refused');
  t.same(on({ kind: 'release', req: 7, snapshotId: 's', abort: true, finish: false }), ['answer 7 0'], 'ABORT of one it does not know');
});

t.test('participant, timestamp: ABORT, expiry, a failed FINISH; holds counted across snapshots', async (t) => {
  const { p, on } = participant();
  on({ kind: 'prepare', req: 1, prepare: { snapshotId: 'a', volumeIds: ['v1'], mode: 'timestamp', layers: [layers[0]] } });
  t.same(on({ kind: 'prepare', req: 2, prepare: { snapshotId: 'b', volumeIds: ['v1'], mode: 'timestamp', layers: [layers[0]] } }), ['arm b #2 10000', 'preflush 2 v1'], 'v1 already held: counted');
  t.equal(p.holding('v1'), 2);
  t.same(on({ kind: 'release', req: 3, snapshotId: 'a', abort: true, finish: false }), ['disarm #1', 'dropRecording a v1', 'answer 3 0'], 'ABORT: b still holds v1');
  t.same(on({ kind: 'flushed', req: 1, ms: 1 }), ['record 1 a'], 'the PREPARE goes on');
  t.same(on({ kind: 'frozen', req: 1, moving: [], suspect: [] }), ['refuse 1: snapshot a was dropped while p1 prepared it']);
  t.same(on({ kind: 'expired', snapshotId: 'b', expiry: 2 }), ['disarm #2', 'dropRecording b v1', 'letGo v1'], 'the coordinator gone: the recording does not outlive holdMsMax');

  on({ kind: 'prepare', req: 4, prepare: { snapshotId: 'c', volumeIds: ['v1'], mode: 'timestamp', layers: [layers[0]] } });
  on({ kind: 'take', req: 5, take: { snapshotId: 'c', layers: [layers[0]], cut: 10 } });
  on({ kind: 'failed', req: 5, error: new Error('writes before T did not finish') });
  t.equal(p.holding('v1'), 1, 'a TAKE that fails drops nothing (the coordinator aborts)');
  on({ kind: 'release', req: 6, snapshotId: 'c', abort: false, finish: true });
  t.same(on({ kind: 'failed', req: 6, error: new Error('disk') }), ['disarm #3', 'dropRecording c v1', 'letGo v1', 'refuse 6: disk'], 'a FINISH that fails drops the recording too');
});
