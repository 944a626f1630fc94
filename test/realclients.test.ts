// Real initiators against a real peer process: libiscsi's tools, qemu-img over iscsi://, and
// libiscsi's conformance suite. .ci/run installs them; without them these tests skip, saying why.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { Socket } from 'node:net';
import { join } from 'node:path';
import { hasTool, startPeer, type TestPeer } from './helpers/processes';

const tools = ['iscsi-ls', 'iscsi-inq', 'iscsi-readcapacity16', 'qemu-img', 'iscsi-test-cu'];
const missing = tools.filter((x) => !hasTool(x));
const good = 'iqn.1994-05.com.example:good';
const bad = 'iqn.1994-05.com.example:bad';

function sh(cmd: string, args: string[], timeoutMs = 120_000): { status: number | null; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 });
  return { status: r.status, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

t.test('real clients', { skip: missing.length ? `missing ${missing.join(', ')} (.ci/run installs libiscsi-bin and qemu-utils)` : false }, async (t) => {
  const peer: TestPeer = await startPeer(t.teardown.bind(t));
  const created = [
    peer.cli('volume', 'create', 'disk', '--size', '512M'),
    peer.cli('volume', 'create', 'big4k', '--size', '1G', '--block-size', '4096'),
    peer.cli('volume', 'create', 'sec', '--size', '64M', '--chap-user', 'alice', '--chap-secret', 'secretsecret12', '--allow', good),
  ];
  for (const c of created) t.equal(c.status, 0, c.stdout.trim() || c.stderr.trim());

  t.test('iscsi-ls lists what each initiator may see', async (t) => {
    const anyone = sh('iscsi-ls', ['-i', bad, `iscsi://127.0.0.1:${peer.iscsiPort}`]);
    t.match(anyone.out, /peersan:disk Portal/);
    t.match(anyone.out, /peersan:big4k Portal/);
    t.notMatch(anyone.out, /peersan:sec /, 'a volume with an allow list is hidden from others');
    const allowed = sh('iscsi-ls', ['-i', good, `iscsi://127.0.0.1:${peer.iscsiPort}`]);
    t.match(allowed.out, /peersan:sec Portal/);
  });

  t.test('iscsi-inq and iscsi-readcapacity16', async (t) => {
    const inq = sh('iscsi-inq', [peer.url('disk')]);
    t.equal(inq.status, 0);
    t.match(inq.out, /Peripheral Device Type:DIRECT_ACCESS/);
    t.match(inq.out, /Vendor:PEERSAN/);
    // iscsi-inq takes the page code in decimal.
    const vpd = sh('iscsi-inq', ['-e', '1', '-c', String(0x83), peer.url('disk')]);
    t.match(vpd.out, /Designator Type:\(3\) NAA/, 'device identification has an NAA designator');
    t.match(vpd.out, /Designator:\[iqn\.2026-11\.io\.peersan:disk\]/, 'and the SCSI name string');
    const lbp = sh('iscsi-inq', ['-e', '1', '-c', String(0xb2), peer.url('disk')]);
    t.match(lbp.out, /lbpu:1/, 'logical block provisioning: UNMAP supported');
    t.match(lbp.out, /provisioning type:2/, 'thin');
    const cap = sh('iscsi-readcapacity16', [peer.url('disk')]);
    t.match(cap.out, /LOGICAL BLOCK LENGTH IN BYTES:512/);
    t.match(cap.out, /Total size:536870912/);
    t.match(cap.out, /LBPME:1 LBPRZ:1/);
    const cap4k = sh('iscsi-readcapacity16', [peer.url('big4k')]);
    t.match(cap4k.out, /LOGICAL BLOCK LENGTH IN BYTES:4096/);
    t.match(cap4k.out, /RETURNED LOGICAL BLOCK ADDRESS:262143/);
  });

  t.test('refusals: wrong CHAP secret, initiator not allowed, garbage and truncated logins', async (t) => {
    const wrong = sh('iscsi-inq', ['-i', good, peer.url('sec', 'alice%wrongsecret123')]);
    t.not(wrong.status, 0);
    t.match(wrong.out, /Authentication failure\(513\)/);
    const notAllowed = sh('iscsi-inq', ['-i', bad, peer.url('sec', 'alice%secretsecret12')]);
    t.not(notAllowed.status, 0);
    t.match(notAllowed.out, /Authorization failure\(514\)/);
    const ok = sh('iscsi-inq', ['-i', good, peer.url('sec', 'alice%secretsecret12')]);
    t.equal(ok.status, 0, 'the right initiator with the right secret gets in');

    // Garbage: the peer drops that connection; a truncated login just sits there. Meanwhile others are served.
    const connect = (): Promise<Socket> => new Promise((resolve, reject) => {
      const s = new Socket();
      s.once('error', reject);
      s.connect(peer.iscsiPort, '127.0.0.1', () => resolve(s));
    });
    const garbage = await connect();
    const closed = new Promise<boolean>((resolve) => {
      garbage.once('close', () => resolve(true));
      setTimeout(() => resolve(false), 5000);
    });
    garbage.on('error', () => undefined);
    garbage.write(Buffer.concat([Buffer.from([0x3e, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0xff]), randomBytes(4096)]));
    t.ok(await closed, 'garbage: connection dropped');
    const truncated = await connect();
    truncated.on('error', () => undefined);
    truncated.write(Buffer.from([0x43, 0x87, 0, 0, 0, 0, 0, 0x40, 0x40, 0, 0]));
    const during = sh('iscsi-inq', [peer.url('disk')]);
    t.equal(during.status, 0, 'another client is served while the truncated login hangs');
    truncated.destroy();
    const after = sh('iscsi-readcapacity16', [peer.url('disk')]);
    t.equal(after.status, 0, 'and after');
  });

  t.test('qemu-img convert and compare 256 MiB; identical again after kill -9 and restart', async (t) => {
    const file = join(peer.dir, 'random.img');
    writeFileSync(file, randomBytes(256 * 1024 * 1024));
    const conv = sh('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', file, peer.url('disk')], 300_000);
    t.equal(conv.status, 0, conv.out);
    // qemu-img convert ends with a flush (SYNCHRONIZE CACHE): everything is durable now.
    const cmp = sh('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, peer.url('disk')], 300_000);
    t.match(cmp.out, /Images are identical/);
    await peer.kill('SIGKILL');
    await peer.start();
    const again = sh('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, peer.url('disk')], 300_000);
    t.match(again.out, /Images are identical/, 'after kill -9 and restart');
  });

  // libiscsi's conformance suite runs in group-processes.test.ts, over two paths through different peers.

  t.test('graceful stop on SIGTERM', async (t) => {
    await peer.kill('SIGTERM');
    t.equal(peer.process.exitCode, 0, 'exit code 0');
  });
});
