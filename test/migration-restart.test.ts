// A page move of a one-copy page whose destination loses power between two chunks of a piece
// and is back before the next chunk (a slow copy rate here; a snapshot's hold in the simulator's
// seed 196915), so no chunk fails meanwhile. The chunks before the crash were not synced on the
// destination (only a piece's last chunk is FUA): the source must see the restart (the
// destination's start token, src/migration/migrator.ts copyChunk) and copy the piece again from
// its first chunk. In seed 196915 the move went on with the piece's later chunks and committed a
// page missing a flushed write. Whole groups in the simulator (test/helpers/sim-group.ts),
// deterministic.

import t from 'tap';
import { boot, core, drive, until, volume, write } from './helpers/sim-group';

const blockBytes = 512;
const pageBlocks = 8192;
const pieceBytes = 256 * 1024;
const chunkBlocks = (64 * 1024) / blockBytes;

function pattern(): Buffer {
  const b = Buffer.alloc(pageBlocks * blockBytes);
  for (let at = 0; at < b.length; at += 4) b.writeUInt32BE((at * 2654435761) >>> 0 || 1, at);
  return b;
}

t.test('a destination that restarts between two chunks of a piece gets the whole piece again; the page commits whole', async (t) => {
  // 16 KiB/s: a chunk every 4 s, more than p3's restart takes (the first piece goes at once: the
  // copier's burst is a piece).
  // Seed 2: p3's crash loses some of the two chunks (each volatile write survives a crash or
  // not, test/sim/disk.ts); the check below says so.
  const { world, group } = await boot(t, 3, 1, 1, undefined, 16 * 1024, 2);
  const p1 = core(group, 'p1');
  const volumeId = p1.catalog.require(volume).id;
  t.equal(p1.catalog.routes(p1.catalog.require(volume)).route(0).owner, 'p1', 'page 0 is on p1');
  const data = pattern();
  await write(world, group, 'p2', 0, data);
  await drive(world, group.hostPath('p2', volume)!.flush());

  await drive(world, p1.migrator.start(volume, 0, 'p3'));
  const copied = (): number => core(group, 'p1').migrator.list()[0]?.bytesCopied ?? -1;
  // Piece 1's first two chunks are on p3 (its cache: not synced), the piece not done yet.
  t.ok(await until(world, () => copied() >= pieceBytes + 2 * chunkBlocks * blockBytes), 'two chunks of piece 1 copied');
  const at = core(group, 'p1').migrator.list()[0];
  t.equal(at.done, 1, 'piece 0 is done, piece 1 in transit');
  t.ok(at.bytesCopied % pieceBytes !== 0, `mid-piece (${at.bytesCopied} bytes copied)`);

  group.peers.get('p3')!.crash();
  await drive(world, group.peers.get('p3')!.start());
  t.equal(core(group, 'p1').migrator.list()[0].bytesCopied, at.bytesCopied, 'p3 is back before the next chunk');
  const first = pieceBytes / blockBytes;
  const left = await drive(world, core(group, 'p3').targets.stored(volumeId)!.read(first, 2 * chunkBlocks));
  t.notOk(left.equals(data.subarray(first * blockBytes, (first + 2 * chunkBlocks) * blockBytes)), "p3's disk lost some of piece 1's two chunks (not synced)");

  await drive(world, p1.migrator.wait(volumeId, 0), 300_000);
  t.equal(p1.catalog.routes(p1.catalog.require(volume)).route(0).owner, 'p3', 'the move committed');
  for (const id of ['p1', 'p2', 'p3']) {
    const got = await drive(world, group.hostPath(id, volume)!.read(0, pageBlocks));
    t.ok(got.equals(data), `page 0 whole through ${id}`);
  }
});
