//! The Maglev lookup table (Eisenbud et al., NSDI 2016, §3.4), weighted,
//! built in the agent and only indexed by the kernel; and the weighted
//! round-robin sequence that fills the same table for `roundrobin`.
//!
//! Every balancer builds the same table from the same config: backends are
//! ordered by a stable key and the permutations come from a fixed hash of
//! that key and a seed derived from the cluster and service names, so a
//! flow maps to the same backend on whichever node holds the VIP.

use farol_common::lb::NO_BACKEND;

/// One backend as the table builder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableBackend {
    /// The kernel's backend id written into the table.
    pub id: u32,
    /// Stable identity (e.g. "192.0.2.11:80"); decides the permutation.
    pub key: String,
    /// 0 takes no slot.
    pub weight: u32,
}

/// FNV-1a, 64 bit: stable across Rust versions and machines, unlike std's
/// `DefaultHasher`, whose algorithm is unspecified. Hand-written because it
/// is four lines; any change here changes every table, so it is pinned by a
/// test.
fn fnv1a(seed: &str, key: &str, salt: u8) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.bytes().chain([0xff, salt]).chain(key.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn sorted_active(backends: &[TableBackend]) -> Vec<&TableBackend> {
    let mut active: Vec<&TableBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    active.sort_by(|a, b| a.key.cmp(&b.key));
    active
}

/// A Maglev table of `size` slots (a prime). Each backend fills slots in
/// proportion to its weight; with no weighted backend every slot is
/// [`NO_BACKEND`].
pub fn maglev_table(backends: &[TableBackend], seed: &str, size: u32) -> Vec<u32> {
    let size_usize = size as usize;
    let mut table = vec![NO_BACKEND; size_usize];
    let active = sorted_active(backends);
    if active.is_empty() || size == 0 {
        return table;
    }
    let permutations: Vec<(u64, u64)> = active
        .iter()
        .map(|backend| {
            let offset = fnv1a(seed, &backend.key, 0) % u64::from(size);
            let skip = fnv1a(seed, &backend.key, 1) % u64::from(size.max(2) - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = u64::from(active.iter().map(|b| b.weight).max().unwrap_or(1));
    let mut next = vec![0u64; active.len()];
    let mut credit = vec![0u64; active.len()];
    let mut filled = 0usize;
    loop {
        for (i, backend) in active.iter().enumerate() {
            // A backend with the top weight takes a slot every round, the
            // others in proportion (credit carried between rounds).
            credit[i] += u64::from(backend.weight);
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let (offset, skip) = permutations[i];
            loop {
                let slot = ((offset + next[i] * skip) % u64::from(size)) as usize;
                next[i] += 1;
                if table[slot] == NO_BACKEND {
                    table[slot] = backend.id;
                    filled += 1;
                    break;
                }
            }
            if filled == size_usize {
                return table;
            }
        }
    }
}

/// Smooth weighted round robin (as nginx does it) written out over `size`
/// slots: the kernel steps a cursor through it, so consecutive new flows go
/// A, B, C, A, B, C... in weight proportion, without a lock.
pub fn round_robin_table(backends: &[TableBackend], size: u32) -> Vec<u32> {
    let active = sorted_active(backends);
    if active.is_empty() {
        return vec![NO_BACKEND; size as usize];
    }
    let total: i64 = active.iter().map(|b| i64::from(b.weight)).sum();
    let mut current = vec![0i64; active.len()];
    let mut cycle = Vec::new();
    // One full cycle has `total` picks; repeat it to fill the table.
    for _ in 0..total {
        let mut best = 0;
        for (i, backend) in active.iter().enumerate() {
            current[i] += i64::from(backend.weight);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(active[best].id);
    }
    cycle.iter().copied().cycle().take(size as usize).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// A small prime keeps property tests fast; the production size is
    /// checked separately.
    const SIZE: u32 = 65537;

    fn backends(weights: &[u32]) -> Vec<TableBackend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| TableBackend {
                id: i as u32,
                key: format!("192.0.2.{}:80", 10 + i),
                weight,
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut counts = HashMap::new();
        for &id in table {
            *counts.entry(id).or_default() += 1;
        }
        counts
    }

    #[test]
    fn hash_is_pinned_so_tables_match_across_versions() {
        // FNV-1a 64 of "lab/web" 0xff 0x00 "192.0.2.11:80", computed independently.
        assert_eq!(fnv1a("lab/web", "192.0.2.11:80", 0), 0x5c58_0f79_ee82_450e);
    }

    #[test]
    fn no_weighted_backend_means_no_backend_anywhere() {
        let table = maglev_table(&backends(&[0, 0]), "s", 251);
        assert!(table.iter().all(|&id| id == NO_BACKEND));
        assert!(maglev_table(&[], "s", 251)
            .iter()
            .all(|&id| id == NO_BACKEND));
    }

    #[test]
    fn drained_backend_takes_no_slot() {
        let table = maglev_table(&backends(&[100, 0, 100]), "s", SIZE);
        assert!(!table.contains(&1));
        assert!(!table.contains(&NO_BACKEND));
    }

    #[test]
    fn round_robin_alternates_in_weight_proportion() {
        let table = round_robin_table(&backends(&[1, 1, 1, 1]), 12);
        assert_eq!(&table[..8], &[0, 1, 2, 3, 0, 1, 2, 3]);
        let weighted = round_robin_table(&backends(&[2, 1]), 6);
        assert_eq!(shares(&weighted)[&0], 4);
        assert_eq!(shares(&weighted)[&1], 2);
        // Smooth: the heavy backend never takes three in a row here.
        assert_eq!(&weighted[..3], &[0, 1, 0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn table_has_no_holes_and_is_deterministic(weights in prop::collection::vec(1u32..=1000, 1..=8)) {
            let input = backends(&weights);
            let table = maglev_table(&input, "lab/web", SIZE);
            prop_assert!(!table.contains(&NO_BACKEND));
            let mut reversed = input.clone();
            reversed.reverse();
            prop_assert_eq!(&table, &maglev_table(&reversed, "lab/web", SIZE), "input order must not matter");
        }

        #[test]
        fn each_share_is_within_one_percent_of_its_weight_share(weights in prop::collection::vec(1u32..=1000, 1..=8)) {
            let table = maglev_table(&backends(&weights), "lab/web", SIZE);
            let counts = shares(&table);
            let total: u32 = weights.iter().sum();
            for (id, &weight) in weights.iter().enumerate() {
                let got = *counts.get(&(id as u32)).unwrap_or(&0) as f64 / f64::from(SIZE);
                let want = f64::from(weight) / f64::from(total);
                prop_assert!((got - want).abs() < 0.01, "backend {} got {:.4}, weight share {:.4}", id, got, want);
            }
        }

        #[test]
        fn removing_a_backend_moves_only_its_flows(n in 3usize..=10, removed in 0usize..10) {
            let removed = removed % n;
            let all = backends(&vec![100; n]);
            let before = maglev_table(&all, "lab/web", SIZE);
            let remaining: Vec<TableBackend> = all.iter().filter(|b| b.id != removed as u32).cloned().collect();
            let after = maglev_table(&remaining, "lab/web", SIZE);
            let disrupted = before
                .iter()
                .zip(&after)
                .filter(|(was, now)| **was != removed as u32 && was != now)
                .count();
            let share = disrupted as f64 / f64::from(SIZE);
            prop_assert!(share < 0.02, "{:.4} of the slots not on the removed backend moved", share);
            prop_assert!(!after.contains(&(removed as u32)));
        }
    }
}
