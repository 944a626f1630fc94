// Mode pages (SPC-4 7.5, SBC-3 6.4): read-write error recovery, caching, control and
// informational exceptions. Only the control page's D_SENSE bit is changeable; the caching
// page reports WCE=1 because writes are acknowledged from the OS cache (DESIGN.md 2).

export const ModePage = {
  readWriteErrorRecovery: 0x01,
  caching: 0x08,
  control: 0x0a,
  informationalExceptions: 0x1c,
  all: 0x3f,
} as const;

export const PageControl = { current: 0, changeable: 1, default: 2, saved: 3 } as const;

export interface ModeState {
  descriptorSense: boolean;
}

type PageBuilder = (pc: number, s: ModeState) => Buffer;

function page(code: number, length: number, fill: (b: Buffer) => void): Buffer {
  const b = Buffer.alloc(2 + length);
  b[0] = code; // PS=0: we save nothing
  b[1] = length;
  fill(b);
  return b;
}

const builders: Record<number, PageBuilder> = {
  [ModePage.readWriteErrorRecovery]: (pc) =>
    page(0x01, 0x0a, (b) => {
      if (pc !== PageControl.changeable) b[2] = 0x80; // AWRE
    }),
  [ModePage.caching]: (pc) =>
    page(0x08, 0x12, (b) => {
      if (pc !== PageControl.changeable) b[2] = 0x04; // WCE
    }),
  [ModePage.control]: (pc, s) =>
    page(0x0a, 0x0a, (b) => {
      if (pc === PageControl.changeable) {
        b[2] = 0x04; // D_SENSE may be changed
        return;
      }
      b[2] = pc === PageControl.current && s.descriptorSense ? 0x04 : 0x00;
      b[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
      b.writeUInt16BE(0xffff, 8); // busy timeout period: unlimited
    }),
  [ModePage.informationalExceptions]: () => page(0x1c, 0x0a, () => undefined),
};

export const modePageCodes = [ModePage.readWriteErrorRecovery, ModePage.caching, ModePage.control, ModePage.informationalExceptions];

/** The pages for a MODE SENSE request, or undefined when the page is not supported. */
export function modePages(code: number, subpage: number, pc: number, s: ModeState): Buffer | undefined {
  if (code === ModePage.all) {
    if (subpage !== 0 && subpage !== 0xff) return undefined;
    return Buffer.concat(modePageCodes.map((c) => builders[c](pc, s)));
  }
  if (subpage !== 0) return undefined;
  const builder = builders[code];
  return builder ? builder(pc, s) : undefined;
}

/**
 * Apply MODE SELECT page data. Returns the byte offset (within `pages`) of the first field
 * that may not be changed, or -1 when everything applied.
 */
export function applyModePages(pages: Buffer, s: ModeState): { badOffset: number; changed: boolean } {
  let off = 0;
  let changed = false;
  const next: ModeState = { ...s };
  while (off + 2 <= pages.length) {
    const code = pages[off] & 0x3f;
    const spf = (pages[off] & 0x40) !== 0;
    if (spf) return { badOffset: off, changed: false };
    const length = pages[off + 1];
    if (off + 2 + length > pages.length) return { badOffset: off + 1, changed: false };
    const builder = builders[code];
    if (!builder) return { badOffset: off, changed: false };
    const current = builder(PageControl.current, s);
    const mask = builder(PageControl.changeable, s);
    if (length !== current[1]) return { badOffset: off + 1, changed: false };
    for (let i = 2; i < 2 + length; i++) {
      if ((pages[off + i] & ~mask[i]) !== (current[i] & ~mask[i])) return { badOffset: off + i, changed: false };
    }
    if (code === ModePage.control) {
      const dsense = (pages[off + 2] & 0x04) !== 0;
      if (dsense !== next.descriptorSense) changed = true;
      next.descriptorSense = dsense;
    }
    off += 2 + length;
  }
  s.descriptorSense = next.descriptorSense;
  return { badOffset: -1, changed };
}
