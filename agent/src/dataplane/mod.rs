//! The data plane: loads the eBPF object, attaches `farol_ingress` to the
//! node's interface, pins its maps, reads its counters, and undoes all of it
//! on a clean stop. This is the only module that touches BPF maps.

mod bpffs;
mod counters;
pub mod lb;
pub mod maglev;

use std::path::{Path, PathBuf};

use aya::{
    programs::{xdp::XdpLinkId, Xdp, XdpMode as AyaXdpMode},
    Ebpf, EbpfLoader,
};
use farol_common::maps::{PINNED_MAPS, PROGRAM_INGRESS};
use tracing::{info, warn};

pub use counters::{CounterSnapshot, Counters};

use crate::config::XdpMode;

/// The eBPF object, embedded at build time by `build.rs` (empty when
/// `cargo xtask build-ebpf` had not run).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/farol.bpf.o"));

/// The bare XDP_PASS program in the same object, the benchmark's baseline;
/// never attached.
pub const PROGRAM_BASELINE: &str = "farol_baseline";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("this agent was built without its eBPF object: run `cargo xtask build-ebpf` (it runs `cargo xtask setup` when the toolchain is missing), then rebuild the agent")]
    NotBuilt,
    #[error("loading BPF programs needs root, or the capabilities CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN; this process has {have}")]
    NotPermitted { have: String },
    #[error("the kernel refused the eBPF object")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error("the eBPF object has no program {name:?}")]
    MissingProgram { name: &'static str },
    #[error("the eBPF object has no map {name:?}")]
    MissingMap { name: &'static str },
    #[error("program {name:?} is not an XDP program")]
    WrongProgramType {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the kernel refused to load program {name:?}")]
    ProgramLoad {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("interface {iface:?} does not exist in this network namespace")]
    NoSuchInterface { iface: String },
    #[error("failed to attach XDP program to {iface} in {mode} mode")]
    Attach {
        iface: String,
        mode: AttachMode,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("bpffs: {0}")]
    BpfFs(#[from] bpffs::BpfFsError),
    #[error("failed to pin map {name} at {path}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("failed to open map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The mode the program actually runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Generic,
}

impl AttachMode {
    pub fn label(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }

    fn aya(self) -> AyaXdpMode {
        match self {
            AttachMode::Native => AyaXdpMode::Driver,
            AttachMode::Generic => AyaXdpMode::Skb,
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Loads the embedded object into the kernel's reach (maps created, no
/// program loaded or attached). Tests and benchmarks use this directly.
pub fn load_object() -> Result<Ebpf, DataplaneError> {
    if EBPF_OBJECT.is_empty() {
        return Err(DataplaneError::NotBuilt);
    }
    check_privileges()?;
    EbpfLoader::new()
        .load(EBPF_OBJECT)
        .map_err(|source| DataplaneError::Load { source })
}

/// Loads (verifies) an XDP program of `ebpf` and returns it.
pub fn load_xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DataplaneError::WrongProgramType { name, source })?;
    program
        .load()
        .map_err(|source| DataplaneError::ProgramLoad { name, source })?;
    Ok(program)
}

/// The running data plane of one node. Dropping it detaches the program;
/// [`Dataplane::shutdown`] also unpins the maps.
pub struct Dataplane {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    iface: String,
    mode: AttachMode,
    pins: bpffs::Pins,
    counters: std::sync::Arc<Counters>,
    load_balancer: std::sync::Arc<tokio::sync::Mutex<lb::LoadBalancerMaps>>,
}

impl Dataplane {
    /// Loads, attaches to `iface` and pins maps under `pin_dir`.
    pub fn start(iface: &str, mode: XdpMode, pin_dir: &Path) -> Result<Dataplane, DataplaneError> {
        if interface_index(iface).is_none() {
            return Err(DataplaneError::NoSuchInterface {
                iface: iface.to_owned(),
            });
        }
        let mut ebpf = load_object()?;
        let mut pins = bpffs::Pins::prepare(pin_dir)?;
        for name in PINNED_MAPS {
            let map = ebpf.map(name).ok_or(DataplaneError::MissingMap { name })?;
            let path = pins.path_for(name);
            map.pin(&path).map_err(|source| DataplaneError::Pin {
                name,
                path: path.clone(),
                source,
            })?;
            pins.record(path);
        }
        let counters = std::sync::Arc::new(Counters::take_from(&mut ebpf)?);
        let load_balancer = std::sync::Arc::new(tokio::sync::Mutex::new(
            lb::LoadBalancerMaps::take_from(&mut ebpf)?,
        ));
        let program = load_xdp(&mut ebpf, PROGRAM_INGRESS)?;
        let (link, mode) = attach(program, iface, mode)?;
        info!(iface, mode = %mode, pin_dir = %pin_dir.display(), "XDP program {PROGRAM_INGRESS} attached");
        Ok(Dataplane {
            ebpf,
            link: Some(link),
            iface: iface.to_owned(),
            mode,
            pins,
            counters,
            load_balancer,
        })
    }

    /// The load balancer's maps, shared with the balancer task and metrics.
    pub fn load_balancer(&self) -> std::sync::Arc<tokio::sync::Mutex<lb::LoadBalancerMaps>> {
        self.load_balancer.clone()
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    pub fn interface(&self) -> &str {
        &self.iface
    }

    /// The live counters, shared with the metrics exporter.
    pub fn counters(&self) -> std::sync::Arc<Counters> {
        self.counters.clone()
    }

    /// Detaches the program and removes the pinned maps.
    pub fn shutdown(mut self) {
        self.detach();
        self.pins.remove_all();
    }

    fn detach(&mut self) {
        let Some(link) = self.link.take() else { return };
        let detached = self
            .ebpf
            .program_mut(PROGRAM_INGRESS)
            .and_then(|program| <&mut Xdp>::try_from(program).ok())
            .map(|program| program.detach(link));
        match detached {
            Some(Ok(())) => info!(iface = %self.iface, "XDP program detached"),
            Some(Err(error)) => {
                warn!(iface = %self.iface, %error, "XDP detach failed; the program goes when the agent exits")
            }
            None => {
                warn!(iface = %self.iface, "XDP program not found at detach; it goes when the agent exits")
            }
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach();
    }
}

fn attach(
    program: &mut Xdp,
    iface: &str,
    mode: XdpMode,
) -> Result<(XdpLinkId, AttachMode), DataplaneError> {
    let try_mode = |program: &mut Xdp, mode: AttachMode| {
        program
            .attach(iface, mode.aya())
            .map(|link| (link, mode))
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_owned(),
                mode,
                source,
            })
    };
    match mode {
        XdpMode::Native => try_mode(program, AttachMode::Native),
        XdpMode::Generic => try_mode(program, AttachMode::Generic),
        XdpMode::Auto => try_mode(program, AttachMode::Native).or_else(|error| {
            warn!(iface, error = %crate::error_chain(&error), "native XDP unavailable, falling back to generic mode (slower)");
            try_mode(program, AttachMode::Generic)
        }),
    }
}

fn interface_index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: name is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Checks the effective capabilities rather than the uid, so the systemd
/// unit can run the agent with only what it needs.
fn check_privileges() -> Result<(), DataplaneError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        return Ok(());
    }
    let mut held = Vec::new();
    for (cap, name) in [
        (CAP_BPF, "CAP_BPF"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ] {
        if has(cap) {
            held.push(name);
        }
    }
    let have = if held.is_empty() {
        format!("none of them (uid {})", effective_uid())
    } else {
        format!("only {}", held.join(", "))
    };
    Err(DataplaneError::NotPermitted { have })
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
