// The recent changes of a volume's pages on one peer (DESIGN.md 10, invariant 3 of
// src/replication): the grains of changes applied here that are not known acknowledged on every
// in-sync copy. A page's primary numbers its changes (`seq`, per page, increasing) and sends
// with each one `ackedThrough`: every seq up to it is acknowledged on all in-sync copies. Every
// copy, the primary included, keeps the grains of changes above that mark; a new primary
// reconciles exactly those (failover.ts collects them from every in-sync copy). Pure: no I/O.
//
// Numbering across primaries: a peer that becomes primary numbers on from the highest seq it has
// seen for the page, so a copy's entries from the old primary are pruned once the new one's mark
// passes them (after its reconcile made those grains equal everywhere). Entries of a peer that
// restarted are gone with its memory: such a peer is suspect and resyncs (activity.ts).
//
// A change that fails on the primary after it may have reached some copies (a copy that could not
// be dropped, a local store error) stays pending: the primary's mark stops below it, so every copy
// keeps its grains for a reconcile, until this peer stops being the primary (release()).

interface PageSeqs {
  /** grain (within the page) → the highest seq of a change of it above the mark. */
  grains: Map<number, number>;
  /** The highest seq seen or given here for the page. */
  maxSeq: number;
  /** Primary: seqs given and not acknowledged yet. */
  pending: Set<number>;
  /** Entries up to this seq are pruned. */
  mark: number;
}

export class RecentChanges {
  private readonly pages = new Map<number, PageSeqs>();

  /**
   * Primary: number a change of grains [firstGrain, lastGrain] of the page and record it as
   * recent here; `ackedThrough` is the mark to send with it (below `seq`).
   */
  begin(page: number, firstGrain: number, lastGrain: number): { seq: number; ackedThrough: number } {
    const s = this.of(page);
    const seq = ++s.maxSeq;
    s.pending.add(seq);
    this.note(s, firstGrain, lastGrain, seq);
    return { seq, ackedThrough: this.ackedThrough(s) };
  }

  /** Primary: change `seq` ended; acknowledged everywhere (`ok`), or failed (it stays pending). */
  end(page: number, seq: number, ok: boolean): void {
    const s = this.pages.get(page);
    if (!s || !ok) return;
    s.pending.delete(seq);
    this.prune(s, this.ackedThrough(s));
  }

  /** This peer is not the page's primary any more: its pending changes are the next primary's to reconcile. */
  release(page: number): void {
    this.pages.get(page)?.pending.clear();
  }

  /**
   * Primary: a change of the page failed after it may have reached some copies and is not
   * settled yet (its drop is retried, its grains stay recent): the copies may differ until it is.
   */
  unsettled(page: number): boolean {
    return (this.pages.get(page)?.pending.size ?? 0) > 0;
  }

  /** Copy: the primary's change `seq` of grains [firstGrain, lastGrain], sent with mark `ackedThrough`. */
  received(page: number, firstGrain: number, lastGrain: number, seq: number, ackedThrough: number): void {
    const s = this.of(page);
    s.maxSeq = Math.max(s.maxSeq, seq);
    // A primary that saw fewer changes than this copy numbers from below its mark: follow its mark.
    if (seq <= s.mark) s.mark = ackedThrough;
    this.note(s, firstGrain, lastGrain, seq);
    this.prune(s, ackedThrough);
  }

  /** Grain indexes of the page's recent changes, ascending. */
  grains(page: number): number[] {
    return [...(this.pages.get(page)?.grains.keys() ?? [])].sort((a, b) => a - b);
  }

  private of(page: number): PageSeqs {
    let s = this.pages.get(page);
    if (!s) this.pages.set(page, (s = { grains: new Map(), maxSeq: 0, pending: new Set(), mark: 0 }));
    return s;
  }

  private note(s: PageSeqs, firstGrain: number, lastGrain: number, seq: number): void {
    if (seq <= s.mark) return;
    for (let g = firstGrain; g <= lastGrain; g++) s.grains.set(g, Math.max(s.grains.get(g) ?? 0, seq));
  }

  /** Every seq given here up to the result is acknowledged (the lowest pending one bounds it). */
  private ackedThrough(s: PageSeqs): number {
    let low = s.maxSeq + 1;
    for (const seq of s.pending) low = Math.min(low, seq);
    return low - 1;
  }

  /** Drop entries up to `mark`. Cheap: entries above the last mark are the changes in flight, few. */
  private prune(s: PageSeqs, mark: number): void {
    if (mark <= s.mark) return;
    s.mark = mark;
    for (const [g, seq] of s.grains) if (seq <= mark) s.grains.delete(g);
  }
}
