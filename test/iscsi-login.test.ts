import t from 'tap';
import fc from 'fast-check';
import { createHash } from 'node:crypto';
import { LoginMachine, type LoginContext } from '../src/iscsi/login';
import { defaultTargetPrefs } from '../src/iscsi/negotiate';
import type { TargetDirectory, TargetInfo } from '../src/iscsi/target';
import { encodeTextKeys, parseTextKeys } from '../src/iscsi/text';
import { LoginStatus, Op, type LoginRequestPdu } from '../src/iscsi/types';

const open: TargetInfo = { name: 'iqn.2026-11.io.peersan:open', allow: [], luns: new Map() };
const guarded: TargetInfo = {
  name: 'iqn.2026-11.io.peersan:guarded', allow: ['iqn.1994-05.com.example:good'],
  chap: { user: 'alice', secret: 'secretsecret12', mutualUser: 'target', mutualSecret: 'targetsecret34' }, luns: new Map(),
};
const listed: TargetInfo = { name: 'iqn.2026-11.io.peersan:listed', allow: ['iqn.1994-05.com.example:good'], luns: new Map() };
const directory: TargetDirectory = {
  portalGroupTag: 1,
  portalAddresses: ['127.0.0.1:3260'],
  find: (n) => [open, guarded, listed].find((x) => x.name === n),
  visibleTo: () => [open, guarded],
};

function context(): LoginContext {
  let tsih = 0;
  let rnd = 0;
  return {
    directory,
    targetParams: defaultTargetPrefs(),
    // Deterministic "randomness" so CHAP answers can be computed in the test.
    randomBytes: (n) => Buffer.alloc(n, ++rnd),
    allocateTsih: () => ++tsih,
    sessionExists: (x) => x === 77,
  };
}

function req(keys: Record<string, string>, stage: { csg: number; nsg: number; transit: boolean }, extra: Partial<LoginRequestPdu> = {}): LoginRequestPdu {
  return {
    opcode: Op.loginRequest, immediate: true, final: stage.transit, transit: stage.transit, continue: false,
    csg: stage.csg, nsg: stage.nsg, versionMax: 0, versionMin: 0, isid: Buffer.from('400001370000', 'hex'), tsih: 0,
    initiatorTaskTag: 1, cid: 0, cmdSN: 1, expStatSN: 0, data: encodeTextKeys(Object.entries(keys)), ...extra,
  };
}

const keysOf = (data: Buffer): Map<string, string> => new Map(parseTextKeys(data));
const md5 = (id: number, secret: string, challenge: Buffer): Buffer => createHash('md5').update(Buffer.concat([Buffer.from([id]), Buffer.from(secret), challenge])).digest();

t.test('libiscsi-style login without authentication straight to full feature phase', async (t) => {
  const m = new LoginMachine(context());
  const s1 = m.step(req({ InitiatorName: 'iqn.1994-05.com.example:h', SessionType: 'Normal', TargetName: open.name, AuthMethod: 'None' }, { csg: 0, nsg: 1, transit: true }));
  t.equal(s1.response.status, LoginStatus.success);
  t.equal(s1.response.transit, true);
  t.equal(keysOf(s1.response.data).get('AuthMethod'), 'None');
  t.equal(keysOf(s1.response.data).get('TargetPortalGroupTag'), '1', 'TPGT in the first response');
  const s2 = m.step(req({ HeaderDigest: 'CRC32C,None', DataDigest: 'None', InitialR2T: 'Yes', ImmediateData: 'Yes', MaxBurstLength: '262144', FirstBurstLength: '65536', MaxRecvDataSegmentLength: '262144', ErrorRecoveryLevel: '2', MaxOutstandingR2T: '4', Bogus: 'x' }, { csg: 1, nsg: 3, transit: true }));
  const k = keysOf(s2.response.data);
  t.equal(k.get('HeaderDigest'), 'CRC32C', "initiator's first choice we support");
  t.equal(k.get('InitialR2T'), 'Yes', 'OR');
  t.equal(k.get('ErrorRecoveryLevel'), '0', 'min');
  t.equal(k.get('Bogus'), 'NotUnderstood');
  t.ok(keysOf(s1.response.data).get('MaxRecvDataSegmentLength') ?? k.get('MaxRecvDataSegmentLength'), 'we declare ours once');
  t.ok(s2.done, 'login finished');
  t.equal(s2.done!.params.headerDigest, true);
  t.equal(s2.done!.params.maxXmitDataSegmentLength, 262144);
  t.equal(s2.done!.params.maxOutstandingR2T, 4);
  t.equal(s2.response.tsih, 1, 'TSIH in the final response');
  t.equal(s2.response.statSN, (s1.response.statSN + 1) >>> 0, 'StatSN counts login responses');
});

t.test('CHAP one-way and mutual, checked against RFC 1994', async (t) => {
  const m = new LoginMachine(context());
  const name = 'iqn.1994-05.com.example:good';
  const s1 = m.step(req({ InitiatorName: name, TargetName: guarded.name, AuthMethod: 'CHAP,None' }, { csg: 0, nsg: 1, transit: false }));
  t.equal(keysOf(s1.response.data).get('AuthMethod'), 'CHAP');
  const s2 = m.step(req({ CHAP_A: '5' }, { csg: 0, nsg: 1, transit: false }));
  const k2 = keysOf(s2.response.data);
  const id = Number(k2.get('CHAP_I'));
  const challenge = Buffer.from(k2.get('CHAP_C')!.slice(2), 'hex');
  t.ok(challenge.length >= 16, 'challenge of at least 16 bytes');
  const mutualChallenge = Buffer.alloc(16, 0x5a);
  const s3 = m.step(req({ CHAP_N: 'alice', CHAP_R: '0x' + md5(id, 'secretsecret12', challenge).toString('hex'), CHAP_I: '9', CHAP_C: '0x' + mutualChallenge.toString('hex') }, { csg: 0, nsg: 1, transit: true }));
  t.equal(s3.response.status, LoginStatus.success);
  const k3 = keysOf(s3.response.data);
  t.equal(k3.get('CHAP_N'), 'target');
  t.equal(k3.get('CHAP_R'), '0x' + md5(9, 'targetsecret34', mutualChallenge).toString('hex'), 'mutual answer');
  t.equal(s3.response.nsg, 1);
});

t.test('refusals: each with its status and a close', async (t) => {
  const cases: Array<[string, LoginRequestPdu, number]> = [
    ['unknown target', req({ InitiatorName: 'iqn.x:y', TargetName: 'iqn.2026-11.io.peersan:nope' }, { csg: 0, nsg: 1, transit: true }), LoginStatus.targetNotFound],
    ['no initiator name', req({ TargetName: open.name }, { csg: 0, nsg: 1, transit: true }), LoginStatus.missingParameter],
    ['no target name', req({ InitiatorName: 'iqn.x:y' }, { csg: 0, nsg: 1, transit: true }), LoginStatus.missingParameter],
    ['not in the allow list', req({ InitiatorName: 'iqn.1994-05.com.example:bad', TargetName: guarded.name, AuthMethod: 'None' }, { csg: 0, nsg: 1, transit: true }), LoginStatus.authenticationFailure],
    ['not in the allow list (no CHAP)', req({ InitiatorName: 'iqn.1994-05.com.example:bad', TargetName: listed.name, AuthMethod: 'None' }, { csg: 0, nsg: 1, transit: true }), LoginStatus.authorizationFailure],
    ['unknown session', req({ InitiatorName: 'iqn.x:y', TargetName: open.name }, { csg: 0, nsg: 1, transit: true }, { tsih: 5 }), LoginStatus.sessionDoesNotExist],
    ['second connection', req({ InitiatorName: 'iqn.x:y', TargetName: open.name }, { csg: 0, nsg: 1, transit: true }, { tsih: 77 }), LoginStatus.tooManyConnections],
    ['bad version', req({ InitiatorName: 'iqn.x:y', TargetName: open.name }, { csg: 0, nsg: 1, transit: true }, { versionMin: 2, versionMax: 3 }), LoginStatus.unsupportedVersion],
    ['skipping CHAP', req({ InitiatorName: 'iqn.1994-05.com.example:good', TargetName: guarded.name }, { csg: 1, nsg: 3, transit: true }), LoginStatus.authenticationFailure],
  ];
  for (const [what, pdu, status] of cases) {
    const step = new LoginMachine(context()).step(pdu);
    t.equal(step.response.status, status, what);
    t.equal(step.close, true, `${what}: closes`);
  }
  const m = new LoginMachine(context());
  m.step(req({ InitiatorName: 'iqn.1994-05.com.example:good', TargetName: guarded.name, AuthMethod: 'CHAP' }, { csg: 0, nsg: 1, transit: false }));
  m.step(req({ CHAP_A: '5' }, { csg: 0, nsg: 1, transit: false }));
  const wrong = m.step(req({ CHAP_N: 'alice', CHAP_R: '0x' + '00'.repeat(16) }, { csg: 0, nsg: 1, transit: true }));
  t.equal(wrong.response.status, LoginStatus.authenticationFailure, 'wrong CHAP secret');
});

t.test('the allow list is checked after a successful CHAP exchange', async (t) => {
  const m = new LoginMachine(context());
  m.step(req({ InitiatorName: 'iqn.1994-05.com.example:bad', TargetName: guarded.name, AuthMethod: 'CHAP' }, { csg: 0, nsg: 1, transit: false }));
  const s2 = m.step(req({ CHAP_A: '5' }, { csg: 0, nsg: 1, transit: false }));
  const k2 = keysOf(s2.response.data);
  const challenge = Buffer.from(k2.get('CHAP_C')!.slice(2), 'hex');
  const s3 = m.step(req({ CHAP_N: 'alice', CHAP_R: '0x' + md5(Number(k2.get('CHAP_I')), 'secretsecret12', challenge).toString('hex') }, { csg: 0, nsg: 1, transit: true }));
  t.equal(s3.response.status, LoginStatus.authorizationFailure, 'right secret, wrong initiator');
  t.equal(s3.close, true);
});

t.test('discovery session and the C bit', async (t) => {
  const m = new LoginMachine(context());
  const text = encodeTextKeys([['InitiatorName', 'iqn.x:y'], ['SessionType', 'Discovery'], ['AuthMethod', 'None']]);
  const first = m.step({ ...req({}, { csg: 0, nsg: 3, transit: false }), data: text.subarray(0, 10), continue: true });
  t.equal(first.response.data.length, 0, 'empty answer while more text comes');
  const done = m.step({ ...req({}, { csg: 0, nsg: 3, transit: true }), data: text.subarray(10) });
  t.equal(done.response.status, LoginStatus.success);
  t.equal(done.done?.sessionType, 'Discovery');
  t.notOk(keysOf(done.response.data).has('TargetPortalGroupTag'), 'no TPGT for discovery');
});

t.test('random login requests always get one response and never throw', async (t) => {
  const key = fc.constantFrom('InitiatorName', 'TargetName', 'AuthMethod', 'SessionType', 'CHAP_A', 'CHAP_N', 'CHAP_R', 'CHAP_I', 'CHAP_C', 'MaxBurstLength', 'HeaderDigest', 'X-junk', 'InitialR2T');
  const value = fc.oneof(fc.constantFrom('None', 'CHAP', 'Normal', 'Discovery', open.name, 'iqn.x:y', '5', '0x00', 'Yes', '512', '99999999999'), fc.string({ maxLength: 20 }));
  const request = fc.record({
    pairs: fc.array(fc.tuple(key, value), { maxLength: 6 }),
    csg: fc.integer({ min: 0, max: 3 }), nsg: fc.integer({ min: 0, max: 3 }), transit: fc.boolean(), more: fc.boolean(), tsih: fc.constantFrom(0, 0, 5),
  });
  fc.assert(
    fc.property(fc.array(request, { minLength: 1, maxLength: 6 }), (reqs) => {
      const m = new LoginMachine(context());
      for (const r of reqs) {
        const pairs = r.pairs.filter(([, v]) => !v.includes('\0') && !v.includes('='));
        const step = m.step({ ...req({}, { csg: r.csg, nsg: r.nsg, transit: r.transit }, { tsih: r.tsih }), continue: r.more, data: encodeTextKeys(pairs) });
        if (step.response.opcode !== Op.loginResponse) return false;
        if (step.response.status !== 0 && !step.close) return false;
        if (step.close || step.done) return true;
      }
      return true;
    }),
    { numRuns: 1000 },
  );
  t.pass('1000 random dialogues');
});

// Issue 15 item 8: what we answer is what we enforce, and the stages only go forward.

const normalStart = { InitiatorName: 'iqn.1994-05.com.example:h', TargetName: open.name, AuthMethod: 'None' };

t.test('FirstBurstLength never exceeds MaxBurstLength, in the answer as in the session', async (t) => {
  const orders: Array<[string, Array<[string, string]>]> = [
    ['MaxBurst first', [['MaxBurstLength', '4096'], ['FirstBurstLength', '262144']]],
    ['FirstBurst first', [['FirstBurstLength', '262144'], ['MaxBurstLength', '4096']]],
  ];
  for (const [what, keys] of orders) {
    const m = new LoginMachine(context());
    m.step(req(normalStart, { csg: 0, nsg: 1, transit: true }));
    const s = m.step(req(Object.fromEntries(keys), { csg: 1, nsg: 3, transit: true }));
    const k = keysOf(s.response.data);
    t.equal(k.get('MaxBurstLength'), '4096', `${what}: MaxBurstLength`);
    t.equal(k.get('FirstBurstLength'), '4096', `${what}: the FirstBurstLength answered is the one used`);
    t.equal(s.done?.params.firstBurstLength, 4096, `${what}: session FirstBurstLength`);
    t.equal(s.done?.params.maxBurstLength, 4096, `${what}: session MaxBurstLength`);
  }
  // Across PDUs: MaxBurstLength agreed in an earlier request bounds a later FirstBurstLength.
  const m = new LoginMachine(context());
  m.step(req({ ...normalStart, MaxBurstLength: '8192' }, { csg: 0, nsg: 1, transit: true }));
  const s = m.step(req({ FirstBurstLength: '65536' }, { csg: 1, nsg: 3, transit: true }));
  t.equal(keysOf(s.response.data).get('FirstBurstLength'), '8192', 'bounded by the MaxBurstLength of an earlier PDU');
  t.equal(s.done?.params.firstBurstLength, 8192);
  // MaxBurstLength alone: the default FirstBurstLength (65536) follows it down.
  const d = new LoginMachine(context());
  d.step(req(normalStart, { csg: 0, nsg: 1, transit: true }));
  const alone = d.step(req({ MaxBurstLength: '4096' }, { csg: 1, nsg: 3, transit: true }));
  t.equal(alone.done?.params.firstBurstLength, 4096, 'the default FirstBurstLength is lowered with MaxBurstLength');
  // The other way round an answer already given cannot be taken back: the login fails.
  const r = new LoginMachine(context());
  r.step(req({ ...normalStart, FirstBurstLength: '65536' }, { csg: 0, nsg: 1, transit: true }));
  const bad = r.step(req({ MaxBurstLength: '4096' }, { csg: 1, nsg: 3, transit: true }));
  t.equal(bad.response.status, LoginStatus.initiatorError, 'a MaxBurstLength below the FirstBurstLength already agreed');
  t.equal(bad.close, true);
});

t.test('keys we support only one way are answered that way', async (t) => {
  const m = new LoginMachine(context());
  m.step(req(normalStart, { csg: 0, nsg: 1, transit: true }));
  const s = m.step(req({ DataPDUInOrder: 'No', DataSequenceInOrder: 'No', ErrorRecoveryLevel: '2', MaxConnections: '4', ImmediateData: 'Yes', InitialR2T: 'No' }, { csg: 1, nsg: 3, transit: true }));
  const k = keysOf(s.response.data);
  t.equal(k.get('DataPDUInOrder'), 'Yes');
  t.equal(k.get('DataSequenceInOrder'), 'Yes');
  t.equal(k.get('ErrorRecoveryLevel'), '0');
  t.equal(k.get('MaxConnections'), '1');
  const p = s.done!.params;
  t.same([p.dataPDUInOrder, p.dataSequenceInOrder, p.errorRecoveryLevel, p.maxConnections, p.immediateData, p.initialR2T], [true, true, 0, 1, true, false], 'the session enforces what was answered');
  const off = new LoginMachine({ ...context(), targetParams: { ...defaultTargetPrefs(), immediateData: false, initialR2T: true } });
  off.step(req(normalStart, { csg: 0, nsg: 1, transit: true }));
  const s2 = off.step(req({ ImmediateData: 'Yes', InitialR2T: 'No' }, { csg: 1, nsg: 3, transit: true }));
  t.equal(keysOf(s2.response.data).get('ImmediateData'), 'No');
  t.equal(keysOf(s2.response.data).get('InitialR2T'), 'Yes');
  t.same([s2.done!.params.immediateData, s2.done!.params.initialR2T], [false, true]);
});

t.test('stages only go forward, and only where the target agreed', async (t) => {
  const toOperational = (): LoginMachine => {
    const m = new LoginMachine(context());
    const s = m.step(req(normalStart, { csg: 0, nsg: 1, transit: true }));
    t.equal(s.response.transit, true, 'target moved to the operational stage');
    return m;
  };
  const illegal: Array<[string, LoginRequestPdu]> = [
    ['back to CSG=0 after the target moved on', req({}, { csg: 0, nsg: 1, transit: true })],
    ['back to CSG=0 without T', req({}, { csg: 0, nsg: 0, transit: false })],
    ['CSG=3', req({}, { csg: 3, nsg: 3, transit: true })],
    ['CSG=2', req({}, { csg: 2, nsg: 3, transit: true })],
    ['NSG backwards', req({}, { csg: 1, nsg: 0, transit: true })],
    ['NSG=2', req({}, { csg: 1, nsg: 2, transit: true })],
    ['T and C together', req({}, { csg: 1, nsg: 3, transit: true }, { continue: true })],
    ['another ITT', req({}, { csg: 1, nsg: 3, transit: true }, { initiatorTaskTag: 2 })],
    ['another ISID', req({}, { csg: 1, nsg: 3, transit: true }, { isid: Buffer.from('400001370001', 'hex') })],
  ];
  for (const [what, pdu] of illegal) {
    const step = toOperational().step(pdu);
    t.equal(step.response.status, LoginStatus.initiatorError, what);
    t.equal(step.close, true, `${what}: closes`);
    t.notOk(step.done, `${what}: no session`);
  }
  // Jumping ahead without the target's T=1 (it answered T=0 while CHAP is pending) is refused too.
  const m = new LoginMachine(context());
  const s1 = m.step(req({ InitiatorName: 'iqn.1994-05.com.example:good', TargetName: guarded.name, AuthMethod: 'CHAP' }, { csg: 0, nsg: 1, transit: false }));
  t.equal(s1.response.transit, false);
  const jump = m.step(req({}, { csg: 1, nsg: 3, transit: true }));
  t.not(jump.response.status, LoginStatus.success, 'operational stage before the target agreed');
  t.equal(jump.close, true);
});

t.test('admission is decided before the final response: a refusal is out of resources, never success', async (t) => {
  const asked: string[] = [];
  const ctx: LoginContext = { ...context(), admit: (who) => (asked.push(`${who.sessionType} ${who.initiatorName}`), false) };
  const m = new LoginMachine(ctx);
  const s1 = m.step(req({ InitiatorName: 'iqn.x:y', SessionType: 'Discovery', AuthMethod: 'None' }, { csg: 0, nsg: 1, transit: true }));
  t.equal(s1.response.status, LoginStatus.success, 'not asked before the last step');
  t.same(asked, []);
  const s2 = m.step(req({}, { csg: 1, nsg: 3, transit: true }));
  t.same(asked, ['Discovery iqn.x:y']);
  t.equal(s2.response.status, LoginStatus.outOfResources);
  t.equal(s2.response.tsih, 0, 'no TSIH given out');
  t.equal(s2.close, true);
  t.notOk(s2.done);
  const yes = new LoginMachine({ ...context(), admit: () => true });
  const one = yes.step(req({ ...normalStart }, { csg: 0, nsg: 3, transit: true }));
  t.equal(one.response.status, LoginStatus.success);
  t.ok(one.done, 'admitted');
});

t.test('a first request in the operational stage may continue its text (C=1) in that stage', async (t) => {
  const m = new LoginMachine(context());
  const text = encodeTextKeys(Object.entries({ InitiatorName: 'iqn.1994-05.com.example:h', TargetName: open.name, MaxBurstLength: '262144' }));
  const half = Math.floor(text.length / 2);
  const first = m.step(req({}, { csg: 1, nsg: 1, transit: false }, { continue: true, data: text.subarray(0, half) }));
  t.equal(first.response.status, LoginStatus.success, 'the first part is acknowledged');
  const rest = m.step(req({}, { csg: 1, nsg: 3, transit: true }, { data: text.subarray(half) }));
  t.equal(rest.response.status, LoginStatus.success, 'the continuation stays in the operational stage');
  t.ok(rest.done, 'the session starts');
});
