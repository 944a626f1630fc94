// A small seeded PRNG for the fuzz suite (test/fuzz.test.ts) and the hostile-load runs: every
// case draws from its own generator, seeded from the run's seed and the case's index, so one
// case replays alone (PEERSAN_FUZZ_SEED=S PEERSAN_FUZZ_CASE=i) without running those before it.

/** sfc32 over 128 bits of state; good enough for test input, and the same on every machine. */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  constructor(seed: number, stream = 0) {
    this.a = 0x9e3779b9 ^ seed;
    this.b = 0x243f6a88 ^ stream;
    this.c = 0xb7e15162 ^ Math.imul(seed, 0x85ebca6b);
    this.d = 1;
    // Mix the seed in before the first draw (sfc32's recommended warm-up).
    for (let i = 0; i < 15; i++) this.u32();
  }

  u32(): number {
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }

  /** A whole number in [0, n). */
  int(n: number): number {
    return Math.floor((this.u32() / 0x1_0000_0000) * n);
  }

  /** A whole number in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }

  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }

  /** A boundary value more often than not: the values parsers get wrong. */
  u32Edge(): number {
    return this.chance(0.5) ? this.pick([0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x10000, 0xffffff, 0x1000000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff]) : this.u32();
  }

  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }

  /** `n` bytes drawn from `alphabet` only (data whose origin a later read can recognise). */
  bytesFrom(n: number, alphabet: readonly number[]): Buffer {
    const b = Buffer.alloc(n, alphabet[this.int(alphabet.length)]);
    // Runs of one value with a few changes: cheap to make, still varied.
    for (let i = 0; i < Math.min(n, 64); i++) b[this.int(n)] = alphabet[this.int(alphabet.length)];
    return b;
  }

  /** `b` with a few bytes overwritten, flipped, or the buffer cut short or extended. */
  mutate(b: Buffer): Buffer {
    const out = Buffer.from(b);
    const edits = this.range(1, 4);
    for (let i = 0; i < edits && out.length > 0; i++) {
      const at = this.int(out.length);
      switch (this.int(4)) {
        case 0: out[at] = this.u32() & 0xff; break;
        case 1: out[at] ^= 1 << this.int(8); break;
        case 2: out[at] = this.pick([0, 0xff, 0x7f, 0x80]); break;
        default: if (at + 4 <= out.length) out.writeUInt32BE(this.u32Edge(), at & ~3);
      }
    }
    if (this.chance(0.1)) return out.subarray(0, this.int(out.length + 1));
    if (this.chance(0.05)) return Buffer.concat([out, this.bytes(this.range(1, 64))]);
    return out;
  }
}

/** The seed of case `index` of a run seeded `seed` (a 32-bit mix, so nearby cases differ). */
export function caseSeed(seed: number, index: number): number {
  let h = Math.imul(seed ^ 0x5bd1e995, 0x01000193) ^ Math.imul(index + 1, 0x9e3779b1);
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d);
  h ^= h >>> 12;
  return h >>> 0;
}
