import t from 'tap';
import * as limits from '../src/limits';
import { lunIndex } from '../src/iscsi/types';

t.test('a page is a whole number of grains for every block size', async (t) => {
  for (const blockBytes of limits.blockBytesAllowed) {
    t.equal((limits.pageBlocks * blockBytes) % limits.grainBytes, 0, `block ${blockBytes}`);
  }
});

t.test('lunIndex reads peripheral and flat single-level LUNs', async (t) => {
  t.equal(lunIndex(Buffer.from([0, 5, 0, 0, 0, 0, 0, 0])), 5);
  t.equal(lunIndex(Buffer.from([0x40 | 1, 2, 0, 0, 0, 0, 0, 0])), 258);
});
