//! A bounded run of the newest log entries, kept in memory: the RocksDB log store's tail
//! (what openraft reads back right after appending it) and a server's applied entries for the
//! clients that follow it (see [`crate::machine`]) are both one.

use std::collections::VecDeque;

use crate::machine::Entry;

/// Consecutive entries, oldest first, each with its size in bytes: at most `max_entries`, and
/// at most `max_bytes` unless a single entry is larger (the newest is always kept).
#[derive(Debug)]
pub(crate) struct EntryWindow {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl EntryWindow {
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Self {
        EntryWindow {
            entries: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    pub(crate) fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds the next entry. One that does not follow on from the newest replaces the window
    /// rather than leave a gap in it. Drops the oldest beyond the bounds.
    pub(crate) fn push(&mut self, entry: Entry, size: usize) {
        let follows = self
            .entries
            .back()
            .is_none_or(|(last, _)| last.log_id.index + 1 == entry.log_id.index);
        if !follows {
            self.clear();
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.entries.len() > self.max_entries
            || (self.bytes > self.max_bytes && self.entries.len() > 1)
        {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops the entries from `index` on.
    pub(crate) fn truncate_from(&mut self, index: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= index)
        {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops the entries up to and including `index`.
    pub(crate) fn purge_through(&mut self, index: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| e.log_id.index <= index)
        {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// The entries after `index`, oldest first.
    pub(crate) fn after(&self, index: u64) -> impl Iterator<Item = &Entry> {
        let skip = self
            .entries
            .partition_point(|(e, _)| e.log_id.index <= index);
        self.entries.range(skip..).map(|(e, _)| e)
    }

    /// The entries in `[start, end)`, if all of them are here.
    pub(crate) fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let next = first + self.entries.len() as u64;
        if start < first || end > next {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let (from, to) = (
            usize::try_from(start - first).ok()?,
            usize::try_from(end - first).ok()?,
        );
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use super::EntryWindow;
    use crate::machine::Entry;

    fn blank(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    fn filled(window: &mut EntryWindow, range: std::ops::RangeInclusive<u64>, size: usize) {
        for i in range {
            window.push(blank(i), size);
        }
    }

    #[test]
    fn a_window_serves_what_it_holds_and_nothing_it_lacks() {
        let mut window = EntryWindow::new(1024, 1 << 20);
        assert_eq!(window.get(1, 2), None, "empty");
        filled(&mut window, 1..=5, 10);
        assert_eq!(window.get(2, 5).map(|e| indexes(&e)), Some(vec![2, 3, 4]));
        assert_eq!(window.get(5, 5), Some(vec![]), "an empty range");
        assert_eq!(window.get(0, 3), None, "starts before the window");
        assert_eq!(window.get(4, 7), None, "ends after the log");
        let after: Vec<u64> = window.after(3).map(|e| e.log_id.index).collect();
        assert_eq!(after, [4, 5]);
        // An entry that does not follow on (a new term's entries after a cut the window was
        // not told of) replaces the window rather than leaving a gap in it.
        window.push(blank(9), 10);
        assert_eq!(window.get(3, 4), None);
        assert_eq!(window.get(9, 10).map(|e| indexes(&e)), Some(vec![9]));
    }

    #[test]
    fn a_window_follows_truncation_and_purge_and_stays_bounded() {
        let mut window = EntryWindow::new(1024, 1 << 20);
        filled(&mut window, 1..=10, 10);
        window.truncate_from(8);
        assert_eq!(window.get(7, 9), None, "8 is gone");
        window.push(blank(8), 10);
        assert_eq!(window.get(7, 9).map(|e| indexes(&e)), Some(vec![7, 8]));
        window.purge_through(3);
        assert_eq!(window.get(3, 5), None);
        assert_eq!(window.get(4, 5).map(|e| indexes(&e)), Some(vec![4]));
        assert_eq!(window.bytes(), 50);

        let mut long = EntryWindow::new(16, 1 << 20);
        filled(&mut long, 1..=21, 1);
        assert_eq!(long.len(), 16);
        assert_eq!(long.first_index(), Some(6));
        let mut big = EntryWindow::new(16, 300);
        filled(&mut big, 1..=4, 100);
        assert_eq!(big.first_index(), Some(2), "at most 300 bytes");
        assert_eq!(big.bytes(), 300);
        let mut huge = EntryWindow::new(16, 300);
        filled(&mut huge, 1..=2, 1000);
        assert_eq!(
            huge.first_index(),
            Some(2),
            "the newest stays, however large"
        );
    }
}
