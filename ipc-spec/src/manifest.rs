//! The stack manifest: which domains dom0 builds and which channels join them.
//!
//! `xtask` reads a TOML file (`stacks/*.toml`), checks it with [`validate`] and packs it with
//! [`encode`] into the boot bundle as the entry named [`MANIFEST_ENTRY`]. dom0 reads that
//! entry with [`decode`], checks it again with [`validate`] against the images the bundle
//! really holds, and builds the stack with hypercalls. The microvisor never reads it.
//!
//! The encoding is postcard (varint integers, length-prefixed strings and lists) of
//! [`Manifest`], whose first field is [`Manifest::version`]: [`decode`] reads the version
//! alone first, so a manifest of another version is reported as such rather than as garbage.
//!
//! dom0 itself is not listed: it is the builder, and the name `dom0` is reserved.
//!
//! Needs the `alloc` feature (the types own their strings and lists).

use alloc::borrow::ToOwned;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

/// The only manifest version this module reads and writes.
pub const MANIFEST_VERSION: u32 = 6;
/// Name of the manifest inside the boot bundle.
pub const MANIFEST_ENTRY: &str = "manifest";
/// Name no domain or channel may have: dom0 builds the stack and is not listed in it.
pub const RESERVED_NAME: &str = crate::DOM0_IMAGE;
/// Longest domain or channel name, in bytes (names are ASCII `[a-z0-9_-]`).
pub const MAX_NAME_LEN: usize = 31;
/// Longest command line handed to a domain, in bytes.
pub const MAX_ARGS_LEN: usize = 200;
/// Smallest RAM a domain may have, in MiB.
pub const MIN_DOMAIN_MEMORY_MIB: u32 = 1;
/// Largest RAM a domain may have, in MiB.
pub const MAX_DOMAIN_MEMORY_MIB: u32 = 1024;
/// Machine memory kept for the microvisor and dom0, in MiB: the domains get the rest.
pub const RESERVED_MEMORY_MIB: u32 = 64;
/// Lowest priority a domain may have (0 is the idle loop's).
pub const MIN_PRIORITY: u8 = 1;
/// Highest priority a domain may have (255 is for the microvisor's own use).
pub const MAX_PRIORITY: u8 = 254;
/// vCPUs per domain supported today.
pub const SUPPORTED_VCPUS: u8 = 1;
/// Longest kernel command line of a Linux VM, in bytes (it goes into the start info page
/// with the memory map).
pub const MAX_CMDLINE_LEN: usize = 1024;

/// The whole stack, as dom0 builds it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Always [`MANIFEST_VERSION`] for manifests written by this build.
    pub version: u32,
    /// RAM of the machine the stack is meant for, in MiB.
    pub machine_memory_mib: u32,
    /// The domains dom0 builds, in order (dom0 itself is not listed).
    pub domains: Vec<DomainSpec>,
    /// The channels between them; a channel's index is its badge.
    pub channels: Vec<ChannelSpec>,
    /// The device dom0 itself drives for the host control interface (`ipc_spec::ctl`):
    /// [`CONTROL_DEVICE`], or empty for none. The machine section's `control` key.
    pub control: String,
}

/// The only device kind dom0 drives itself, as its host control interface: a virtio
/// console (QEMU `virtio-serial-pci` with a `virtconsole` port on a unix socket).
pub const CONTROL_DEVICE: &str = "virtio-console";

/// One domain.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// Unique among the domains: ASCII `[a-z0-9_-]`, 1 to [`MAX_NAME_LEN`] bytes, not `dom0`.
    pub name: String,
    /// Name of the boot bundle entry holding the domain's PVH ELF.
    pub image: String,
    /// RAM, in MiB ([`MIN_DOMAIN_MEMORY_MIB`]..=[`MAX_DOMAIN_MEMORY_MIB`]).
    pub memory_mib: u32,
    /// Scheduling priority ([`MIN_PRIORITY`]..=[`MAX_PRIORITY`]); higher runs first.
    pub priority: u8,
    /// Number of vCPUs (only [`SUPPORTED_VCPUS`] for now).
    pub vcpus: u8,
    /// Command line handed to the domain (at most [`MAX_ARGS_LEN`] bytes).
    pub args: String,
    /// The PCI device dom0 assigns to this domain (one of [`DEVICE_KINDS`]); empty: none.
    pub device: String,
    /// Whether dom0 gives the domain a status capability: a call right on dom0's endpoint
    /// that answers with every domain's name, state and IPC and notification counts.
    pub status: bool,
    /// Empty: an ordinary domain. Else the domain is a VM (`ipc_spec::exit`) and this names
    /// its VMM: another domain of the manifest, not a VM itself, serving this VM alone.
    /// dom0 gives the VMM the VM's domain capability (right VMM), its vCPU capability and
    /// the receive right of the VM's exit endpoint (`vm=`, `vcpu=`, `exits=` on the VMM's
    /// command line), and destroys the VM when the VMM goes.
    pub vmm: String,
    /// Whether the domain is a hypercall fuzzer: dom0 builds it after every other domain,
    /// gives it a copy of the memory capability (`mem=<slot>` on its command line) and its
    /// priority (`prio=<p>`), records the machine's free frames and kernel objects
    /// (`MachineStatus`) before, and once it exits destroys it and checks that all came
    /// back. It may have no channel, device or status capability.
    pub fuzz: bool,
    /// A VM booting an operating system kernel (a PVH ELF, e.g. Linux's `vmlinux`): the
    /// bundle entry holding it. Empty: the domain runs `image`. Its VMM loads it (dom0 hands
    /// the file over read-only); a VM with a kernel has no `image`.
    pub kernel: String,
    /// The bundle entry holding the kernel's initial RAM disk (empty: none).
    pub initramfs: String,
    /// The kernel's command line (at most [`MAX_CMDLINE_LEN`] bytes).
    pub cmdline: String,
    /// The domain (a VMM) receives what is typed on the machine's console: dom0 gives it
    /// the machine capability with the READ right only (`console=` on its command line).
    /// At most one domain has it.
    pub console_input: bool,
    /// What dom0 does when the domain faults or exits.
    pub restart: RestartPolicy,
}

/// Whether dom0 replaces a domain that faulted or exited.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Restart {
    /// Report it and destroy it (the default).
    #[default]
    Never,
    /// Destroy it and build a new one from the same image, with the same device and
    /// channels (the peers' shared regions stay where they are), up to a limit.
    Always,
}

impl Restart {
    /// The manifest spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Restart::Never => "never",
            Restart::Always => "always",
        }
    }
}

/// A domain's restart policy: `restart = "always" | "never"` with at most `limit` restarts
/// in any `window_ms`, each after `backoff_ms` (doubled for each restart already in the
/// window). Past the limit the domain stays dead and its peers get errors.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub mode: Restart,
    /// Restarts allowed within `window_ms` ([`MIN_RESTART_LIMIT`]..=[`MAX_RESTART_LIMIT`]).
    pub limit: u32,
    /// The window, in ms ([`MIN_RESTART_WINDOW_MS`]..=[`MAX_RESTART_WINDOW_MS`]).
    pub window_ms: u32,
    /// Wait before the first restart in a window, in ms (at most [`MAX_RESTART_BACKOFF_MS`]).
    pub backoff_ms: u32,
    /// Hang watchdog period in ms (0: none; else [`MIN_WATCHDOG_MS`]..=[`MAX_WATCHDOG_MS`]):
    /// dom0 gives the domain a heartbeat notification (`heartbeat=<slot>
    /// heartbeat_ms=<period>` on its command line) and treats it as crashed when a whole
    /// period passes without a beat once it has beaten (so a hang is noticed within two
    /// periods). Also for a domain that is never restarted: it is then destroyed.
    pub watchdog_ms: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            mode: Restart::Never,
            limit: DEFAULT_RESTART_LIMIT,
            window_ms: DEFAULT_RESTART_WINDOW_MS,
            backoff_ms: DEFAULT_RESTART_BACKOFF_MS,
            watchdog_ms: 0,
        }
    }
}

/// Restart limit: default and bounds.
pub const DEFAULT_RESTART_LIMIT: u32 = 10;
pub const MIN_RESTART_LIMIT: u32 = 1;
pub const MAX_RESTART_LIMIT: u32 = 1000;
/// Restart window in ms: default and bounds.
pub const DEFAULT_RESTART_WINDOW_MS: u32 = 10_000;
pub const MIN_RESTART_WINDOW_MS: u32 = 1;
pub const MAX_RESTART_WINDOW_MS: u32 = 3_600_000;
/// Restart backoff in ms: default and bound.
pub const DEFAULT_RESTART_BACKOFF_MS: u32 = 0;
pub const MAX_RESTART_BACKOFF_MS: u32 = 60_000;
/// Hang watchdog period in ms: bounds (a period shorter than a few scheduler slices would
/// call a busy domain hung; a longer one than a minute is no watchdog).
pub const MIN_WATCHDOG_MS: u32 = 10;
pub const MAX_WATCHDOG_MS: u32 = 60_000;

/// Device kinds with a driver: the driver VMs' and dom0's control device.
pub fn device_kind(name: &str) -> Option<(u16, u16)> {
    DEVICE_KINDS.iter().chain(CONTROL_DEVICE_KIND.iter()).find(|(n, _, _)| *n == name).map(|&(_, v, d)| (v, d))
}

/// [`CONTROL_DEVICE`]'s PCI ids: a modern (non-transitional) virtio console.
pub const CONTROL_DEVICE_KIND: &[(&str, u16, u16)] = &[(CONTROL_DEVICE, 0x1af4, 0x1043)];

/// Devices a domain may own, by manifest name: (name, PCI vendor id, PCI device id).
pub const DEVICE_KINDS: &[(&str, u16, u16)] = &[("virtio-blk", 0x1af4, 0x1042), ("virtio-net", 0x1af4, 0x1041)];

/// Shared-region size of a block or net channel, in KiB: default and bounds.
pub const DEFAULT_BLOCK_REGION_KIB: u32 = 1024;
pub const MIN_BLOCK_REGION_KIB: u32 = 64;
pub const MAX_BLOCK_REGION_KIB: u32 = 65536;

/// One channel between two domains.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChannelSpec {
    /// Unique among the channels, same rules as a domain name.
    pub name: String,
    /// What kind of channel.
    pub kind: ChannelKind,
    /// The domain that calls.
    pub client: String,
    /// The domain that serves.
    pub server: String,
    /// For a block or net channel: the shared region's size in KiB (else 0).
    pub size_kib: u32,
}

/// Kinds of channel.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// Synchronous call/reply over an endpoint: the server gets the receive right, the client
    /// a call right badged with the channel's index in [`Manifest::channels`] plus one.
    Endpoint,
    /// Doorbells both ways: two notifications; each side may signal the other's and wait on
    /// its own.
    Notification,
    /// A block device channel: a shared region (rings and data buffers, layout in
    /// `crate::block`) mapped into both domains, plus a doorbell each way.
    Block,
    /// A network channel: a shared region (frame rings and buffers, layout in `crate::net`)
    /// mapped into both domains, plus a doorbell each way; the server is a net driver VM.
    Net,
}

impl ChannelKind {
    /// The name used in manifest files.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Endpoint => "endpoint",
            ChannelKind::Notification => "notification",
            ChannelKind::Block => "block",
            ChannelKind::Net => "net",
        }
    }

    /// Whether the channel has a shared region (block and net channels).
    pub fn has_region(self) -> bool {
        matches!(self, ChannelKind::Block | ChannelKind::Net)
    }
}

impl Manifest {
    /// The domain called `name`, if any.
    pub fn domain(&self, name: &str) -> Option<&DomainSpec> {
        self.domains.iter().find(|d| d.name == name)
    }

    /// Index of the domain called `name` in [`Manifest::domains`], if any.
    pub fn domain_index(&self, name: &str) -> Option<usize> {
        self.domains.iter().position(|d| d.name == name)
    }

    /// Sum of the domains' RAM in MiB (without the [`RESERVED_MEMORY_MIB`] reserve).
    pub fn total_memory_mib(&self) -> u64 {
        self.domains.iter().map(|d| u64::from(d.memory_mib)).sum()
    }
}

/// Why a manifest could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// postcard refused to encode (does not happen for a [`Manifest`] written to memory).
    Encode(String),
    /// The bytes do not start with a version number.
    MissingVersion,
    /// The manifest has a version this build does not read.
    UnsupportedVersion {
        /// The version in the bytes.
        found: u32,
    },
    /// The bytes are not a valid version-[`MANIFEST_VERSION`] manifest (postcard's reason).
    Malformed(String),
    /// A complete manifest is followed by bytes that belong to none of it.
    TrailingBytes {
        /// How many bytes are left over.
        count: usize,
    },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::Encode(reason) => write!(f, "cannot encode the manifest: {reason}"),
            ManifestError::MissingVersion => {
                write!(f, "manifest is empty or does not start with a version number")
            }
            ManifestError::UnsupportedVersion { found } => {
                write!(f, "manifest version {found} is not supported (this build reads version {MANIFEST_VERSION})")
            }
            ManifestError::Malformed(reason) => write!(f, "malformed manifest: {reason}"),
            ManifestError::TrailingBytes { count } => {
                write!(f, "malformed manifest: {count} byte(s) after its end")
            }
        }
    }
}

/// Encodes `manifest` with postcard, as packed into the boot bundle.
pub fn encode(manifest: &Manifest) -> Result<Vec<u8>, ManifestError> {
    postcard::to_allocvec(manifest).map_err(|e| ManifestError::Encode(e.to_string()))
}

/// Decodes a manifest written by [`encode`]. Never panics; allocates at most in proportion
/// to `bytes.len()`. Does not [`validate`] it.
pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    let (version, _) = postcard::take_from_bytes::<u32>(bytes).map_err(|_| ManifestError::MissingVersion)?;
    if version != MANIFEST_VERSION {
        return Err(ManifestError::UnsupportedVersion { found: version });
    }
    let (manifest, rest) =
        postcard::take_from_bytes::<Manifest>(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ManifestError::TrailingBytes { count: rest.len() });
    }
    Ok(manifest)
}

/// Which field of a [`Manifest`] a [`Problem`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// [`Manifest::version`].
    Version,
    /// [`Manifest::machine_memory_mib`].
    MachineMemoryMib,
    /// [`Manifest::domains`] as a whole.
    Domains,
    /// [`Manifest::control`].
    Control,
    /// A field of `domains[index]`; `key` is the field's name (`name`, `image`, `memory_mib`,
    /// `priority`, `vcpus`, `args`).
    Domain {
        /// Index in [`Manifest::domains`].
        index: usize,
        /// The field's name.
        key: &'static str,
    },
    /// A field of `channels[index]`; `key` is `name`, `kind`, `client` or `server`.
    Channel {
        /// Index in [`Manifest::channels`].
        index: usize,
        /// The field's name.
        key: &'static str,
    },
}

/// Shows the field path in [`Manifest`] terms: `version`, `machine_memory_mib`, `domains`,
/// `domains[2].image`, `channels[0].server`.
impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Version => f.write_str("version"),
            Field::MachineMemoryMib => f.write_str("machine_memory_mib"),
            Field::Domains => f.write_str("domains"),
            Field::Control => f.write_str("control"),
            Field::Domain { index, key } => write!(f, "domains[{index}].{key}"),
            Field::Channel { index, key } => write!(f, "channels[{index}].{key}"),
        }
    }
}

/// What is wrong with a field.
///
/// Numbers are held wider than the fields they come from, so a tool reading a manifest file
/// can report a value that does not even fit the field (a negative memory size, priority 300)
/// with the same words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// The manifest's version is not [`MANIFEST_VERSION`].
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The manifest lists no domain.
    NoDomains,
    /// A name is empty.
    EmptyName,
    /// A name is longer than [`MAX_NAME_LEN`] bytes.
    NameTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A name has a character outside `[a-z0-9_-]`.
    NameBadChar {
        /// The first such character.
        ch: char,
    },
    /// A name is [`RESERVED_NAME`].
    ReservedName,
    /// Another domain (or channel) before this one has the same name.
    DuplicateName {
        /// The name.
        name: String,
        /// Index of the first domain (or channel) with that name.
        first: usize,
    },
    /// An image is not among the known images.
    UnknownImage {
        /// The image named.
        image: String,
        /// The images that are known.
        known: Vec<String>,
    },
    /// An image names a bundle entry that is not a domain image (`dom0` or `manifest`).
    ReservedImage {
        /// The image named.
        image: String,
    },
    /// A domain's memory is outside [`MIN_DOMAIN_MEMORY_MIB`]..=[`MAX_DOMAIN_MEMORY_MIB`].
    MemoryOutOfRange {
        /// The size asked for, in MiB.
        mib: i64,
    },
    /// A domain asks for a number of vCPUs other than [`SUPPORTED_VCPUS`].
    UnsupportedVcpus {
        /// The number asked for.
        vcpus: i64,
    },
    /// A priority is outside [`MIN_PRIORITY`]..=[`MAX_PRIORITY`].
    PriorityOutOfRange {
        /// The priority asked for.
        priority: i64,
    },
    /// A domain's command line is longer than [`MAX_ARGS_LEN`] bytes.
    ArgsTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A channel end names no domain of the manifest.
    UnknownDomain {
        /// The name.
        name: String,
    },
    /// A channel's client and server are the same domain.
    SameDomainBothEnds {
        /// The domain.
        name: String,
    },
    /// A VM names itself as its VMM.
    OwnVmm,
    /// A VM's VMM is a VM itself.
    VmmIsVm { vmm: String },
    /// Two VMs name the same VMM (a VMM serves one VM).
    VmmTaken { vmm: String, first: usize },
    /// A domain has neither an image nor a kernel.
    MissingImage,
    /// A VM with a kernel also names an image.
    ImageAndKernel,
    /// A kernel, initramfs or kernel command line on a domain that is not a VM.
    KernelWithoutVmm,
    /// An initramfs or kernel command line without a kernel.
    NeedsKernel,
    /// A kernel command line longer than [`MAX_CMDLINE_LEN`] bytes.
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// Console input given to a second domain.
    ConsoleInputTaken {
        /// Index of the first domain with it.
        first: usize,
    },
    /// A domain's device is not one of [`DEVICE_KINDS`].
    UnknownDevice {
        /// The name given.
        device: String,
    },
    /// A block or net channel's region size is out of range or not a multiple of 4 KiB.
    BadRegionSize {
        /// The size asked for, in KiB.
        kib: u32,
    },
    /// A fuzz domain (`fuzz = true`) is also given something else: a channel end, a
    /// device, the status capability.
    FuzzerWithExtras {
        /// What it is given (`a device`, `the status capability`, `channel "x"`).
        what: String,
    },
    /// A restart setting is out of range (`restart_limit`, `restart_window_ms`,
    /// `restart_backoff_ms`), or a restart policy is given to a domain that cannot have one.
    BadRestart {
        /// What is wrong.
        what: String,
    },
    /// The domains' memory plus the reserve is more than the machine has.
    MemoryDoesNotFit {
        /// Sum of the domains' memory, in MiB.
        domains_mib: u64,
        /// Memory of the machine, in MiB.
        machine_mib: u64,
    },
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProblemKind::UnsupportedVersion { found } => write!(
                f,
                "manifest version {found} is not supported (this build reads version {MANIFEST_VERSION})"
            ),
            ProblemKind::NoDomains => write!(f, "at least one domain is required"),
            ProblemKind::EmptyName => write!(f, "the name is empty"),
            ProblemKind::NameTooLong { len } => write!(
                f,
                "the name is {len} bytes long; at most {MAX_NAME_LEN} are allowed"
            ),
            ProblemKind::NameBadChar { ch } => write!(
                f,
                "the name contains {ch:?}; only a-z, 0-9, '_' and '-' are allowed"
            ),
            ProblemKind::ReservedName => write!(
                f,
                "the name \"{RESERVED_NAME}\" is reserved: dom0 builds the stack and is not listed in the manifest"
            ),
            ProblemKind::DuplicateName { name, first } => write!(
                f,
                "duplicate name {name:?} (already used at index {first})"
            ),
            ProblemKind::UnknownImage { image, known } => {
                write!(f, "unknown image {image:?} (known images: ")?;
                if known.is_empty() {
                    f.write_str("none")?;
                }
                for (i, k) in known.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(k)?;
                }
                f.write_str(")")
            }
            ProblemKind::ReservedImage { image } => write!(
                f,
                "image {image:?} is not a domain image (the bundle entries \"{}\" and \"{MANIFEST_ENTRY}\" are reserved)",
                crate::DOM0_IMAGE
            ),
            ProblemKind::MemoryOutOfRange { mib } => write!(
                f,
                "{mib} MiB is out of range: a domain has between {MIN_DOMAIN_MEMORY_MIB} and {MAX_DOMAIN_MEMORY_MIB} MiB"
            ),
            ProblemKind::UnsupportedVcpus { vcpus } => write!(
                f,
                "{vcpus} vCPUs asked for: only {SUPPORTED_VCPUS} vCPU per domain is supported yet"
            ),
            ProblemKind::PriorityOutOfRange { priority } => {
                write!(
                    f,
                    "priority {priority} is out of range {MIN_PRIORITY}..={MAX_PRIORITY}"
                )?;
                f.write_str(match priority {
                    0 => " (0 is reserved for the idle loop)",
                    255 => " (255 is reserved for the microvisor's own use)",
                    _ => " (0 is reserved for the idle loop, 255 for the microvisor's own use)",
                })
            }
            ProblemKind::ArgsTooLong { len } => write!(
                f,
                "the command line is {len} bytes long; at most {MAX_ARGS_LEN} are allowed"
            ),
            ProblemKind::UnknownDomain { name } => {
                write!(f, "no domain named {name:?}")?;
                if name == RESERVED_NAME {
                    f.write_str(" (dom0 is the builder and cannot be a channel end)")?;
                }
                Ok(())
            }
            ProblemKind::SameDomainBothEnds { name } => write!(
                f,
                "client and server are both {name:?}; a channel joins two different domains"
            ),
            ProblemKind::OwnVmm => write!(f, "a VM cannot be its own VMM"),
            ProblemKind::VmmIsVm { vmm } => write!(f, "the VMM {vmm:?} is a VM itself"),
            ProblemKind::VmmTaken { vmm, first } => {
                write!(f, "{vmm:?} is already the VMM of domains[{first}]: a VMM serves one VM")
            }
            ProblemKind::MissingImage => f.write_str("a domain needs an image (or, as a VM, a kernel)"),
            ProblemKind::ImageAndKernel => {
                f.write_str("a VM with a kernel has no image: its VMM loads the kernel")
            }
            ProblemKind::KernelWithoutVmm => {
                f.write_str("only a VM boots a kernel: name its VMM with `vmm`")
            }
            ProblemKind::NeedsKernel => f.write_str("only a VM with a kernel has an initramfs or a kernel command line"),
            ProblemKind::CmdlineTooLong { len } => write!(
                f,
                "the kernel command line is {len} bytes long; at most {MAX_CMDLINE_LEN} are allowed"
            ),
            ProblemKind::ConsoleInputTaken { first } => {
                write!(f, "domains[{first}] already receives the console input: at most one domain does")
            }
            ProblemKind::UnknownDevice { device } => {
                write!(f, "unknown device {device:?} (known devices:")?;
                for (name, _, _) in DEVICE_KINDS {
                    write!(f, " {name}")?;
                }
                f.write_str(")")
            }
            ProblemKind::BadRegionSize { kib } => write!(
                f,
                "region size {kib} KiB: must be {MIN_BLOCK_REGION_KIB} to {MAX_BLOCK_REGION_KIB} KiB and a multiple of 4"
            ),
            ProblemKind::FuzzerWithExtras { what } => write!(
                f,
                "a fuzz domain gets only memory and its timer, so it cannot have {what}"
            ),
            ProblemKind::BadRestart { what } => write!(f, "restart policy: {what}"),
            ProblemKind::MemoryDoesNotFit {
                domains_mib,
                machine_mib,
            } => write!(
                f,
                "the domains need {domains_mib} MiB + {RESERVED_MEMORY_MIB} MiB reserved for the microvisor and dom0 = {} MiB, more than the machine's {machine_mib} MiB",
                domains_mib + u64::from(RESERVED_MEMORY_MIB)
            ),
        }
    }
}

/// One thing wrong with a manifest: which field, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field.
    pub field: Field,
    /// What is wrong with it.
    pub kind: ProblemKind,
}

/// `domains[2].image: unknown image "foo" (known images: ...)`.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.kind)
    }
}

/// Checks every rule and returns all problems found, in field order (version, domains,
/// channels, then the machine's memory).
///
/// `known_images` are the images that exist: the domain binaries for xtask, the bundle's
/// entry names for dom0 (the entries `dom0` and `manifest` are never accepted as images).
///
/// Rules: the version is [`MANIFEST_VERSION`]; there is at least one domain; names are
/// non-empty ASCII `[a-z0-9_-]` of at most [`MAX_NAME_LEN`] bytes, not [`RESERVED_NAME`], and
/// unique among the domains (and, separately, among the channels); each image is known; each
/// domain has [`MIN_DOMAIN_MEMORY_MIB`]..=[`MAX_DOMAIN_MEMORY_MIB`] MiB, exactly
/// [`SUPPORTED_VCPUS`] vCPU, a priority in [`MIN_PRIORITY`]..=[`MAX_PRIORITY`] and a command
/// line of at most [`MAX_ARGS_LEN`] bytes; a channel's client and server are two different
/// domains of the manifest; the domains' memory plus [`RESERVED_MEMORY_MIB`] fits in
/// [`Manifest::machine_memory_mib`].
pub fn validate(manifest: &Manifest, known_images: &[&str]) -> Result<(), Vec<Problem>> {
    let mut problems = Vec::new();
    let mut push = |field: Field, kind: ProblemKind| problems.push(Problem { field, kind });

    if manifest.version != MANIFEST_VERSION {
        push(Field::Version, ProblemKind::UnsupportedVersion { found: manifest.version });
    }
    if manifest.domains.is_empty() {
        push(Field::Domains, ProblemKind::NoDomains);
    }
    if !manifest.control.is_empty() && manifest.control != CONTROL_DEVICE {
        push(Field::Control, ProblemKind::UnknownDevice { device: manifest.control.clone() });
    }

    for (index, domain) in manifest.domains.iter().enumerate() {
        let field = |key| Field::Domain { index, key };
        let earlier = manifest.domains[..index].iter().map(|d| d.name.as_str());
        if let Some(kind) = check_name(&domain.name, earlier) {
            push(field("name"), kind);
        }
        let mut files: Vec<(&'static str, &String)> = Vec::new();
        match (domain.image.is_empty(), domain.kernel.is_empty()) {
            (true, true) => push(field("image"), ProblemKind::MissingImage),
            (false, false) => push(field("image"), ProblemKind::ImageAndKernel),
            (false, true) => files.push(("image", &domain.image)),
            (true, false) => files.push(("kernel", &domain.kernel)),
        }
        if !domain.initramfs.is_empty() {
            files.push(("initramfs", &domain.initramfs));
        }
        for (key, file) in files {
            if *file == crate::DOM0_IMAGE || file == MANIFEST_ENTRY {
                push(field(key), ProblemKind::ReservedImage { image: file.clone() });
            } else if !known_images.contains(&file.as_str()) {
                push(
                    field(key),
                    ProblemKind::UnknownImage {
                        image: file.clone(),
                        known: known_images
                            .iter()
                            .filter(|k| **k != crate::DOM0_IMAGE && **k != MANIFEST_ENTRY)
                            .map(|k| (*k).to_owned())
                            .collect(),
                    },
                );
            }
        }
        if !domain.kernel.is_empty() && domain.vmm.is_empty() {
            push(field("kernel"), ProblemKind::KernelWithoutVmm);
        }
        for (key, set) in [("initramfs", !domain.initramfs.is_empty()), ("cmdline", !domain.cmdline.is_empty())] {
            if set && domain.kernel.is_empty() {
                push(field(key), ProblemKind::NeedsKernel);
            }
        }
        if domain.cmdline.len() > MAX_CMDLINE_LEN {
            push(field("cmdline"), ProblemKind::CmdlineTooLong { len: domain.cmdline.len() });
        }
        if domain.console_input {
            if let Some(first) = manifest.domains[..index].iter().position(|d| d.console_input) {
                push(field("console_input"), ProblemKind::ConsoleInputTaken { first });
            }
        }
        if !(MIN_DOMAIN_MEMORY_MIB..=MAX_DOMAIN_MEMORY_MIB).contains(&domain.memory_mib) {
            push(field("memory_mib"), ProblemKind::MemoryOutOfRange { mib: domain.memory_mib.into() });
        }
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&domain.priority) {
            push(field("priority"), ProblemKind::PriorityOutOfRange { priority: domain.priority.into() });
        }
        if domain.vcpus != SUPPORTED_VCPUS {
            push(field("vcpus"), ProblemKind::UnsupportedVcpus { vcpus: domain.vcpus.into() });
        }
        if domain.args.len() > MAX_ARGS_LEN {
            push(field("args"), ProblemKind::ArgsTooLong { len: domain.args.len() });
        }
        // Several domains may ask for the same kind: each gets the next free function.
        if !domain.device.is_empty() && !DEVICE_KINDS.iter().any(|(name, _, _)| *name == domain.device) {
            push(field("device"), ProblemKind::UnknownDevice { device: domain.device.clone() });
        }
        if !domain.vmm.is_empty() {
            let first = manifest.domains[..index].iter().position(|d| d.vmm == domain.vmm);
            match manifest.domain(&domain.vmm) {
                None => push(field("vmm"), ProblemKind::UnknownDomain { name: domain.vmm.clone() }),
                Some(_) if domain.vmm == domain.name => push(field("vmm"), ProblemKind::OwnVmm),
                Some(v) if !v.vmm.is_empty() => push(field("vmm"), ProblemKind::VmmIsVm { vmm: domain.vmm.clone() }),
                Some(_) => {
                    if let Some(first) = first {
                        push(field("vmm"), ProblemKind::VmmTaken { vmm: domain.vmm.clone(), first });
                    }
                }
            }
        }
        if domain.fuzz && !domain.device.is_empty() {
            push(field("device"), ProblemKind::FuzzerWithExtras { what: "a device".to_owned() });
        }
        let r = domain.restart;
        if !(MIN_RESTART_LIMIT..=MAX_RESTART_LIMIT).contains(&r.limit) {
            let what = alloc::format!("limit {} is not between {MIN_RESTART_LIMIT} and {MAX_RESTART_LIMIT}", r.limit);
            push(field("restart_limit"), ProblemKind::BadRestart { what });
        }
        if !(MIN_RESTART_WINDOW_MS..=MAX_RESTART_WINDOW_MS).contains(&r.window_ms) {
            let what = alloc::format!(
                "window {} ms is not between {MIN_RESTART_WINDOW_MS} and {MAX_RESTART_WINDOW_MS}",
                r.window_ms
            );
            push(field("restart_window_ms"), ProblemKind::BadRestart { what });
        }
        if r.backoff_ms > MAX_RESTART_BACKOFF_MS {
            let what = alloc::format!("backoff {} ms is more than {MAX_RESTART_BACKOFF_MS}", r.backoff_ms);
            push(field("restart_backoff_ms"), ProblemKind::BadRestart { what });
        }
        if r.watchdog_ms != 0 && !(MIN_WATCHDOG_MS..=MAX_WATCHDOG_MS).contains(&r.watchdog_ms) {
            let what = alloc::format!(
                "watchdog {} ms is not 0 or between {MIN_WATCHDOG_MS} and {MAX_WATCHDOG_MS}",
                r.watchdog_ms
            );
            push(field("watchdog_ms"), ProblemKind::BadRestart { what });
        }
        if r.watchdog_ms != 0 && (domain.fuzz || !domain.vmm.is_empty() || !domain.kernel.is_empty()) {
            let what = "only an ordinary domain (not a fuzzer, not a VM) has a watchdog".to_owned();
            push(field("watchdog_ms"), ProblemKind::BadRestart { what });
        }
        if r.mode == Restart::Always && (domain.fuzz || !domain.vmm.is_empty()) {
            let what = "only an ordinary domain (not a fuzzer, not a VM) can be restarted".to_owned();
            push(field("restart"), ProblemKind::BadRestart { what });
        }
        if domain.fuzz && domain.status {
            push(field("status"), ProblemKind::FuzzerWithExtras { what: "the status capability".to_owned() });
        }
    }

    for (index, channel) in manifest.channels.iter().enumerate() {
        let field = |key| Field::Channel { index, key };
        let earlier = manifest.channels[..index].iter().map(|c| c.name.as_str());
        if let Some(kind) = check_name(&channel.name, earlier) {
            push(field("name"), kind);
        }
        for (key, end) in [("client", &channel.client), ("server", &channel.server)] {
            if manifest.domain(end).is_none() {
                push(field(key), ProblemKind::UnknownDomain { name: end.clone() });
            }
        }
        for (key, end) in [("client", &channel.client), ("server", &channel.server)] {
            if manifest.domain(end).is_some_and(|d| d.fuzz) {
                let what = alloc::format!("channel {:?}", channel.name);
                push(field(key), ProblemKind::FuzzerWithExtras { what });
            }
        }
        if channel.client == channel.server && manifest.domain(&channel.client).is_some() {
            push(field("server"), ProblemKind::SameDomainBothEnds { name: channel.server.clone() });
        }
        if channel.kind.has_region()
            && (!(MIN_BLOCK_REGION_KIB..=MAX_BLOCK_REGION_KIB).contains(&channel.size_kib)
                || !channel.size_kib.is_multiple_of(4))
        {
            push(field("size_kib"), ProblemKind::BadRegionSize { kib: channel.size_kib });
        }
    }

    let domains_mib = manifest.total_memory_mib();
    let machine_mib = u64::from(manifest.machine_memory_mib);
    if domains_mib + u64::from(RESERVED_MEMORY_MIB) > machine_mib {
        push(Field::MachineMemoryMib, ProblemKind::MemoryDoesNotFit { domains_mib, machine_mib });
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The first thing wrong with a domain or channel name, given the names before it in the
/// same list.
fn check_name<'a>(name: &str, mut earlier: impl Iterator<Item = &'a str>) -> Option<ProblemKind> {
    if name.is_empty() {
        return Some(ProblemKind::EmptyName);
    }
    if let Some(ch) = name.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-')) {
        return Some(ProblemKind::NameBadChar { ch });
    }
    if name.len() > MAX_NAME_LEN {
        return Some(ProblemKind::NameTooLong { len: name.len() });
    }
    if name == RESERVED_NAME {
        return Some(ProblemKind::ReservedName);
    }
    earlier.position(|e| e == name).map(|first| ProblemKind::DuplicateName { name: name.to_string(), first })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;
    use proptest::prelude::*;

    const IMAGES: &[&str] = &["ipc-client", "ipc-server"];

    fn domain(name: &str, image: &str) -> DomainSpec {
        DomainSpec {
            name: name.into(),
            image: image.into(),
            memory_mib: 4,
            priority: 10,
            vcpus: 1,
            args: String::new(),
            device: String::new(),
            status: false,
            vmm: String::new(),
            fuzz: false,
            kernel: String::new(),
            initramfs: String::new(),
            cmdline: String::new(),
            console_input: false,
            restart: RestartPolicy::default(),
        }
    }

    fn channel(name: &str, client: &str, server: &str) -> ChannelSpec {
        ChannelSpec {
            name: name.into(),
            kind: ChannelKind::Endpoint,
            client: client.into(),
            server: server.into(),
            size_kib: 0,
        }
    }

    fn demo() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            machine_memory_mib: 512,
            domains: vec![domain("pong", "ipc-server"), domain("ping", "ipc-client")],
            channels: vec![channel("ping-pong", "ping", "pong")],
            control: String::new(),
        }
    }

    /// The problems of `m`, each shown as `field: message`.
    fn problems(m: &Manifest) -> Vec<String> {
        match validate(m, IMAGES) {
            Ok(()) => Vec::new(),
            Err(ps) => ps.iter().map(|p| format!("{p}")).collect(),
        }
    }

    fn assert_one_problem(m: &Manifest, field: &str, needle: &str) {
        let ps = problems(m);
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert!(ps[0].starts_with(&format!("{field}: ")), "{ps:?}");
        assert!(ps[0].contains(needle), "{ps:?} should contain {needle:?}");
    }

    #[test]
    fn restart_policies_are_checked_field_by_field() {
        let mut m = Manifest {
            version: MANIFEST_VERSION,
            machine_memory_mib: 512,
            domains: vec![domain("a", "ipc-client"), domain("b", "ipc-server")],
            channels: vec![],
            control: String::new(),
        };
        m.domains[1].restart.mode = Restart::Always;
        assert!(validate(&m, IMAGES).is_ok());
        m.domains[1].restart.limit = 0;
        m.domains[1].restart.window_ms = 0;
        m.domains[1].restart.backoff_ms = MAX_RESTART_BACKOFF_MS + 1;
        m.domains[1].fuzz = true;
        let problems = validate(&m, IMAGES).unwrap_err();
        let fields: Vec<String> = problems.iter().map(|p| p.field.to_string()).collect();
        assert_eq!(
            fields,
            [
                "domains[1].restart_limit",
                "domains[1].restart_window_ms",
                "domains[1].restart_backoff_ms",
                "domains[1].restart"
            ]
        );
        assert!(problems[3].to_string().contains("only an ordinary domain"), "{}", problems[3]);
        m.domains[1].restart = RestartPolicy { mode: Restart::Never, ..RestartPolicy::default() };
        m.domains[1].fuzz = false;
        for (ms, ok) in [(0, true), (MIN_WATCHDOG_MS, true), (MAX_WATCHDOG_MS, true), (9, false), (60_001, false)] {
            m.domains[1].restart.watchdog_ms = ms;
            assert_eq!(validate(&m, IMAGES).is_ok(), ok, "watchdog {ms} ms");
        }
        m.domains[1].restart.watchdog_ms = 50;
        m.domains[1].fuzz = true;
        let found = self::problems(&m);
        assert!(found.iter().any(|p| p.starts_with("domains[1].watchdog_ms: ")), "{found:?}");
        m.domains[1].fuzz = false;
        m.control = CONTROL_DEVICE.into();
        assert!(validate(&m, IMAGES).is_ok());
        m.control = "virtio-gpu".into();
        assert_one_problem(&m, "control", "virtio-gpu");
        m.control = String::new();
        m.domains[1].restart.watchdog_ms = 0;
        assert!(validate(&m, IMAGES).is_ok());
    }

    #[test]
    fn a_fuzz_domain_gets_nothing_but_memory() {
        let mut m = Manifest {
            version: MANIFEST_VERSION,
            machine_memory_mib: 512,
            domains: vec![domain("a", "ipc-client"), domain("fz", "ipc-server")],
            channels: vec![channel("c", "a", "fz")],
            control: String::new(),
        };
        assert!(validate(&m, IMAGES).is_ok());
        m.domains[1].fuzz = true;
        m.domains[1].status = true;
        m.domains[1].device = "virtio-blk".into();
        let problems = validate(&m, IMAGES).unwrap_err();
        let fields: Vec<String> = problems.iter().map(|p| p.field.to_string()).collect();
        assert_eq!(fields, ["domains[1].device", "domains[1].status", "channels[0].server"]);
        assert!(problems[2].to_string().contains("a fuzz domain gets only memory"), "{}", problems[2]);
        m.channels.clear();
        m.domains[1].status = false;
        m.domains[1].device.clear();
        assert!(validate(&m, IMAGES).is_ok());
    }

    #[test]
    fn demo_is_valid_and_round_trips() {
        let m = demo();
        assert_eq!(validate(&m, IMAGES), Ok(()));
        let bytes = encode(&m).unwrap();
        assert_eq!(decode(&bytes).unwrap(), m);
        assert_eq!(m.total_memory_mib(), 8);
        assert_eq!(m.domain("ping").unwrap().image, "ipc-client");
        assert_eq!(m.domain_index("ping"), Some(1));
        assert!(m.domain("dom0").is_none());
    }

    #[test]
    fn encoding_starts_with_the_version() {
        let bytes = encode(&demo()).unwrap();
        assert_eq!(bytes[0], MANIFEST_VERSION as u8);
    }

    #[test]
    fn decode_rejects_other_versions_and_trailing_bytes() {
        let mut m = demo();
        m.version = MANIFEST_VERSION + 1;
        let bytes = encode(&m).unwrap();
        assert_eq!(decode(&bytes), Err(ManifestError::UnsupportedVersion { found: MANIFEST_VERSION + 1 }));
        assert_eq!(decode(&[]), Err(ManifestError::MissingVersion));
        assert_eq!(decode(&[0x80]), Err(ManifestError::MissingVersion));

        let mut bytes = encode(&demo()).unwrap();
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(ManifestError::TrailingBytes { count: 1 }));
    }

    #[test]
    fn decode_rejects_every_truncation() {
        let bytes = encode(&demo()).unwrap();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
    }

    #[test]
    fn decode_rejects_a_huge_list_length_without_allocating_it() {
        // The current version, machine memory 512, then a domain count of u32::MAX.
        let mut bytes = vec![MANIFEST_VERSION as u8, 0x80, 0x04];
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(decode(&bytes), Err(ManifestError::Malformed(_))));
    }

    #[test]
    fn version_must_match() {
        let mut m = demo();
        m.version = 7;
        assert_one_problem(&m, "version", "version 7 is not supported");
    }

    #[test]
    fn at_least_one_domain() {
        let mut m = demo();
        m.domains.clear();
        m.channels.clear();
        assert_one_problem(&m, "domains", "at least one domain");
    }

    #[test]
    fn names_are_checked() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("Ping", "contains 'P'"),
            ("pi ng", "contains ' '"),
            ("pïng", "contains 'ï'"),
            (&"a".repeat(32), "32 bytes long; at most 31"),
            ("dom0", "reserved"),
        ];
        for (name, needle) in cases {
            let mut m = demo();
            m.domains.push(domain(name, "ipc-client"));
            assert_one_problem(&m, "domains[2].name", needle);

            let mut m = demo();
            m.channels.push(channel(name, "pong", "ping"));
            assert_one_problem(&m, "channels[1].name", needle);
        }
        let mut m = demo();
        m.domains.push(domain(&"a".repeat(31), "ipc-client"));
        m.domains.push(domain("a_b-9", "ipc-client"));
        assert_eq!(problems(&m), Vec::<String>::new());
    }

    #[test]
    fn names_are_unique_per_list() {
        let mut m = demo();
        m.domains.push(domain("ping", "ipc-client"));
        assert_one_problem(&m, "domains[2].name", "duplicate name \"ping\"");

        let mut m = demo();
        m.channels.push(channel("ping-pong", "pong", "ping"));
        assert_one_problem(&m, "channels[1].name", "duplicate name \"ping-pong\"");

        // A channel may share a domain's name.
        let mut m = demo();
        m.channels.push(channel("ping", "pong", "ping"));
        assert_eq!(problems(&m), Vec::<String>::new());
    }

    #[test]
    fn images_must_be_known() {
        let mut m = demo();
        m.domains[1].image = "foo".into();
        assert_one_problem(&m, "domains[1].image", "unknown image \"foo\" (known images: ipc-client, ipc-server)");
        for reserved in [crate::DOM0_IMAGE, MANIFEST_ENTRY] {
            let mut m = demo();
            m.domains[0].image = reserved.into();
            let ps = match validate(&m, &["dom0", "manifest", "ipc-client", "ipc-server"]) {
                Err(ps) => ps,
                Ok(()) => panic!("{reserved} accepted as an image"),
            };
            assert_eq!(ps.len(), 1);
            assert!(matches!(ps[0].kind, ProblemKind::ReservedImage { .. }));
        }
        // dom0 passes the bundle's names: the reserved entries are not offered as images.
        let mut m = demo();
        m.domains[0].image = "nope".into();
        let ps = validate(&m, &["dom0", "manifest", "ipc-client", "ipc-server"]).unwrap_err();
        assert!(format!("{}", ps[0]).contains("(known images: ipc-client, ipc-server)"));
    }

    #[test]
    fn memory_range() {
        for (mib, ok) in [(0, false), (1, true), (1024, true), (1025, false)] {
            let mut m = demo();
            m.machine_memory_mib = 4096;
            m.domains[0].memory_mib = mib;
            if ok {
                assert_eq!(problems(&m), Vec::<String>::new(), "{mib}");
            } else {
                assert_one_problem(&m, "domains[0].memory_mib", "between 1 and 1024 MiB");
            }
        }
    }

    #[test]
    fn priority_range() {
        for (priority, needle) in [
            (0, Some("reserved for the idle loop")),
            (1, None),
            (254, None),
            (255, Some("reserved for the microvisor's own use")),
        ] {
            let mut m = demo();
            m.domains[1].priority = priority;
            match needle {
                None => assert_eq!(problems(&m), Vec::<String>::new()),
                Some(n) => assert_one_problem(&m, "domains[1].priority", n),
            }
        }
    }

    #[test]
    fn one_vcpu_only() {
        for vcpus in [0, 2, 255] {
            let mut m = demo();
            m.domains[0].vcpus = vcpus;
            assert_one_problem(&m, "domains[0].vcpus", "only 1 vCPU per domain is supported yet");
        }
    }

    #[test]
    fn args_length() {
        let mut m = demo();
        m.domains[0].args = "x".repeat(200);
        assert_eq!(problems(&m), Vec::<String>::new());
        m.domains[0].args.push('y');
        assert_one_problem(&m, "domains[0].args", "201 bytes long; at most 200");
    }

    #[test]
    fn channel_ends() {
        let mut m = demo();
        m.channels[0].server = "pang".into();
        assert_one_problem(&m, "channels[0].server", "no domain named \"pang\"");

        let mut m = demo();
        m.channels[0].client = "dom0".into();
        assert_one_problem(&m, "channels[0].client", "dom0 is the builder");

        let mut m = demo();
        m.channels[0].client = "pong".into();
        assert_one_problem(&m, "channels[0].server", "both \"pong\"");

        // Both ends missing and equal: two unknown-domain problems, nothing more.
        let mut m = demo();
        m.channels[0].client = "x".into();
        m.channels[0].server = "x".into();
        assert_eq!(problems(&m).len(), 2);
    }

    #[test]
    fn memory_must_fit_the_machine() {
        let mut m = demo();
        m.machine_memory_mib = 72;
        assert_eq!(problems(&m), Vec::<String>::new());
        m.machine_memory_mib = 71;
        assert_one_problem(
            &m,
            "machine_memory_mib",
            "the domains need 8 MiB + 64 MiB reserved for the microvisor and dom0 = 72 MiB, more than the machine's 71 MiB",
        );
        // No overflow with many large domains.
        let mut m = demo();
        m.machine_memory_mib = u32::MAX;
        m.channels.clear();
        m.domains = (0..1000)
            .map(|i| {
                let mut d = domain(&format!("d{i}"), "ipc-client");
                d.memory_mib = u32::MAX;
                d
            })
            .collect();
        let ps = validate(&m, IMAGES).unwrap_err();
        assert!(ps.iter().any(|p| matches!(p.kind, ProblemKind::MemoryDoesNotFit { .. })));
    }

    #[test]
    fn all_problems_are_reported_in_field_order() {
        let mut m = demo();
        m.version = 0;
        m.domains[0].image = "foo".into();
        m.domains[0].priority = 0;
        m.domains[1].name = "pong".into();
        m.channels[0].client = "nobody".into();
        m.machine_memory_mib = 1;
        let ps = validate(&m, IMAGES).unwrap_err();
        let fields: Vec<String> = ps.iter().map(|p| format!("{}", p.field)).collect();
        assert_eq!(
            fields,
            [
                "version",
                "domains[0].image",
                "domains[0].priority",
                "domains[1].name",
                "channels[0].client",
                "machine_memory_mib"
            ]
        );
    }

    #[test]
    fn vmm_rules_name_the_field() {
        let with_vms = |vms: &[(&str, &str)]| {
            let mut m = demo();
            for (name, vmm) in vms {
                let mut d = domain(name, "ipc-client");
                d.vmm = (*vmm).into();
                m.domains.push(d);
            }
            validate(&m, IMAGES)
        };
        assert_eq!(with_vms(&[("vm", "ping")]), Ok(()));
        let problem = |r: Result<(), Vec<Problem>>| {
            let p = r.unwrap_err();
            assert_eq!(p.len(), 1, "{p:?}");
            format!("{}", p[0])
        };
        assert!(problem(with_vms(&[("vm", "nobody")])).starts_with("domains[2].vmm: "));
        assert_eq!(problem(with_vms(&[("vm", "vm")])), "domains[2].vmm: a VM cannot be its own VMM");
        assert_eq!(
            problem(with_vms(&[("vm", "ping"), ("vm2", "vm")])),
            "domains[3].vmm: the VMM \"vm\" is a VM itself"
        );
        assert_eq!(
            problem(with_vms(&[("vm", "ping"), ("vm2", "ping")])),
            "domains[3].vmm: \"ping\" is already the VMM of domains[2]: a VMM serves one VM"
        );
    }

    #[test]
    fn linux_vm_rules_name_the_field() {
        let images = &["ipc-client", "ipc-server", "linux", "initrd"];
        let mut m = demo();
        let mut vm = domain("linux", "");
        vm.kernel = "linux".into();
        vm.initramfs = "initrd".into();
        vm.cmdline = "console=ttyS0".into();
        vm.vmm = "ping".into();
        m.domains.push(vm);
        m.domains[0].console_input = true;
        assert_eq!(validate(&m, images), Ok(()));
        let problem = |m: &Manifest| {
            let p = validate(m, images).unwrap_err();
            assert_eq!(p.len(), 1, "{p:?}");
            format!("{}", p[0])
        };
        let mut bad = m.clone();
        bad.domains[2].kernel = "nope".into();
        assert!(problem(&bad).starts_with("domains[2].kernel: unknown image \"nope\""));
        let mut bad = m.clone();
        bad.domains[2].image = "ipc-client".into();
        assert_eq!(problem(&bad), "domains[2].image: a VM with a kernel has no image: its VMM loads the kernel");
        let mut bad = m.clone();
        bad.domains[2].kernel.clear();
        bad.domains[2].initramfs.clear();
        bad.domains[2].cmdline.clear();
        assert_eq!(problem(&bad), "domains[2].image: a domain needs an image (or, as a VM, a kernel)");
        let mut bad = m.clone();
        bad.domains[2].vmm.clear();
        assert!(problem(&bad).starts_with("domains[2].kernel: only a VM boots a kernel"));
        let mut bad = m.clone();
        bad.domains[2].cmdline = "x".repeat(MAX_CMDLINE_LEN + 1);
        assert!(problem(&bad).starts_with("domains[2].cmdline: the kernel command line is 1025 bytes"));
        let mut bad = m.clone();
        bad.domains[1].console_input = true;
        assert!(problem(&bad).starts_with("domains[1].console_input: domains[0] already"));
        let mut bad = m.clone();
        bad.domains[0].initramfs = "initrd".into();
        assert!(problem(&bad).starts_with("domains[0].initramfs: only a VM with a kernel"));
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-z0-9_-]{0,40}"
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        let domain = (arb_name(), "[a-z-]{0,12}", any::<u32>(), any::<u8>(), any::<u8>(), ".{0,40}").prop_map(
            |(name, image, memory_mib, priority, vcpus, args)| DomainSpec {
                name,
                image,
                memory_mib,
                priority,
                vcpus,
                args,
                device: String::new(),
                status: false,
                vmm: String::new(),
                fuzz: false,
                kernel: String::new(),
                initramfs: String::new(),
                cmdline: String::new(),
                console_input: false,
                restart: RestartPolicy::default(),
            },
        );
        let channel = (arb_name(), arb_name(), arb_name()).prop_map(|(name, client, server)| ChannelSpec {
            name,
            kind: ChannelKind::Endpoint,
            client,
            server,
            size_kib: 0,
        });
        (any::<u32>(), any::<u32>(), proptest::collection::vec(domain, 0..5), proptest::collection::vec(channel, 0..5))
            .prop_map(|(version, machine_memory_mib, domains, channels)| Manifest {
                version,
                machine_memory_mib,
                domains,
                channels,
                control: String::new(),
            })
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_garbage_with_a_good_version(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut with_version = vec![MANIFEST_VERSION as u8];
            with_version.extend_from_slice(&bytes);
            let _ = decode(&with_version);
        }

        #[test]
        fn decode_never_panics_on_mutations(
            m in arb_manifest(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = encode(&m).unwrap();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Ok(decoded) = decode(&bytes) {
                // Whatever decodes re-encodes to the same bytes and validates without panicking.
                prop_assert_eq!(encode(&decoded).unwrap(), bytes);
                let _ = validate(&decoded, IMAGES);
            }
        }

        #[test]
        fn any_manifest_round_trips(m in arb_manifest()) {
            let bytes = encode(&m).unwrap();
            if m.version == MANIFEST_VERSION {
                prop_assert_eq!(decode(&bytes).unwrap(), m.clone());
            } else {
                prop_assert_eq!(
                    decode(&bytes),
                    Err(ManifestError::UnsupportedVersion { found: m.version })
                );
            }
            let _ = validate(&m, IMAGES);
        }
    }
}
