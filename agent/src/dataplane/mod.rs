//! The data plane: loads the eBPF object, attaches `farol_ingress` to the
//! node's interface, pins its maps, reads its counters, and undoes all of it
//! on a clean stop. This is the only module that touches BPF maps.

mod adoption;
mod bpffs;
mod counters;
pub mod lb;
pub mod maglev;
pub mod socket_relay;

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
    #[error("failed to pin the XDP link at {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to re-adopt the pinned XDP link at {path}")]
    AdoptLink {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
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

/// Loads (verifies) `farol_nat`, puts it in the `NAT_PROGRAMS` slot that
/// `farol_ingress` tail-calls, then loads `farol_ingress` and returns it.
/// A re-used pinned `NAT_PROGRAMS` gets the new `farol_nat` in place of the
/// old one.
pub fn load_balancer_programs(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    use farol_common::lb::{MAP_NAT_PROGRAMS, NAT_PROGRAM_SLOT, PROGRAM_NAT};
    let name = PROGRAM_NAT;
    let nat = load_xdp(ebpf, name)?
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|source| DataplaneError::ProgramLoad { name, source })?;
    let map_error = |source| DataplaneError::Map {
        name: MAP_NAT_PROGRAMS,
        source,
    };
    let map = ebpf
        .map_mut(MAP_NAT_PROGRAMS)
        .ok_or(DataplaneError::MissingMap {
            name: MAP_NAT_PROGRAMS,
        })?;
    aya::maps::ProgramArray::try_from(map)
        .map_err(map_error)?
        .set(NAT_PROGRAM_SLOT, &nat, 0)
        .map_err(map_error)?;
    load_xdp(ebpf, PROGRAM_INGRESS)
}

/// The running data plane of one node.
///
/// The program runs through a pinned bpf_link and the maps are pinned, so
/// they outlive the agent: a crash or an upgrade (`Dataplane::shutdown` with
/// [`OnExit::Keep`]) leaves every flow running, and the next `agent run`
/// re-adopts them (after checking the pinned maps match this build).
/// [`OnExit::Remove`] (SIGINT/SIGTERM) and `agent teardown` remove it all.
pub struct Dataplane {
    // Held so the program and map descriptors stay open while we run.
    _ebpf: Ebpf,
    iface: String,
    mode: AttachMode,
    adopted: bool,
    pins: bpffs::Pins,
    counters: std::sync::Arc<Counters>,
    load_balancer: std::sync::Arc<tokio::sync::Mutex<lb::LoadBalancerMaps>>,
}

/// What a stopping agent leaves in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// Detach the program and unpin everything.
    Remove,
    /// Leave program, link and maps pinned for the next agent (upgrades).
    Keep,
}

impl Dataplane {
    /// Loads (re-using compatible pinned maps), attaches to `iface` (or
    /// re-adopts the pinned link there) and pins everything under `pin_dir`.
    pub fn start(iface: &str, mode: XdpMode, pin_dir: &Path) -> Result<Dataplane, DataplaneError> {
        if interface_index(iface).is_none() {
            return Err(DataplaneError::NoSuchInterface {
                iface: iface.to_owned(),
            });
        }
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NotBuilt);
        }
        check_privileges()?;
        let mut pins = bpffs::Pins::prepare(pin_dir)?;
        let adopt = match adoption::check(&pins, EBPF_OBJECT) {
            adoption::Verdict::Fresh => false,
            adoption::Verdict::Adopt => true,
            adoption::Verdict::Mismatch(why) => {
                warn!(pin_dir = %pin_dir.display(), %why, "pinned data plane does not match this agent: starting fresh (established flows are reset)");
                pins.remove_all();
                false
            }
        };
        let mut loader = EbpfLoader::new();
        for name in PINNED_MAPS {
            loader.map_pin_path(name, pins.path_for(name));
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load { source })?;
        let counters = std::sync::Arc::new(Counters::take_from(&mut ebpf)?);
        let load_balancer = std::sync::Arc::new(tokio::sync::Mutex::new(
            lb::LoadBalancerMaps::take_from(&mut ebpf)?,
        ));
        let link_pin = pins.link_path();
        let program = load_balancer_programs(&mut ebpf)?;
        let adopted = adopt && link_pin.exists();
        let mode = if adopted {
            adoption::replace_program_in_link(program, &link_pin)?;
            let mode = adoption::attached_mode(iface).unwrap_or(AttachMode::Generic);
            info!(iface, mode = %mode, pin_dir = %pin_dir.display(), "re-adopted the running data plane: program replaced in its pinned link, maps and flows kept");
            mode
        } else {
            let (link, mode) = attach(program, iface, mode)?;
            adoption::pin_link(program, link, &link_pin)?;
            info!(iface, mode = %mode, pin_dir = %pin_dir.display(), "XDP program {PROGRAM_INGRESS} attached");
            mode
        };
        pins.commit();
        Ok(Dataplane {
            _ebpf: ebpf,
            iface: iface.to_owned(),
            mode,
            adopted,
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

    /// True when this agent took over a data plane left running.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn interface(&self) -> &str {
        &self.iface
    }

    /// The live counters, shared with the metrics exporter.
    pub fn counters(&self) -> std::sync::Arc<Counters> {
        self.counters.clone()
    }

    /// Stops the agent's side; what stays in the kernel depends on `on_exit`.
    pub fn shutdown(mut self, on_exit: OnExit) {
        match on_exit {
            OnExit::Remove => {
                // Removing the link pin, then closing our descriptors when
                // `self` drops, releases the last reference: detached.
                self.pins.remove_all();
                info!(iface = %self.iface, "XDP program detached");
            }
            OnExit::Keep => {
                info!(iface = %self.iface, pin_dir = %self.pins.dir().display(), "leaving the data plane running for the next agent");
            }
        }
    }
}

/// Removes what an agent left pinned under `pin_dir` (program link, maps):
/// `agent teardown`.
pub fn teardown(pin_dir: &Path) -> Result<Vec<PathBuf>, DataplaneError> {
    check_privileges()?;
    Ok(bpffs::remove_pins(pin_dir))
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
pub fn check_privileges() -> Result<(), DataplaneError> {
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
