//! Run queue: fixed priorities (0..=255, higher runs first) with round robin inside a
//! priority. Queues are intrusive lists threaded through the vCPUs' `next` links, so
//! enqueue and pick are O(1) and no memory is allocated.

use super::VcpuId;

pub const PRIORITIES: usize = 256;

/// A FIFO of vCPUs linked through an external `next` array.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queue {
    pub head: Option<VcpuId>,
    pub tail: Option<VcpuId>,
}

impl Queue {
    pub const fn new() -> Self {
        Self { head: None, tail: None }
    }

    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// Append `v`. (`tail` is meaningful only while `head` is set, so a queue emptied by
    /// popping need not reset it.)
    #[inline(always)]
    pub fn push(&mut self, v: VcpuId, next: &mut [Option<VcpuId>]) {
        next[v as usize] = None;
        match (self.head, self.tail) {
            (Some(_), Some(t)) => next[t as usize] = Some(v),
            _ => self.head = Some(v),
        }
        self.tail = Some(v);
    }

    #[inline(always)]
    pub fn pop(&mut self, next: &mut [Option<VcpuId>]) -> Option<VcpuId> {
        let h = self.head?;
        self.head = next[h as usize].take();
        Some(h)
    }

    /// Unlink `v` wherever it is; false if it was not queued here.
    pub fn remove(&mut self, v: VcpuId, next: &mut [Option<VcpuId>]) -> bool {
        let mut prev: Option<VcpuId> = None;
        let mut cur = self.head;
        while let Some(c) = cur {
            if c == v {
                let after = next[c as usize].take();
                match prev {
                    Some(p) => next[p as usize] = after,
                    None => self.head = after,
                }
                if self.tail == Some(v) {
                    self.tail = prev;
                }
                if self.head.is_none() {
                    self.tail = None;
                }
                return true;
            }
            prev = cur;
            cur = next[c as usize];
        }
        false
    }

    #[cfg(test)]
    pub fn iter<'a>(&self, next: &'a [Option<VcpuId>]) -> impl Iterator<Item = VcpuId> + 'a {
        let mut cur = self.head;
        core::iter::from_fn(move || {
            let c = cur?;
            cur = next[c as usize];
            Some(c)
        })
    }
}

/// Ready vCPUs by priority, with a bitmap for finding the highest non-empty level.
#[derive(Clone)]
pub struct RunQueue {
    levels: [Queue; PRIORITIES],
    bitmap: [u64; PRIORITIES / 64],
}

impl RunQueue {
    pub const fn new() -> Self {
        Self { levels: [Queue::new(); PRIORITIES], bitmap: [0; PRIORITIES / 64] }
    }

    pub fn push(&mut self, v: VcpuId, priority: u8, next: &mut [Option<VcpuId>]) {
        let p = priority as usize;
        self.levels[p].push(v, next);
        self.bitmap[p / 64] |= 1 << (p % 64);
    }

    /// The highest priority with a ready vCPU.
    pub fn highest(&self) -> Option<u8> {
        for (i, word) in self.bitmap.iter().enumerate().rev() {
            if *word != 0 {
                return Some((i * 64 + 63 - word.leading_zeros() as usize) as u8);
            }
        }
        None
    }

    pub fn pop_highest(&mut self, next: &mut [Option<VcpuId>]) -> Option<VcpuId> {
        let p = self.highest()? as usize;
        let v = self.levels[p].pop(next);
        if self.levels[p].is_empty() {
            self.bitmap[p / 64] &= !(1 << (p % 64));
        }
        v
    }

    pub fn remove(&mut self, v: VcpuId, priority: u8, next: &mut [Option<VcpuId>]) -> bool {
        let p = priority as usize;
        let found = self.levels[p].remove(v, next);
        if self.levels[p].is_empty() {
            self.bitmap[p / 64] &= !(1 << (p % 64));
        }
        found
    }

    #[cfg(test)]
    pub fn contains(&self, v: VcpuId, priority: u8, next: &[Option<VcpuId>]) -> bool {
        self.levels[priority as usize].iter(next).any(|x| x == v)
    }
}

impl Default for RunQueue {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn highest_priority_first_round_robin_within() {
        let mut next = [None; 8];
        let mut rq = RunQueue::new();
        rq.push(0, 10, &mut next);
        rq.push(1, 200, &mut next);
        rq.push(2, 10, &mut next);
        rq.push(3, 200, &mut next);
        assert_eq!(rq.highest(), Some(200));
        assert_eq!(rq.pop_highest(&mut next), Some(1));
        assert_eq!(rq.pop_highest(&mut next), Some(3));
        assert_eq!(rq.pop_highest(&mut next), Some(0));
        rq.push(0, 10, &mut next);
        assert_eq!(rq.pop_highest(&mut next), Some(2));
        assert_eq!(rq.pop_highest(&mut next), Some(0));
        assert_eq!(rq.pop_highest(&mut next), None);
        assert_eq!(rq.highest(), None);
    }

    #[test]
    fn remove_from_middle_and_ends() {
        let mut next = [None; 8];
        let mut q = Queue::new();
        for v in 0..5 {
            q.push(v, &mut next);
        }
        assert!(q.remove(2, &mut next));
        assert!(q.remove(4, &mut next));
        assert!(q.remove(0, &mut next));
        assert!(!q.remove(0, &mut next));
        assert_eq!(q.iter(&next).collect::<Vec<_>>(), vec![1, 3]);
        q.push(4, &mut next);
        assert_eq!(q.iter(&next).collect::<Vec<_>>(), vec![1, 3, 4]);
    }

    proptest! {
        /// The run queue behaves like a model: a map from priority to FIFO.
        #[test]
        fn matches_model(ops in proptest::collection::vec((0u8..3, 0u16..16, 0u8..4), 0..200)) {
            let mut next = [None; 16];
            let mut rq = RunQueue::new();
            let mut model: Vec<Vec<u16>> = vec![vec![]; 4];
            let mut prio = [0u8; 16];
            for (op, v, p) in ops {
                let queued = model.iter().any(|q| q.contains(&v));
                match op {
                    0 if !queued => { rq.push(v, p * 50, &mut next); prio[v as usize] = p * 50; model[p as usize].push(v); }
                    1 => {
                        let got = rq.pop_highest(&mut next);
                        let want = model.iter_mut().rev().find(|q| !q.is_empty()).map(|q| q.remove(0));
                        prop_assert_eq!(got, want);
                    }
                    2 if queued => {
                        prop_assert!(rq.remove(v, prio[v as usize], &mut next));
                        for q in model.iter_mut() { q.retain(|x| *x != v); }
                    }
                    _ => {}
                }
                let highest = model.iter().rposition(|q| !q.is_empty()).map(|p| p as u8 * 50);
                prop_assert_eq!(rq.highest(), highest);
            }
        }
    }
}
