//! Full-scan heal (`agent volume heal --full`): for bricks changed behind
//! the agent's back. Every reachable replica lists its brick with digests;
//! for each path where they differ, the split-brain policy picks the copy
//! that wins (latest modification, or the configured source), and the
//! winner records the path as missed by every replica that differs, so the
//! ordinary background heal copies it over.

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::{
    brick::ManifestEntry,
    protocol::{Request, Response},
    replica::Volume,
};
use crate::config::storage::SplitBrainPolicy;

/// Scans and marks; returns how many (path, replica) pairs were marked.
pub(super) fn run(volume: &Volume) -> u64 {
    let mut manifests: BTreeMap<String, Vec<ManifestEntry>> = BTreeMap::new();
    match volume.brick().manifest() {
        Ok(manifest) => {
            manifests.insert(volume.node().to_owned(), manifest);
        }
        Err(error) => {
            warn!(volume = %volume.name(), %error, "full heal: cannot list the local brick");
            return 0;
        }
    }
    for (index, peer) in volume.peers().iter().enumerate() {
        match volume.call_peer(index, Request::Manifest) {
            Some(Response::Manifest(manifest)) => {
                manifests.insert(peer.name.clone(), manifest);
            }
            other => {
                warn!(volume = %volume.name(), peer = %peer.name, answer = ?other, "full heal: peer not scanned (down?)");
            }
        }
    }
    let mut table: BTreeMap<&str, BTreeMap<&str, &ManifestEntry>> = BTreeMap::new();
    for (node, manifest) in &manifests {
        for entry in manifest {
            table
                .entry(entry.path.as_str())
                .or_default()
                .insert(node.as_str(), entry);
        }
    }
    let source = match volume.policy() {
        SplitBrainPolicy::Source => volume
            .source()
            .filter(|source| manifests.contains_key(*source)),
        SplitBrainPolicy::LatestMtime => None,
    };
    let mut marked = 0u64;
    for (path, copies) in &table {
        let winner: &str = match source {
            Some(source) => source,
            None => {
                // Latest mtime; ties go to the lower node name (the map is
                // sorted, and max_by keeps the last maximum, so compare
                // names reversed).
                let Some((node, _)) = copies.iter().max_by(|(an, a), (bn, b)| {
                    a.mtime_ns.cmp(&b.mtime_ns).then_with(|| bn.cmp(an))
                }) else {
                    continue;
                };
                node
            }
        };
        let best = copies.get(winner);
        for node in manifests.keys() {
            if node == winner {
                continue;
            }
            let differs = match (best, copies.get(node.as_str())) {
                (Some(best), Some(theirs)) => !best.same_content(theirs),
                (None, None) => false,
                _ => true,
            };
            if !differs {
                continue;
            }
            marked += 1;
            if winner == volume.node() {
                volume.log().record(node, path);
            } else if let Some(index) = volume.peer_index(winner) {
                let answer = volume.call_peer(
                    index,
                    Request::MarkPending {
                        path: (*path).to_owned(),
                        peer: node.clone(),
                    },
                );
                if answer != Some(Response::Ok) {
                    warn!(volume = %volume.name(), path, winner, "full heal: cannot mark a path on its source");
                }
            }
        }
    }
    info!(volume = %volume.name(), scanned = manifests.len(), paths = table.len(), marked, "full heal scan done");
    marked
}
