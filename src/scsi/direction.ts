// Which way a command's data moves, from its operation code: what the transport checks the
// iSCSI W flag against before it moves any data (a WRITE sent with only the R flag would
// otherwise reach the logical unit with no data and succeed having written nothing). The
// opcodes are those of the command table in device.ts that take a parameter list or data.

/** Commands whose data, when there is any, goes from the initiator to the target. */
const dataOutOpcodes = new Set([
  0x0a, 0x15, 0x2a, 0x2e, 0x2f, 0x41, 0x42, 0x55, 0x5f, 0x83, 0x89, 0x8a, 0x8b, 0x8e, 0x8f, 0x93, 0xaa, 0xae, 0xaf,
]);

/** 'out' for the commands that take data from the initiator; undefined for the others (data-in, none, or not ours to judge). */
export function dataDirection(cdb: Buffer): 'out' | undefined {
  return dataOutOpcodes.has(cdb[0]) ? 'out' : undefined;
}
