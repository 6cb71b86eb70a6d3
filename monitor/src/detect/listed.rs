//! When connwatch first listed each socket of the kernel's socket list: the only age a
//! socket that no event announced has. Opened in (previous dump, first listing]; a socket
//! in the first dump after start has no lower bound (open before connwatch, age unknown).
use crate::FastMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    /// The refresh that first listed it (monotonic ns): it was open by then.
    pub at_ns: u64,
    /// When the dump before that one started: it opened after this, since that dump did not
    /// list it. `None` for a socket of the first dump: open before connwatch started.
    pub after_ns: Option<u64>,
}

/// Socket cookie → [`Listed`], for the sockets of the last dump only, at most `max`.
pub struct FirstListed {
    max: usize,
    table: FastMap<u64, Listed>,
    /// When the last dump started; `None` before the first.
    last_dump_ns: Option<u64>,
    /// Sockets left untracked because the table was full.
    pub evictions: u64,
}

impl FirstListed {
    pub fn new(max: usize) -> FirstListed {
        FirstListed {
            max,
            table: FastMap::default(),
            last_dump_ns: None,
            evictions: 0,
        }
    }

    /// Folds in one dump's sockets (`cookies`), started at `dump_ns` and folded in at
    /// `now_ns`: keeps the first listing of the sockets still there, forgets the others,
    /// and adds the new ones while there is room (known sockets first, so a full table
    /// never makes an old socket look new).
    pub fn remember(
        &mut self,
        cookies: impl Iterator<Item = u64> + Clone,
        dump_ns: u64,
        now_ns: u64,
    ) {
        let mut kept = FastMap::default();
        for cookie in cookies.clone() {
            if let Some(&listed) = self.table.get(&cookie) {
                kept.insert(cookie, listed);
            }
        }
        let new = Listed {
            at_ns: now_ns,
            after_ns: self.last_dump_ns,
        };
        for cookie in cookies {
            if kept.len() >= self.max {
                if !kept.contains_key(&cookie) {
                    self.evictions += 1;
                }
                continue;
            }
            kept.entry(cookie).or_insert(new);
        }
        self.table = kept;
        self.last_dump_ns = Some(dump_ns);
    }

    pub fn get(&self, cookie: u64) -> Option<Listed> {
        self.table.get(&cookie).copied()
    }

    /// Sockets tracked now.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_opened_between_two_dumps_and_one_open_at_start() {
        let mut listed = FirstListed::new(8);
        listed.remember([1].into_iter(), 90, 100);
        listed.remember([1, 2].into_iter(), 190, 200);
        assert_eq!(
            listed.get(1),
            Some(Listed {
                at_ns: 100,
                after_ns: None
            })
        );
        assert_eq!(
            listed.get(2),
            Some(Listed {
                at_ns: 200,
                after_ns: Some(90)
            }),
            "opened after the first dump started"
        );
        listed.remember([2].into_iter(), 290, 300);
        assert_eq!((listed.get(1), listed.len()), (None, 1), "gone: forgotten");
    }
}
