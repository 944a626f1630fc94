// The data stream's frame parser (src/routing/frame-reader.ts) without sockets: a stream of
// frames split into chunks at every byte position comes out whole; a frame inside one chunk is
// a view of it, one that spans chunks a buffer of its own; a length of 0 or over the bound is
// malformed.

import t from 'tap';
import { frameOf } from '../src/routing/data-stream';
import { FrameReader } from '../src/routing/frame-reader';

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

