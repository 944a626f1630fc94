// Which way a command's data moves, from its operation code: what the transport checks the
// iSCSI R/W flags against before it moves any data (a WRITE sent with only the R flag would
// otherwise reach the logical unit with no data and succeed having written nothing).

/** Commands whose data, when there is any, goes from the initiator to the target. */
const dataOutOpcodes = new Set([
  0x0a, 0x15, 0x2a, 0x2e, 0x2f, 0x41, 0x42, 0x55, 0x5f, 0x83, 0x89, 0x8a, 0x8b, 0x8e, 0x8f, 0x93, 0xaa, 0xae, 0xaf,
]);
/** Commands whose data goes from the target to the initiator. */
const dataInOpcodes = new Set([0x03, 0x08, 0x12, 0x1a, 0x25, 0x28, 0x5a, 0x5e, 0x84, 0x88, 0x9e, 0xa0, 0xa3, 0xa8]);

/** 'out' / 'in' for the commands we know to move data one way; undefined for the others (no data, or not ours to judge). */
export function dataDirection(cdb: Buffer): 'in' | 'out' | undefined {
  if (dataOutOpcodes.has(cdb[0])) return 'out';
  if (dataInOpcodes.has(cdb[0])) return 'in';
  return undefined;
}
