// The data stream's frame parser (src/routing/frame-reader.ts) without sockets: a stream of
// frames split into chunks at every byte position comes out whole; a frame inside one chunk is
// a view of it, one that spans chunks a buffer of its own; a length of 0 or over the bound is
// malformed.

import t from 'tap';
import { frameOf } from '../src/routing/data-stream';
import { FrameReader, InPlaceReads } from '../src/routing/frame-reader';

/** `frames` as one byte stream. */
function streamOf(frames: Buffer[]): Buffer {
  return Buffer.concat(frames.map(frameOf));
}

t.test('the parser: frames split at every byte position come out whole; a frame inside one chunk is a view of it', async (t) => {
  const frames = [Buffer.from('a'), Buffer.alloc(300, 7), Buffer.from('hello world'), Buffer.alloc(5, 1)];
  const bytes = streamOf(frames);
  let failures = 0;
  for (let cut = 0; cut <= bytes.length; cut++) {
    for (let cut2 = cut; cut2 <= bytes.length; cut2 += 7) {
      const r = new FrameReader(1024);
      const got = [bytes.subarray(0, cut), bytes.subarray(cut, cut2), bytes.subarray(cut2)].flatMap((c) => r.read(c) ?? [Buffer.from('MALFORMED')]);
      if (got.length !== frames.length || got.some((g, i) => !g.equals(frames[i])) || r.midFrame) failures++;
    }
  }
  t.equal(failures, 0, 'every split of the stream into three chunks gives the same four frames');
  const r = new FrameReader(1024);
  const one = Buffer.from(bytes);
  const got = r.read(one)!;
  t.ok(got.every((f) => f.buffer === one.buffer), 'frames wholly inside the chunk are views of it (no copy)');
  const r2 = new FrameReader(1024);
  const [first] = [r2.read(bytes.subarray(0, 20)), r2.read(bytes.subarray(20))].flat() as Buffer[];
  t.equal(first.length, 1, 'the first frame came whole from the first chunk');
  const spanned = [r2.read(bytes.subarray(0, 10)), r2.read(bytes.subarray(10))].flat() as Buffer[];
  t.ok(spanned[1].equals(frames[1]) && spanned[1].buffer !== bytes.buffer, 'a frame that spans chunks is assembled into a buffer of its own');
  const byByte = new FrameReader(1024);
  const slow = [...bytes].flatMap((b) => byByte.read(Buffer.from([b]))!);
  t.same(slow.map((f) => f.toString('hex')), frames.map((f) => f.toString('hex')), 'one byte at a time');
  const half = new FrameReader(1024);
  t.same(half.read(bytes.subarray(0, 3)), [], 'half a length prefix: no frame yet');
  t.ok(half.midFrame, 'and the reader knows a frame was cut');

  const zero = Buffer.alloc(4);
  t.equal(new FrameReader(1024).read(zero), undefined, 'a length of 0 is malformed');
  const big = Buffer.alloc(4);
  big.writeUInt32BE(1025, 0);
  t.equal(new FrameReader(1024).read(big), undefined, 'a length over the bound is malformed, before any byte of it is allocated');
  t.same(new FrameReader(1025).read(big), [], 'the bound is the reader\'s');
});


t.test('reads in place: a large frame is read into its own buffer, frames never change after they are handed on', async (t) => {
  // A "kernel" that copies the stream into whatever buffer next() gives, at most `max` bytes a read.
  const frames = [Buffer.alloc(100, 1), Buffer.alloc(200_000, 2), Buffer.from('x'), Buffer.alloc(70_000, 3), Buffer.alloc(17_000, 4), Buffer.alloc(9, 5)];
  frames[1][199_999] = 9;
  const bytes = streamOf(frames);
  for (const max of [1, 7, 4096, 16 * 1024 + 3, 65_536, 300_000]) {
    const r = new InPlaceReads(new FrameReader(1 << 20));
    const got: Buffer[] = [];
    const copies = [];
    for (let at = 0; at < bytes.length; ) {
      const into = r.next();
      const n = Math.min(max, into.length, bytes.length - at);
      bytes.copy(into, 0, at, at + n);
      at += n;
      const out = r.read(n);
      if (!out) return t.fail('malformed');
      got.push(...out);
      copies.push(...out.map((f) => Buffer.from(f)));
    }
    t.same(got.map((f) => f.toString('hex')), frames.map((f) => f.toString('hex')), `reads of at most ${max} bytes: the same frames`);
    t.ok(got.every((f, i) => f.equals(copies[i])), `reads of at most ${max} bytes: no frame changed after it was handed on`);
    t.notOk(r.midFrame, 'no frame left half read');
  }
  // With reads as large as the buffers offered, a run of large frames lands almost wholly in
  // their own buffers: the first read takes up to 64 KiB into the scratch buffer, the reads
  // between frames 4 KiB.
  const r = new InPlaceReads(new FrameReader(1 << 20));
  const big = streamOf([Buffer.alloc(200_000, 2), Buffer.alloc(131_072, 3), Buffer.alloc(131_072, 4)]);
  let direct = 0;
  const whole: number[] = [];
  for (let at = 0; at < big.length; ) {
    const into = r.next();
    const n = Math.min(into.length, big.length - at);
    big.copy(into, 0, at, at + n);
    at += n;
    const out = r.read(n)!;
    if (into.length !== 4096 && into.length !== 65_536) direct += n;
    whole.push(...out.map((f) => f.length));
  }
  t.same(whole, [200_000, 131_072, 131_072], 'the frames, whole');
  t.ok(direct >= 200_000 + 2 * 131_072 - 65_536 - 2 * 4096, `${direct} of ${200_000 + 2 * 131_072} bytes read straight into the frames' buffers`);
  const bad = new InPlaceReads(new FrameReader(1024));
  const into = bad.next();
  into.writeUInt32BE(5000, 0);
  t.equal(bad.read(4), undefined, 'a length over the bound is malformed');
});
