//! Taking over a data plane an earlier agent left running: check that its
//! pinned maps have the layout this build expects, then swap our program
//! into its pinned bpf_link (one atomic `bpf_link_update`: no packet meets
//! a detached interface).

use std::path::Path;

use aya::{
    maps::MapInfo,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp,
    },
};
use farol_common::maps::PINNED_MAPS;

use super::{bpffs::Pins, AttachMode, DataplaneError};

pub(super) enum Verdict {
    /// Nothing pinned: start from scratch.
    Fresh,
    /// Every pinned map matches this build: re-use maps and link.
    Adopt,
    /// Something is pinned but differs: start fresh, saying why.
    Mismatch(String),
}

/// Compares every pinned map with the object's definition (type size
/// fields and capacity); a missing map or an unreadable one is a mismatch.
pub(super) fn check(pins: &Pins, object: &[u8]) -> Verdict {
    let present: Vec<&str> = PINNED_MAPS
        .iter()
        .copied()
        .filter(|name| pins.path_for(name).exists())
        .collect();
    if present.is_empty() {
        return if pins.link_path().exists() {
            Verdict::Mismatch("a pinned link without its maps".into())
        } else {
            Verdict::Fresh
        };
    }
    let parsed = match aya_obj::Object::parse(object) {
        Ok(parsed) => parsed,
        Err(error) => {
            return Verdict::Mismatch(format!("cannot parse this build's object: {error}"))
        }
    };
    for name in PINNED_MAPS {
        let Some(wanted) = parsed.maps.get(*name) else {
            return Verdict::Mismatch(format!("this build has no map {name}"));
        };
        let info = match MapInfo::from_pin(pins.path_for(name)) {
            Ok(info) => info,
            Err(error) => return Verdict::Mismatch(format!("map {name}: {error}")),
        };
        let (have, want) = (
            (info.key_size(), info.value_size(), info.max_entries()),
            (wanted.key_size(), wanted.value_size(), wanted.max_entries()),
        );
        if have != want {
            return Verdict::Mismatch(format!(
                "map {name} has (key, value, entries) {have:?}, this build wants {want:?}"
            ));
        }
    }
    Verdict::Adopt
}

/// Puts `program` into the link pinned at `path` in place of whatever runs
/// there now.
pub(super) fn replace_program_in_link(
    program: &mut Xdp,
    path: &Path,
) -> Result<XdpLinkId, DataplaneError> {
    let error = |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::AdoptLink {
        path: path.to_owned(),
        source,
    };
    let pinned = PinnedLink::from_pin(path).map_err(|e| error(Box::new(e)))?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| error(Box::new(e)))?;
    program.attach_to_link(link).map_err(|e| error(Box::new(e)))
}

/// Pins the link of a fresh attachment so it outlives this process.
pub(super) fn pin_link(
    program: &mut Xdp,
    link: XdpLinkId,
    path: &Path,
) -> Result<(), DataplaneError> {
    let error = |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::PinLink {
        path: path.to_owned(),
        source,
    };
    let link = program.take_link(link).map_err(|e| error(Box::new(e)))?;
    let fd_link = FdLink::try_from(link).map_err(|e| error(Box::new(e)))?;
    // The pin holds the link; our descriptor closes when `_pinned` drops.
    let _pinned = fd_link.pin(path).map_err(|e| error(Box::new(e)))?;
    Ok(())
}

/// The mode the kernel reports for the XDP program on `iface`
/// (`ip -j -d link`: 1 driver, 2 generic).
pub(super) fn attached_mode(iface: &str) -> Option<AttachMode> {
    let out = std::process::Command::new("ip")
        .args(["-j", "link", "show", "dev", iface])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mode = text.split("\"mode\":").nth(1)?.chars().next()?;
    match mode {
        '1' => Some(AttachMode::Native),
        '2' => Some(AttachMode::Generic),
        _ => None,
    }
}
