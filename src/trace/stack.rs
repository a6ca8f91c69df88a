//! Cache hit rates for every cache size at once, under the counting of "Not All
//! Models Suit Expert Offloading" (arXiv 2505.16056; the authors' `ljcleo/moe-lrc`,
//! `41_sch_calc.py` `calc_fsf` and `50_chr_calc.py`):
//!
//! - all experts of a token are looked up against the cache as it was when the
//!   token arrived, then inserted one after another in rank order;
//! - warm start: an expert never requested before is a hit for every cache size
//!   larger than the number of distinct experts requested so far (a cache that is
//!   not yet full is taken to hold what will be asked for);
//! - the hit rate of a sequence is hits over requests; a trace's is the mean over
//!   its sequences.
//!
//! Each policy evicts the resident expert of lowest priority, and priorities do
//! not depend on the cache size, so one priority stack (Mattson et al., 1970)
//! holds every cache size's contents at once: the cache of size `c` is the stack's
//! top `c`, and a request found at depth `d` hits every size above `d`. On a
//! request at depth `d` the expert moves to the top and the experts above `d`
//! are re-sorted by one carry pass that drops, at each depth, the lower-priority
//! of the carried and the resident expert. Checked against the authors' code on
//! random traces (all four policies, equal to float32 precision).

use super::routes::TokenExperts;

/// Which expert a full cache evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackPolicy {
    /// The least recently requested.
    Lru,
    /// The least often requested so far (counts kept for evicted experts too),
    /// ties to the least recently requested.
    Lfu,
    /// The one requested again furthest in the future (Belady's MIN).
    Belady,
    /// SCH: the one with the fewest requests among the next `future` tokens
    /// (the current token's later ranks included), ties to the least recent.
    FewestSoon { future: usize },
}

/// Per cache size `1..=num_items`, the fraction of `tokens`' requests that hit.
/// Empty sequences give all zeros. Every id in `tokens` must be below
/// `num_items`: traces meet that in `read_trace`, which checks each expert
/// against the metadata's `num_experts`, the `num_items` analysis passes.
pub fn hit_curve(tokens: &TokenExperts, num_items: usize, policy: StackPolicy) -> Vec<f64> {
    let mut stack = PriorityStack::new(tokens, num_items, policy);
    let mut by_depth = vec![0u64; num_items + 1];
    for t in 0..tokens.len() {
        let token = tokens.token(t);
        let mut new_in_token = 0;
        for &x in token {
            let depth = match stack.depth(x) {
                Some(d) => d,
                None => {
                    new_in_token += 1;
                    stack.len() + new_in_token - 1
                }
            };
            if let Some(c) = by_depth.get_mut(depth) {
                *c += 1;
            }
        }
        for &x in token {
            stack.request(x);
        }
        stack.end_token(t);
    }
    let total = tokens.n_choices().max(1) as f64;
    let mut hits = 0u64;
    (0..num_items)
        .map(|d| {
            hits += by_depth[d];
            hits as f64 / total
        })
        .collect()
}

/// [`hit_curve`] averaged over sequences (those with no tokens left out), as the
/// paper reports it.
pub fn mean_hit_curve<'a>(
    sequences: impl IntoIterator<Item = &'a TokenExperts>,
    num_items: usize,
    policy: StackPolicy,
) -> Vec<f64> {
    let mut sum = vec![0f64; num_items];
    let mut n = 0usize;
    for seq in sequences.into_iter().filter(|s| s.n_choices() > 0) {
        for (s, h) in sum.iter_mut().zip(hit_curve(seq, num_items, policy)) {
            *s += h;
        }
        n += 1;
    }
    if n > 0 {
        for s in sum.iter_mut() {
            *s /= n as f64;
        }
    }
    sum
}

/// Not yet requested.
const ABSENT: u32 = u32::MAX;

struct PriorityStack<'a> {
    policy: StackPolicy,
    tokens: &'a TokenExperts,
    /// Experts ever requested, highest priority first.
    stack: Vec<u32>,
    /// `[num_items]`: each expert's index in `stack`, or `ABSENT`.
    depth: Vec<u32>,
    /// `[num_items]`: the request counter at each expert's last request.
    last: Vec<u64>,
    /// `[num_items]`: LFU's counts so far, or SCH's requests within the window.
    count: Vec<u64>,
    /// Belady: `[requests]` the index of the next request of the same expert.
    next_request: Vec<u64>,
    /// `[num_items]`: Belady's next request of each expert.
    next_of: Vec<u64>,
    requests: u64,
}

impl<'a> PriorityStack<'a> {
    fn new(tokens: &'a TokenExperts, num_items: usize, policy: StackPolicy) -> Self {
        let mut s = Self {
            policy,
            tokens,
            stack: Vec::with_capacity(num_items),
            depth: vec![ABSENT; num_items],
            last: vec![0; num_items],
            count: vec![0; num_items],
            next_request: Vec::new(),
            next_of: vec![0; num_items],
            requests: 0,
        };
        match policy {
            StackPolicy::FewestSoon { future } => {
                for t in 0..future.min(tokens.len()) {
                    s.count_in_window(t);
                }
            }
            StackPolicy::Belady => s.next_request = next_requests(tokens, num_items),
            StackPolicy::Lru | StackPolicy::Lfu => {}
        }
        s
    }

    fn len(&self) -> usize {
        self.stack.len()
    }

    fn depth(&self, x: u32) -> Option<usize> {
        match self.depth.get(x as usize) {
            Some(&d) if d != ABSENT => Some(d as usize),
            _ => None,
        }
    }

    fn count_in_window(&mut self, t: usize) {
        for &x in self.tokens.token(t) {
            if let Some(c) = self.count.get_mut(x as usize) {
                *c += 1;
            }
        }
    }

    /// Larger keeps. Unique among requested experts: every key ends in a
    /// distinct request counter (Belady: distinct next-request indices).
    fn priority(&self, x: u32) -> (u64, u64) {
        // invariant: only resident experts are ranked, and residency was decided by
        // `depth`'s bounds-checked lookup of the same id.
        let x = x as usize;
        match self.policy {
            StackPolicy::Lru => (0, self.last[x]),
            StackPolicy::Lfu | StackPolicy::FewestSoon { .. } => (self.count[x], self.last[x]),
            StackPolicy::Belady => (0, u64::MAX - self.next_of[x]),
        }
    }

    /// Moves `x` to the top; the experts it passed are re-sorted by one carry pass.
    fn request(&mut self, x: u32) {
        let d = self.depth(x).unwrap_or(self.stack.len());
        if d == self.stack.len() {
            self.stack.push(x);
        }
        if d > 0 {
            let mut carried = self.stack[0];
            self.stack[0] = x;
            for j in 1..d {
                let resident = self.stack[j];
                if self.priority(resident) < self.priority(carried) {
                    self.stack[j] = carried;
                    self.depth[carried as usize] = j as u32;
                    carried = resident;
                }
            }
            self.stack[d] = carried;
            self.depth[carried as usize] = d as u32;
        }
        self.depth[x as usize] = 0;
        let xi = x as usize;
        match self.policy {
            StackPolicy::Lfu => self.count[xi] += 1,
            StackPolicy::FewestSoon { .. } => self.count[xi] = self.count[xi].saturating_sub(1),
            StackPolicy::Belady => {
                self.next_of[xi] = self.next_request[self.requests as usize];
            }
            StackPolicy::Lru => {}
        }
        self.requests += 1;
        self.last[xi] = self.requests;
    }

    fn end_token(&mut self, t: usize) {
        if let StackPolicy::FewestSoon { future } = self.policy
            && t + future < self.tokens.len()
        {
            self.count_in_window(t + future);
        }
    }
}

/// For each request (tokens flattened, ranks in order), the index of the next
/// request of the same expert; never-again requests get `n + expert`, past
/// every real index (so among them the highest id is evicted first, as in the
/// authors' `calc_beladi`).
fn next_requests(tokens: &TokenExperts, num_items: usize) -> Vec<u64> {
    let flat: Vec<u32> = tokens.tokens().flatten().copied().collect();
    let n = flat.len() as u64;
    let mut next_seen: Vec<u64> = (0..num_items as u64).map(|x| n + x).collect();
    let mut out = vec![0u64; flat.len()];
    for (i, &x) in flat.iter().enumerate().rev() {
        if let Some(slot) = next_seen.get_mut(x as usize) {
            out[i] = *slot;
            *slot = i as u64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(tokens: &[&[u32]]) -> TokenExperts {
        TokenExperts::from_tokens(tokens)
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    /// Requests a b c a, one expert per token, 3 experts.
    /// LRU depths: a new at 0, b new at 1, c new at 2, a at depth 2 (c b a).
    /// Size 1: hits 1 (a, warm-start); size 2: a, b; size 3: all four.
    #[test]
    fn lru_counts_warm_start_and_recency_depth() {
        let s = seq(&[&[0], &[1], &[2], &[0]]);
        assert!(close(
            &hit_curve(&s, 3, StackPolicy::Lru),
            &[0.25, 0.5, 1.0]
        ));
    }

    /// a a b c b a: LFU keeps a (count 2). Depths: a new 0; a 0; b new 1;
    /// c new 2; b: stack after c is [c, a, b]? c arrives (count 1, newest),
    /// carry: a (2) vs b (1) -> a stays, b pushed down: [c, a, b] so b at depth 2;
    /// then stack [b, a, c] -> a at depth 1.
    /// Per size: 1: {a(2nd)} = 2 (first a warm, second a); 2: + b new(1) + a(1) = 4;
    /// 3: + c new(2) + b(2) = 6.
    #[test]
    fn lfu_keeps_the_most_requested() {
        let s = seq(&[&[0], &[0], &[1], &[2], &[1], &[0]]);
        let want = [2.0 / 6.0, 4.0 / 6.0, 1.0];
        assert!(close(&hit_curve(&s, 3, StackPolicy::Lfu), &want));
        // LRU on the same requests: a 0, a 0, b 1, c 2, b 1, a 2.
        let lru = [2.0 / 6.0, 4.0 / 6.0, 1.0];
        assert!(close(&hit_curve(&s, 3, StackPolicy::Lru), &lru));
        // Differs from LRU at size 2 on: a b c a b a b
        let s = seq(&[&[0], &[0], &[0], &[1], &[2], &[0]]);
        // LFU size 1: a a a(hits 2 + warm 1 = 3) then b new at depth 1, c new at
        // depth 2, a: stack [c, a, b] -> depth 1. Size 1: 3/6; size 2: + b + a = 5/6.
        assert!(close(
            &hit_curve(&s, 3, StackPolicy::Lfu),
            &[0.5, 5.0 / 6.0, 1.0]
        ));
        // LRU: a at depth 2 at the end (c b a): size 2 gives only 4/6.
        assert!(close(
            &hit_curve(&s, 3, StackPolicy::Lru),
            &[0.5, 4.0 / 6.0, 1.0]
        ));
    }

    /// a b c a b, one per token, size 2 under MIN: a, b warm hits; c misses and
    /// evicts b (next used at 4, after a at 3); a hits; b misses. 3 of 5.
    /// Size 1: only a's warm hit. Size 3: a, b, c warm + a, b = 5.
    #[test]
    fn belady_evicts_the_furthest_next_use() {
        let s = seq(&[&[0], &[1], &[2], &[0], &[1]]);
        assert!(close(
            &hit_curve(&s, 3, StackPolicy::Belady),
            &[0.2, 0.6, 1.0]
        ));
        // LRU size 2 gets only the warm hits a, b.
        assert!(close(&hit_curve(&s, 3, StackPolicy::Lru), &[0.2, 0.4, 1.0]));
    }

    /// Two experts per token, looked up against the cache as the token found it.
    /// Tokens {a,b} {a,c}: size 1: a warm hit; then b inserted after a, so the
    /// size-1 cache holds b and a misses on token 2; c misses. 1 of 4.
    /// Size 2: a, b warm; a hits; c misses (cache full) -> 3 of 4.
    #[test]
    fn a_token_is_looked_up_against_the_cache_it_found() {
        let s = seq(&[&[0, 1], &[0, 2]]);
        assert!(close(
            &hit_curve(&s, 3, StackPolicy::Lru),
            &[0.25, 0.75, 1.0]
        ));
    }

    /// SCH with a window of 2 tokens: a b c b a? tokens a | b | c | a, size 1.
    /// a: warm hit. b: miss (cache {a} is full... size 1 holds a; b evicts a).
    /// At c (token 2) the window is tokens 2..4 = c, a: c evicts b (0 soon).
    /// a misses. Size 1: 1 of 4. LRU size 1 is the same here; size 2: after c,
    /// window c, a: keep a (1 request soon) over b (0): a hits -> a, b warm + a = 3/4,
    /// where LRU (c b resident) gets 2/4.
    #[test]
    fn sch_keeps_what_the_next_tokens_request() {
        let s = seq(&[&[0], &[1], &[2], &[0]]);
        let sch = hit_curve(&s, 3, StackPolicy::FewestSoon { future: 2 });
        assert!(close(&sch, &[0.25, 0.75, 1.0]), "{sch:?}");
        assert!(close(
            &hit_curve(&s, 3, StackPolicy::Lru),
            &[0.25, 0.5, 1.0]
        ));
        // With a window of one token (only the current token's remaining ranks)
        // SCH falls back to recency ties: it is LRU.
        let sch1 = hit_curve(&s, 3, StackPolicy::FewestSoon { future: 1 });
        assert!(close(&sch1, &[0.25, 0.5, 1.0]));
    }

    #[test]
    fn sequences_are_averaged_not_pooled() {
        let a = seq(&[&[0], &[0]]); // size 1: 2/2
        let b = seq(&[&[0], &[1], &[2], &[0]]); // size 1: 1/4
        let mean = mean_hit_curve([&a, &b, &TokenExperts::new()], 3, StackPolicy::Lru);
        assert!((mean[0] - (1.0 + 0.25) / 2.0).abs() < 1e-12);
    }
}
