//! Hypercall numbers and register convention.
//!
//! A domain calls the microvisor with `VMMCALL` (3 bytes; the microvisor advances RIP past it).
//!
//! | register | on entry                                   | on return                              |
//! |----------|--------------------------------------------|----------------------------------------|
//! | RAX      | hypercall number                           | status: 0 = success, else [`Error`] code |
//! | RBX      | capability slot the call acts on (if any)  | IPC receive: the sender's badge        |
//! | RCX      | IPC: message length in words               | IPC: length of the message received    |
//! | RDI      | argument 0 / message word 0                | result 0 / message word 0              |
//! | RSI      | argument 1 / message word 1                | result 1 / message word 1              |
//! | RDX      | argument 2 / message word 2                | result 2 / message word 2              |
//! | R10      | argument 3 / message word 3                | message word 3                         |
//! | R8       | argument 4 / message word 4                | message word 4                         |
//! | R9       | argument 5 / message word 5                | message word 5                         |
//!
//! All other registers are preserved, and so are argument registers a call does not define
//! as results. Arguments that name guest memory are guest-physical addresses in the caller's
//! own stage-2 space and must be the caller's RAM.
//!
//! **IPC messages** carry up to [`REGISTER_WORDS`] words in registers. A longer message (up
//! to [`MAX_MESSAGE_WORDS`]) continues in the vCPU's message page (registered with
//! [`Hypercall::VcpuSetMessagePage`]): word `6 + i` is the `i`-th u64 of the page. Sender
//! and receiver both need a message page for such a message.

use crate::error::Error;

/// Message words passed in registers (RDI, RSI, RDX, R10, R8, R9).
pub const REGISTER_WORDS: usize = 6;
/// Longest IPC message: the registers plus one 4 KiB message page.
pub const MAX_MESSAGE_WORDS: usize = REGISTER_WORDS + 512;
/// Longest single console write; longer output takes several calls.
pub const CONSOLE_WRITE_MAX: u64 = 4096;
/// Typed console bytes the microvisor keeps until a ConsoleRead takes them.
pub const CONSOLE_INPUT_BUFFER: usize = 256;
/// Longest domain name (bytes, ASCII).
pub const DOMAIN_NAME_MAX: usize = 31;

macro_rules! hypercalls {
    ($($(#[$doc:meta])* $name:ident = $num:expr,)*) => {
        /// Every hypercall the microvisor implements, by number (RAX).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u64)]
        pub enum Hypercall {
            $($(#[$doc])* $name = $num,)*
        }

        impl Hypercall {
            /// All hypercalls, in number order.
            pub const ALL: &'static [Hypercall] = &[$(Hypercall::$name,)*];

            /// Decode RAX; `None` for numbers the microvisor does not know.
            pub const fn from_number(number: u64) -> Option<Self> {
                match number {
                    $($num => Some(Self::$name),)*
                    _ => None,
                }
            }
        }
    };
}

hypercalls! {
    /// Do nothing and return success: the floor of every hypercall's cost.
    Null = 0,
    /// Write bytes to the console. RDI = guest-physical address, RSI = length (at most
    /// [`CONSOLE_WRITE_MAX`]). The microvisor prefixes each line with the domain's name.
    ConsoleWrite = 1,
    /// Stop the calling domain. RDI = exit status (0 = clean). Does not return. If the
    /// domain has an exit endpoint, its handler receives a [`crate::exit::ExitKind::Exited`]
    /// message.
    DomainExit = 2,
    /// Power off the whole machine. RBX = slot of a machine capability (right CONTROL),
    /// RDI = status (0 = success). Does not return on success.
    Shutdown = 3,
    /// Give up the rest of this time slice.
    Yield = 4,
    /// Nanoseconds since boot → RDI; and RSI = the TSC at the clock's zero, RDX = TSC
    /// ticks per millisecond (0 while uncalibrated), with which a domain reads the same
    /// clock without this hypercall: [`clock_ns_from_tsc`] of its own RDTSC (the microvisor
    /// neither intercepts nor offsets the TSC).
    Clock = 5,
    /// Take bytes typed on the machine's console (the microvisor keeps the last
    /// [`CONSOLE_INPUT_BUFFER`] unread ones). RBX = machine capability (right READ, which
    /// dom0 gives the one domain whose manifest entry has `console_input`), RDI =
    /// guest-physical address of the buffer, RSI = its length (at most
    /// [`CONSOLE_WRITE_MAX`]). Returns RDI = bytes copied (0: nothing typed).
    ConsoleRead = 6,

    /// Create a domain. RBX = memory capability (CONTROL), RDI = RAM bytes (rounded up to
    /// 2 MiB), RSI = priority (1..=254) for its vCPUs, RDX = guest-physical address of its
    /// name, R10 = name length (1..=[`DOMAIN_NAME_MAX`]), R8 = [`domain_flags`]. The
    /// domain's RAM is fresh zeroed memory at guest-physical 0. Returns RDI = slot of the
    /// new domain capability (CONTROL | VMM).
    DomainCreate = 10,
    /// Copy bytes from the caller's RAM into a domain's RAM (to load it). RBX = domain
    /// capability (CONTROL), RDI = destination guest-physical address in that domain,
    /// RSI = source guest-physical address in the caller, RDX = length.
    DomainWrite = 11,
    /// Destroy a domain: its vCPUs stop, its mappings go, its RAM returns to the free pool,
    /// every capability to it becomes stale. RBX = domain capability (CONTROL).
    DomainDestroy = 12,
    /// Make an endpoint the domain's exit handler: its vCPUs' exits and faults arrive there
    /// as [`crate::exit`] messages. RBX = domain capability (CONTROL), RDI = endpoint slot
    /// (CALL) in the caller's table, RSI = badge the messages carry (to tell domains
    /// apart), RDX = extra [`crate::exit::state`] groups every exit message carries.
    DomainSetFaultEndpoint = 13,
    /// Create a vCPU in PVH entry state (32-bit protected mode, paging off).
    /// RBX = domain capability (CONTROL), RDI = entry point, RSI = value for EBX (the
    /// start info's guest-physical address). Returns RDI = slot of the vCPU capability.
    VcpuCreate = 14,
    /// Make a created vCPU runnable. RBX = vCPU capability (CONTROL).
    VcpuStart = 15,
    /// Register the calling vCPU's message page for long IPC messages. RDI = guest-physical
    /// address of a 4 KiB-aligned page of the caller's RAM (0 to unregister).
    VcpuSetMessagePage = 16,
    /// Map all of a VM's RAM into the caller's stage-2 space (read, write), for its VMM.
    /// RBX = the VM's domain capability (right [`rights::VMM`]), RDI = guest-physical
    /// address in the caller's space (2 MiB aligned, above the caller's RAM). One such
    /// view per caller; it goes when either domain is destroyed.
    DomainMapRam = 17,
    /// Make interrupt vector RDI (32..=255) pending on a VM's vCPU: it is delivered when the
    /// guest can take it (RFLAGS.IF, no interrupt shadow), and it wakes the vCPU from HLT.
    /// RBX = vCPU capability (CONTROL).
    VcpuInject = 18,
    /// Stop (RDI = 1) or resume (RDI = 0) every vCPU of a VM. A paused vCPU keeps its
    /// state; exits already sent stay answerable. RBX = the VM's domain capability
    /// ([`rights::VMM`]); InvalidState for a domain that is not a VM.
    DomainPause = 19,

    /// Create a shared memory region of fresh zeroed frames. RBX = memory capability
    /// (CONTROL), RDI = bytes (rounded up to 4 KiB). Returns RDI = slot of the region
    /// capability (READ, WRITE, EXEC, GRANT).
    RegionCreate = 20,
    /// Map a region into a domain's stage-2 space. RBX = domain capability (CONTROL),
    /// RDI = region slot, RSI = guest-physical address (4 KiB aligned), RDX = rights
    /// ([`rights::READ`] | [`rights::WRITE`] | [`rights::EXEC`], within the region
    /// capability's rights).
    Map = 21,
    /// Remove a region's mapping from a domain. RBX = domain capability (CONTROL),
    /// RDI = region slot.
    Unmap = 22,

    /// Create an endpoint for synchronous IPC. RBX = memory capability (CONTROL).
    /// Returns RDI = slot (CALL, RECV, GRANT).
    EndpointCreate = 30,
    /// Create a notification. RBX = memory capability (CONTROL).
    /// Returns RDI = slot (SIGNAL, WAIT, GRANT).
    NotificationCreate = 31,

    /// Copy a capability into another domain's table with fewer (or equal) rights.
    /// RBX = source slot (must have GRANT), RDI = target domain capability slot (CONTROL),
    /// RSI = rights mask, RDX = badge for an unbadged endpoint or notification
    /// capability (0 = keep). Returns RDI = the slot in the target domain's table.
    CapCopy = 40,
    /// Delete every capability derived from this one by [`Hypercall::CapCopy`], in any
    /// domain, transitively. The capability itself stays. RBX = slot.
    CapRevoke = 41,
    /// Delete a capability from the caller's own table. RBX = slot.
    CapDelete = 42,

    /// Send a message on an endpoint and wait for the reply. RBX = endpoint slot (CALL),
    /// RCX = message length, RDI..R9 = words. Returns the reply in RCX, RDI..R9.
    Call = 50,
    /// Reply to the last caller (if any) and wait for the next message. RBX = endpoint slot
    /// (RECV), RCX/RDI..R9 = the reply. Returns the next message, RBX = its badge.
    ReplyRecv = 51,
    /// Wait for a message. RBX = endpoint slot (RECV). Returns the message, RBX = badge.
    Recv = 52,

    /// OR bits into a notification, waking its waiter or bound vCPU. RBX = notification
    /// slot (SIGNAL), RDI = bits (0 = use the capability's badge).
    Signal = 60,
    /// Wait until the notification has bits set; take them. RBX = slot (WAIT). RDI = bits.
    Wait = 61,
    /// Take the notification's bits without waiting. RBX = slot (WAIT). RDI = bits.
    Poll = 62,
    /// Deliver this notification to the calling vCPU as virtual interrupt RDI (32..=255)
    /// whenever it is signalled (it also wakes the vCPU from HLT). RBX = slot (WAIT).
    /// RDI = 0 binds it to the caller's receive instead: a Recv or ReplyRecv of the caller
    /// that would block returns at once, or is woken, when the notification has bits, with
    /// RBX = [`NOTIFICATION_BADGE`], RCX = 0 and RDI = the bits (taken). (A ReplyRecv that
    /// answers an ordinary Call on the fast path does not look; bits waiting then are seen
    /// by the next Recv/ReplyRecv that takes the general path, e.g. one answering an exit.)
    NotificationBind = 63,
    /// One-shot virtual timer: signal the notification with RSI bits (0 = bit 0) RDI
    /// nanoseconds from now (0 cancels). RBX = slot (WAIT).
    TimerSet = 64,
    /// Signal one notification and wait on another, in one hypercall (a doorbell
    /// ping-pong: one exit per side). RBX = slot to signal (SIGNAL), RDI = bits (0 = the
    /// capability's badge), RSI = slot to wait on (WAIT). Both are checked before anything
    /// happens. Returns RDI = the bits taken, as [`Hypercall::Wait`]. A woken vCPU of
    /// higher or equal priority runs at once.
    SignalWait = 65,
    /// Signal a notification, then halt as HLT does, in one hypercall (a server that
    /// answers and goes idle: one exit instead of two). RBX = slot to signal (SIGNAL),
    /// RDI = bits (0 = the capability's badge). Called with RFLAGS.IF clear: the vCPU
    /// sleeps unless a virtual interrupt is pending or offered to it, and is woken, as a
    /// halted vCPU is, by a signal on any notification bound to one of its vectors.
    /// Returns 0 (RAX) either way, interrupts still off: the caller lets the offered
    /// interrupt in (`sti; nop; cli`) and looks at what arrived. A woken vCPU of higher
    /// priority runs at once.
    SignalHalt = 66,

    /// Describe a PCI function. RBX = device capability (any rights). Returns
    /// RDI = requester id (bus << 8 | device << 3 | function), RSI = vendor | device << 16,
    /// RDX = class << 16 | subclass << 8 | programming interface, R10 = the domain it is
    /// assigned to (its index + 1; 0 = none).
    DeviceInfo = 70,
    /// Give a PCI function to a domain. Its memory BARs appear in the domain's stage-2 at
    /// their physical addresses (uncached); its DMA goes through the IOMMU, which maps only
    /// the domain's RAM and the regions mapped into it; its configuration space is reached
    /// with PciConfigRead/Write, filtered. RBX = device capability (CONTROL), RDI = domain
    /// capability slot (CONTROL). A device belongs to one domain at a time.
    DeviceAssign = 71,
    /// Read the configuration space of a device assigned to the caller's domain.
    /// RBX = device capability, RDI = offset (< 4096), RSI = size (1, 2 or 4, aligned).
    /// Returns RDI = the value (BARs read as the driver is allowed to see them).
    PciConfigRead = 72,
    /// Write the configuration space of a device assigned to the caller's domain, through
    /// the microvisor's filter (BARs, ROM and header fields cannot be changed; only the
    /// command register's memory, bus-master and INTx-disable bits, MSI-X enable/mask and
    /// vendor-specific capabilities). RBX = device capability, RDI = offset, RSI = size,
    /// RDX = value. A filtered-out write succeeds without effect.
    PciConfigWrite = 73,
    // 74 was IommuFault: a DMA fault reaches the device owner's exit handler as an
    // `ExitKind::Dma` message instead.
    /// Route an interrupt of a device assigned to the caller's domain to one of its
    /// notifications. The microvisor allocates a vector and an interrupt-remapping entry
    /// that accepts it only from this device (source-id checked). RBX = device capability,
    /// RDI = notification slot (WAIT). Returns RDI = the MSI address and RSI = the MSI data
    /// to program into the device (remappable format), RDX = the entry's handle.
    DeviceIrq = 75,
    /// How a domain is doing, for a status display. RBX = domain capability (CONTROL).
    /// Returns RDI = its vCPUs, RSI = how many of them are stopped, RDX = IPC calls its vCPUs
    /// made, R10 = notifications they signalled, R8 = its RAM in MiB. A destroyed domain's
    /// capabilities are revoked, so asking about one fails.
    DomainStatus = 76,

    /// How the whole machine is doing, so that leaks can be measured from dom0.
    /// RBX = machine capability (CONTROL). Returns RDI = free 4 KiB frames, and the live
    /// kernel objects per table: RSI = domains, RDX = vCPUs, R10 = regions, R8 = endpoints,
    /// R9 = notifications.
    MachineStatus = 90,
}

impl Hypercall {
    pub const fn number(self) -> u64 {
        self as u64
    }
}

/// The microvisor's clock: nanoseconds since `start` at `per_ms` TSC ticks per millisecond
/// (the `Clock` hypercall's results; `per_ms` 0 counts as 1). The microvisor and every
/// domain compute it this one way, so a domain's reading agrees with the hypercall's and
/// with the timers the microvisor arms.
pub fn clock_ns_from_tsc(tsc: u64, start: u64, per_ms: u64) -> u64 {
    (u128::from(tsc.wrapping_sub(start)) * 1_000_000 / u128::from(per_ms.max(1))) as u64
}

/// Capability rights (a bit set).
pub mod rights {
    /// Memory: map readable.
    pub const READ: u64 = 1 << 0;
    /// Memory: map writable.
    pub const WRITE: u64 = 1 << 1;
    /// Memory: map executable.
    pub const EXEC: u64 = 1 << 2;
    /// Endpoint: send and call.
    pub const CALL: u64 = 1 << 3;
    /// Endpoint: receive.
    pub const RECV: u64 = 1 << 4;
    /// Notification: signal.
    pub const SIGNAL: u64 = 1 << 5;
    /// Notification: wait, poll, bind, timer.
    pub const WAIT: u64 = 1 << 6;
    /// May be copied into other domains.
    pub const GRANT: u64 = 1 << 7;
    /// Domain, vCPU, memory pool, machine: operate on the object.
    pub const CONTROL: u64 = 1 << 8;
    /// Domain that is a VM: act as its VMM (DomainMapRam, DomainPause).
    pub const VMM: u64 = 1 << 9;
    pub const ALL: u64 = (1 << 10) - 1;
}

/// Flags of [`Hypercall::DomainCreate`] (R8).
pub mod domain_flags {
    /// The domain is a VM: its exits go to its exit handler (its VMM) for emulation, see
    /// [`crate::exit`]; it makes no hypercalls (VMMCALL is an exit too).
    pub const VM: u64 = 1 << 0;
    pub const ALL: u64 = VM;
}

/// The badge of a Recv woken by a notification bound to the receive (RDI = the bits).
pub const NOTIFICATION_BADGE: u64 = u64::MAX;

/// The capability slots dom0 starts with. Other domains start with an empty table and get
/// what dom0 copies to them.
pub mod dom0_slots {
    /// dom0's own domain (CONTROL).
    pub const SELF_DOMAIN: u64 = 0;
    /// All free memory (CONTROL, GRANT): creates domains, regions, endpoints, notifications.
    pub const MEMORY: u64 = 1;
    /// dom0's vCPU (CONTROL).
    pub const SELF_VCPU: u64 = 2;
    /// The machine (CONTROL): power off, IOMMU fault log.
    pub const MACHINE: u64 = 3;
    /// The first PCI function (CONTROL); the others follow in consecutive slots, in bus,
    /// device, function order, up to the first slot that holds no device capability.
    pub const FIRST_DEVICE: u64 = 4;
}

/// Number of capability slots per domain.
pub const CAP_SLOTS: usize = 64;

/// CPUID leaf where the microvisor identifies itself to domains (EBX, ECX, EDX spell
/// [`CPUID_SIGNATURE`]; EAX is the highest hypervisor leaf). Leaf 1 ECX bit 31 is set too.
pub const CPUID_LEAF_SIGNATURE: u32 = 0x4000_0000;
/// CPUID leaf whose EAX is [`crate::ABI_VERSION`].
pub const CPUID_LEAF_ABI: u32 = 0x4000_0001;
pub const CPUID_SIGNATURE: [u8; 12] = *b"Microvisor  ";

/// Encode a hypercall result into the RAX status word.
pub const fn status_of(result: Result<(), Error>) -> u64 {
    match result {
        Ok(()) => 0,
        Err(e) => e.code(),
    }
}

/// Decode the RAX status word a hypercall returned.
pub const fn result_of(status: u64) -> Result<(), Error> {
    if status == 0 {
        return Ok(());
    }
    match Error::from_code(status) {
        Some(e) => Err(e),
        None => Err(Error::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_from_the_tsc() {
        // 2 GHz: 2,000,000 ticks per ms, 2 per ns.
        assert_eq!(clock_ns_from_tsc(1_000, 1_000, 2_000_000), 0);
        assert_eq!(clock_ns_from_tsc(3_000, 1_000, 2_000_000), 1_000);
        // The TSC may wrap between the clock's zero and now.
        assert_eq!(clock_ns_from_tsc(1, u64::MAX, 2_000_000), 1);
        // An uncalibrated rate (0) counts as 1 tick per ms, as the microvisor does.
        assert_eq!(clock_ns_from_tsc(7, 5, 0), 2_000_000);
        // No overflow for a long uptime: a day at 5 GHz.
        let day = 86_400u64 * 5_000_000_000;
        assert_eq!(clock_ns_from_tsc(day, 0, 5_000_000), 86_400 * 1_000_000_000);
    }

    #[test]
    fn numbers_round_trip() {
        for &h in Hypercall::ALL {
            assert_eq!(Hypercall::from_number(h.number()), Some(h));
        }
        assert_eq!(Hypercall::from_number(9), None);
        assert_eq!(Hypercall::from_number(u64::MAX), None);
    }

    #[test]
    fn numbers_are_unique_and_sorted() {
        for w in Hypercall::ALL.windows(2) {
            assert!(w[0].number() < w[1].number());
        }
    }

    #[test]
    fn status_round_trip() {
        assert_eq!(result_of(status_of(Ok(()))), Ok(()));
        assert_eq!(result_of(status_of(Err(Error::BadAddress))), Err(Error::BadAddress));
        assert_eq!(result_of(0xdead_beef), Err(Error::Unknown));
    }

    #[test]
    fn rights_are_distinct_bits() {
        let all = [
            rights::READ,
            rights::WRITE,
            rights::EXEC,
            rights::CALL,
            rights::RECV,
            rights::SIGNAL,
            rights::WAIT,
            rights::GRANT,
            rights::CONTROL,
            rights::VMM,
        ];
        assert_eq!(all.iter().fold(0, |a, b| a | b), rights::ALL);
        assert_eq!(all.iter().map(|r| r.count_ones()).sum::<u32>(), all.len() as u32);
    }
}
