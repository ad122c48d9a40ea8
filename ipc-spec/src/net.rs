//! The network channel: how a guest sends and receives Ethernet frames through a net driver
//! VM.
//!
//! The two sides share one memory region (mapped into both stage-2 spaces, at addresses each
//! side chooses; offsets below are from the region's start; its size is the manifest's
//! `size_kib`) and a doorbell notification each way. The guest puts frames on the TX ring
//! (guest -> driver) and rings the driver's doorbell; the driver puts frames for the guest on
//! the RX ring (driver -> guest) and rings the guest's. One region per guest <-> driver
//! channel: the driver VM switches frames between its channels and the device by destination
//! MAC.
//!
//! Neither side trusts the other: the driver VM trusts no guest, and the guest does not trust
//! the driver VM. Both rings are [`crate::ring`] SPSC rings, so the peer's indexes are
//! checked; every descriptor is copied out of the ring once, decoded (total) and checked
//! against the layout ([`validate`]) before its frame is touched, and the frame itself is
//! copied out of the shared region once before anyone looks at it (so a peer rewriting it
//! meanwhile only ever produces one more malformed frame, never a frame that changes after
//! it was checked). [`FrameReceiver::recv`] does all of that.
//!
//! # Region layout
//!
//! The layout is not negotiated: both sides compute it from the region's length with
//! [`Layout::new`] (so they must map the same length; the header's ring capacity is the
//! cross-check).
//!
//! ```text
//! 0x0000  header page (4 KiB), little endian, written by the driver VM:
//!           +0   magic           u32  = "NET1" (bytes 4e 45 54 31), written last at init
//!           +4   version         u32  = 1
//!           +8   ring capacity   u32  (entries per ring; must equal Layout::new's)
//!           +12  mtu             u32  (IP MTU, 68..=1500; frames carry at most mtu + 14 bytes)
//!           +16  link            u32  (1 = up, anything else = down); may change at any time
//!           +20  incarnation     u32  the attached driver's (1 for the first, +1 at each
//!                                     re-attach, never 0 once the magic is there); see
//!                                     "Restarts"
//!           +24  guest MAC       6 bytes, then 2 reserved bytes
//!           +32  server state    u32  written by **dom0**: [`SERVER_GONE`] once it gave up
//!                                     restarting the driver (0 otherwise); see "Restarts"
//!           +64  drop counters   16 x u32, indexed by NetDropReason::code(); wrapping
//!           +128 RX no-doorbell  u32  written by the guest: 1 = do not ring me for RX
//!                                     frames (see "Doorbells"); anything else = ring
//!           +132 TX no-doorbell  u32  the same for the TX ring, written by the driver
//!                                     (reserved: the driver writes 0, guests ring always)
//!           rest of the page reserved (ignored)
//! 0x1000  TX ring (guest -> driver): ring::HEADER_SIZE + capacity * DESC_SIZE bytes
//!  ...    RX ring (driver -> guest), at the next 64-byte boundary
//!  ...    frame area, at the next 4 KiB boundary:
//!           TX half: 2 * capacity slots of FRAME_SLOT_SIZE (2 KiB) bytes
//!           RX half: 2 * capacity slots of FRAME_SLOT_SIZE bytes, right after
//!  ...    the rest of the region is unused
//! ```
//!
//! The ring capacity is the largest power of two up to [`MAX_RING_CAPACITY`] for which all of
//! this fits. Capacity `c` needs `8 * c` KiB of frame slots after the header and ring pages:
//! 16 KiB for capacity 1 ([`MIN_REGION`]), 520 KiB for 64, 1 MiB + 12 KiB for 128, 2 MiB +
//! 16 KiB for 256; so a plain 1 MiB region gets capacity 64 and leaves the rest unused.
//!
//! # Descriptors (one 16-byte ring slot each, little endian)
//!
//! ```text
//!   +0  slot  u32   index of the frame slot in this direction's half
//!   +4  len   u32   frame length in bytes (Ethernet header included, no FCS)
//!   +8  incarnation u32  RX ring: the incarnation of the driver that produced the frame;
//!                        TX ring: written as zero, ignored
//!  +12  reserved, written as zero, ignored
//! ```
//!
//! # Slot ownership
//!
//! Slots are not allocated: the entry with free-running ring index `i` always uses slot
//! `i % (2 * capacity)` of its direction's half ([`Layout::slot_for_index`]); a descriptor
//! naming any other slot is dropped ([`NetDropReason::BadSlot`]). Twice as many slots as ring
//! entries is what makes this safe without a ring to return free slots:
//!
//! - The producer writes the frame into the slot of its next index, then pushes the
//!   descriptor ([`FrameSender::send`]). The ring refuses the push while `capacity` entries
//!   are unconsumed, so the producer can only be writing entry `i + 2 * capacity` (reusing
//!   the slot of entry `i`) after the consumer has advanced its index past entry
//!   `i + capacity`.
//! - The consumer pops a descriptor (which advances the consumer index at once), then copies
//!   the frame out of the slot. Its rule: it is done with entry `i`'s slot before it pops
//!   entry `i + capacity`. [`FrameReceiver::recv`], which copies each frame before returning,
//!   keeps it trivially; a driver that points device DMA straight at TX slots may keep up to
//!   `capacity` popped frames in flight.
//!
//! So a slot belongs to the producer from the time the consumer has popped the entry
//! `capacity` after the slot's previous use, until the producer publishes the descriptor;
//! then to the consumer until it pops the entry `capacity` after it. A dishonest peer can
//! break these rules only to its own loss (garbled frames); nothing it does can make the
//! other side read or write outside the region, or outside the half it reads from.
//!
//! # Who writes what, and when
//!
//! 1. Dom0 creates the region (zeroed) and maps it into both domains.
//! 2. The driver VM writes the header (incarnation 1) and empties both rings
//!    ([`NetHeader::init`]: magic last, after a release fence), then attaches
//!    ([`Layout::driver_channel`]) and rings the guest's doorbell; [`NetHeader::attach_driver`]
//!    does all of it. Later it writes only the link word ([`set_link`]) and the drop
//!    counters ([`DropCounters::publish`]); it never reads the header back, except once
//!    when it re-attaches after a restart (below).
//! 3. The guest waits until [`NetHeader::check`] accepts the header (magic, version, ring
//!    capacity, MTU), keeps the checked copy (MAC, MTU) and attaches
//!    ([`Layout::guest_channel`]). It may read [`link_up`] and [`DropCounters::read`] at any
//!    time (both are informational: any value is harmless).
//! 4. A restarted driver re-attaches ([`NetHeader::attach_driver`]); see "Restarts".
//!
//! # Restarts
//!
//! The channel outlives its driver: dom0 maps the same region (the guest's, which stays
//! where it is) into the next incarnation of the driver VM and gives it the same doorbells.
//! [`NetHeader::attach_driver`] finds a valid header there and, instead of initialising the
//! region again (which would move the guest's rings backwards: the guest would declare them
//! corrupt), it:
//!
//! - attaches to both rings as they are: the TX ring's frames not yet taken are sent as if
//!   nothing happened, the RX ring continues from the producer index the dead incarnation
//!   published (a frame it was writing but had not published is simply never published);
//! - writes its own header fields again (MTU, link, MAC: the guest may have scribbled on
//!   them) and takes the drop counters as they are (informational);
//! - writes the next **incarnation** number into the header (+20) after a release fence,
//!   and stamps it into every RX descriptor it produces (+8).
//!
//! Frames in flight are lost: those the dead incarnation had taken off the TX ring and not
//! yet handed to the device, those the device held, those on the wire towards it. TCP
//! retransmits; nothing else in the protocol waits for a frame. The guest's MAC is the
//! driver's choice and must not change across incarnations (the net driver VM derives it
//! from the channel's position on its command line, which dom0 keeps).
//!
//! The guest ([`FrameReceiver::follow_incarnations`]) takes a frame from the RX ring only if
//! its stamp is the incarnation in the header when it takes it (one load per frame; a new
//! incarnation writes the header before its first frame); any other stamp is a frame a dead
//! incarnation published before it died, dropped ([`NetDropReason::Stale`]). So nothing a dead incarnation left behind is used once its
//! successor has attached. No frame of a dead incarnation can arrive later: dom0 destroys a
//! driver VM (and quiesces its device) before it builds the next.
//!
//! When dom0 gives up on the driver (its restart limit), it writes [`SERVER_GONE`] at header
//! +32 and the link word down ([`mark_server_gone`]), then rings the guest's doorbell: the
//! guest ([`server_gone`]) then knows that no frame will come or go on this channel again
//! and says so, instead of waiting for ever. The driver never writes +32 (it initialises
//! only the fields above); if dom0 builds the driver again later (`xtask ctl restart`), it
//! clears the word first and the new incarnation re-attaches as usual.
//!
//! A corrupt ring ([`NetDropReason::BadRing`]) stops that direction of that channel only.
//!
//! # Doorbells
//!
//! A producer rings the consumer's doorbell (a notification signal: a hypercall, and for a
//! consumer that waits, a wake-up) after a batch of frames, unless the consumer said it does
//! not need it. Each ring's consumer owns one **no-doorbell** word in the header (RX ring:
//! the guest's, +128; TX ring: the driver's, +132), like virtio's `VRING_USED_F_NO_NOTIFY`:
//!
//! - While it runs and will look at the ring again before it next waits, the consumer may
//!   store 1 ([`FrameReceiver::suppress_doorbells`]): producers skip the signal.
//! - Before it waits for the doorbell it stores 0, then a full fence, then looks at the
//!   ring again, and waits only if the ring is empty ([`FrameReceiver::arm_doorbell`]).
//! - The producer publishes its descriptors (the producer index), then a full fence, then
//!   loads the word, and rings unless it is 1 ([`FrameSender::wants_doorbell`]).
//!
//! Why no wake-up is lost (Dekker's argument): call the consumer's store of 0 `Sc` and its
//! load of the producer index `Lc`, the producer's store of the index `Sp` and its load of
//! the word `Lp`. The fences order `Sc` before `Lc` and `Sp` before `Lp` (on x86 the only
//! reordering a fence prevents here: a load done before an earlier store to another place).
//! In the single total order of the two fences, either the consumer's comes first, so `Sc`
//! is visible before `Lp` runs: the producer sees 0 and rings; or the producer's comes
//! first, so `Sp` is visible before `Lc`: the consumer finds the frame and does not wait.
//! Without the consumer's fence (or its second look), or without the producer's fence, both
//! can miss each other: the consumer waits on a ring with a frame and nobody rings.
//! `tests::doorbell_suppression_loses_no_wake_up` runs these functions on a memory that
//! models x86's store buffer and fails if either fence or the second look is dropped.
//!
//! Notifications are latched bits, so a doorbell rung between the consumer's second look
//! and its wait is not lost either. The word is a hint between parties that do not trust
//! each other: a consumer that writes 1 and then waits only delays its own frames; a
//! producer reads it once per batch and trusts nothing else in it. A consumer that never
//! writes it (0 after init) is rung after every batch, as before the word existed. A
//! restarted driver keeps the guest's word (the guest runs on) and writes its own again.

use core::fmt;
use core::ops::Range;
use core::sync::atomic::{fence, Ordering};

use crate::ring::{self, Consumer, Producer, RingError, SharedMem};

/// `"NET1"` as a little-endian `u32`: the bytes `4e 45 54 31` at offset 0.
pub const MAGIC: u32 = u32::from_le_bytes(*b"NET1");
/// The only layout version this module reads and writes.
pub const VERSION: u32 = 1;
/// Size of the header page at offset 0.
pub const HEADER_PAGE_SIZE: usize = 4096;
/// Offset of the TX ring: right after the header page.
pub const TX_RING_OFFSET: usize = HEADER_PAGE_SIZE;
/// Alignment of the RX ring: a cache line, away from the TX ring's index words.
pub const RING_ALIGN: usize = 64;
/// Alignment of the frame area.
pub const FRAMES_ALIGN: usize = 4096;
/// Bytes per ring slot: one descriptor.
pub const DESC_SIZE: usize = 16;
/// Bytes per frame slot; holds the largest frame.
pub const FRAME_SLOT_SIZE: usize = 2048;
/// Largest ring capacity [`Layout::new`] picks (then 512 frame slots per direction, 2 MiB).
pub const MAX_RING_CAPACITY: u32 = 256;
/// Frame slots per ring entry in each direction (see "Slot ownership" above).
pub const SLOTS_PER_ENTRY: u32 = 2;
/// Smallest region [`Layout::new`] accepts: header page, ring page, 4 frame slots.
pub const MIN_REGION: usize = 4 * 4096;
/// Length of an Ethernet header (destination, source, ethertype); the shortest frame.
pub const ETH_HEADER_LEN: usize = 14;
/// Shortest frame accepted: just an Ethernet header (padding to 60 is the device's job).
pub const MIN_FRAME_LEN: usize = ETH_HEADER_LEN;
/// Largest IP MTU (and the default).
pub const MAX_MTU: u32 = 1500;
/// Smallest IP MTU [`NetHeader`] accepts (IPv4's minimum).
pub const MIN_MTU: u32 = 68;
/// Largest frame: MTU 1500 plus the Ethernet header (no FCS, no VLAN tag).
pub const MAX_FRAME_LEN: usize = MAX_MTU as usize + ETH_HEADER_LEN;
/// Number of drop counters in the header (room for reasons added later).
pub const DROP_COUNTERS: usize = 16;

/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethertype of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86DD;

// What the format relies on, checked at compile time.
const _: () = {
    assert!(MAX_FRAME_LEN <= FRAME_SLOT_SIZE);
    assert!(DROP_COUNTERS >= NetDropReason::ALL.len());
    assert!(header::DROP_COUNTERS + 4 * DROP_COUNTERS <= header::RX_NO_DOORBELL);
    assert!(header::TX_NO_DOORBELL + 4 <= HEADER_PAGE_SIZE);
    assert!(ring::capacity_is_valid(MAX_RING_CAPACITY));
    assert!(SLOTS_PER_ENTRY.is_power_of_two());
};

/// Offsets of the header fields.
pub mod header {
    /// `u32`: [`super::MAGIC`].
    pub const MAGIC: usize = 0;
    /// `u32`: [`super::VERSION`].
    pub const VERSION: usize = 4;
    /// `u32`: entries per ring.
    pub const RING_CAPACITY: usize = 8;
    /// `u32`: IP MTU.
    pub const MTU: usize = 12;
    /// `u32`: 1 = link up.
    pub const LINK: usize = 16;
    /// `u32`: the attached driver's incarnation (see "Restarts").
    pub const INCARNATION: usize = 20;
    /// 6 bytes: the guest's MAC address, then 2 reserved bytes.
    pub const MAC: usize = 24;
    /// `u32`: [`super::SERVER_GONE`] once dom0 gave up on the driver, else 0 (dom0's word).
    pub const SERVER: usize = 32;
    /// [`super::DROP_COUNTERS`] `u32`s, indexed by [`super::NetDropReason::code`].
    pub const DROP_COUNTERS: usize = 64;
    /// `u32`, written by the guest: [`super::NO_DOORBELL`] = do not ring me for RX frames.
    pub const RX_NO_DOORBELL: usize = 128;
    /// `u32`, written by the driver: the same for the TX ring.
    pub const TX_NO_DOORBELL: usize = 132;
}

/// The value of a no-doorbell word that asks the producer not to ring (see "Doorbells");
/// any other value asks for a doorbell.
pub const NO_DOORBELL: u32 = 1;

/// The offset of the no-doorbell word that `dir`'s consumer writes.
pub const fn no_doorbell_offset(dir: Direction) -> usize {
    match dir {
        Direction::Rx => header::RX_NO_DOORBELL,
        Direction::Tx => header::TX_NO_DOORBELL,
    }
}

/// Offsets of the descriptor fields inside a ring slot.
pub mod desc {
    /// `u32`: frame slot index in the direction's half.
    pub const SLOT: usize = 0;
    /// `u32`: frame length in bytes.
    pub const LEN: usize = 4;
    /// `u32`: RX ring: the producing driver's incarnation (see "Restarts"); TX ring: zero.
    pub const INCARNATION: usize = 8;
}

/// The guest's half of the TX ring (raw; [`FrameSender`] wraps it).
pub type TxProducer<'m, M> = Producer<'m, M, DESC_SIZE>;
/// The driver's half of the TX ring (raw; [`FrameReceiver`] wraps it).
pub type TxConsumer<'m, M> = Consumer<'m, M, DESC_SIZE>;
/// The driver's half of the RX ring (raw).
pub type RxProducer<'m, M> = Producer<'m, M, DESC_SIZE>;
/// The guest's half of the RX ring (raw).
pub type RxConsumer<'m, M> = Consumer<'m, M, DESC_SIZE>;

/// Which way frames go; each direction has its own ring and its own half of the frame area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Guest -> driver VM (the TX ring, the first half).
    Tx,
    /// Driver VM -> guest (the RX ring, the second half).
    Rx,
}

/// A MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: MacAddr = MacAddr([0xFF; 6]);
    /// `00:00:00:00:00:00`.
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// The MAC address the driver VM gives its `index`th guest: `02:4d:` then `index` big
    /// endian. Locally administered, unicast, and different for every `index`.
    pub const fn local(index: u32) -> Self {
        let i = index.to_be_bytes();
        MacAddr([0x02, 0x4D, i[0], i[1], i[2], i[3]])
    }

    /// Whether this is `ff:ff:ff:ff:ff:ff`.
    pub const fn is_broadcast(&self) -> bool {
        matches!(self.0, [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
    }

    /// Whether the group bit (bit 0 of the first byte) is set; broadcast is multicast too.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Whether this names one station (the group bit is clear).
    pub const fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }

    /// Whether the locally-administered bit (bit 1 of the first byte) is set.
    pub const fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The Ethernet header at the start of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthernetHeader {
    /// Destination address.
    pub dst: MacAddr,
    /// Source address.
    pub src: MacAddr,
    /// Ethertype (or, below 0x0600, an 802.3 length), big endian on the wire.
    pub ethertype: u16,
}

impl EthernetHeader {
    /// Parses the first [`ETH_HEADER_LEN`] bytes of `frame`; `None` if it is shorter.
    pub fn parse(frame: &[u8]) -> Option<Self> {
        let h: &[u8; ETH_HEADER_LEN] = frame.get(..ETH_HEADER_LEN)?.try_into().ok()?;
        let [d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5, t0, t1] = *h;
        Some(Self {
            dst: MacAddr([d0, d1, d2, d3, d4, d5]),
            src: MacAddr([s0, s1, s2, s3, s4, s5]),
            ethertype: u16::from_be_bytes([t0, t1]),
        })
    }

    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; ETH_HEADER_LEN] {
        let mut b = [0u8; ETH_HEADER_LEN];
        b[..6].copy_from_slice(&self.dst.0);
        b[6..12].copy_from_slice(&self.src.0);
        b[12..].copy_from_slice(&self.ethertype.to_be_bytes());
        b
    }
}

/// Why a frame was dropped; the code indexes the header's drop counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetDropReason {
    /// Shorter than an Ethernet header ([`MIN_FRAME_LEN`]).
    TooShort,
    /// Longer than [`MAX_FRAME_LEN`], than MTU + 14, or than the receiver's buffer.
    TooLong,
    /// The descriptor names a slot outside its direction's half, or not the slot its ring
    /// index owns ([`Layout::slot_for_index`]).
    BadSlot,
    /// The peer's ring index is impossible ([`RingError::Corrupt`]); sticky for that ring.
    BadRing,
    /// The ring is full: the peer has not taken earlier frames yet.
    RingFull,
    /// A guest sent a frame whose source is not its assigned MAC (the driver's switch).
    BadSource,
    /// No port has the destination MAC (the driver's switch).
    NoRoute,
    /// The device refused or failed the frame (the driver).
    DeviceError,
    /// An RX frame produced by a driver incarnation that is no longer the attached one (the
    /// guest, [`FrameReceiver::follow_incarnations`]).
    Stale,
}

impl NetDropReason {
    /// Every reason, in code order.
    pub const ALL: [NetDropReason; 9] = [
        NetDropReason::TooShort,
        NetDropReason::TooLong,
        NetDropReason::BadSlot,
        NetDropReason::BadRing,
        NetDropReason::RingFull,
        NetDropReason::BadSource,
        NetDropReason::NoRoute,
        NetDropReason::DeviceError,
        NetDropReason::Stale,
    ];

    /// The wire code: the index of this reason's counter in the header (< [`DROP_COUNTERS`]).
    pub const fn code(self) -> usize {
        match self {
            NetDropReason::TooShort => 0,
            NetDropReason::TooLong => 1,
            NetDropReason::BadSlot => 2,
            NetDropReason::BadRing => 3,
            NetDropReason::RingFull => 4,
            NetDropReason::BadSource => 5,
            NetDropReason::NoRoute => 6,
            NetDropReason::DeviceError => 7,
            NetDropReason::Stale => 8,
        }
    }
}

impl From<RingError> for NetDropReason {
    /// [`RingError::Full`] is [`NetDropReason::RingFull`]; anything else means the ring
    /// cannot be used ([`NetDropReason::BadRing`]).
    fn from(e: RingError) -> Self {
        match e {
            RingError::Full => NetDropReason::RingFull,
            RingError::Corrupt | RingError::BadLayout => NetDropReason::BadRing,
        }
    }
}

impl fmt::Display for NetDropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetDropReason::TooShort => "frame shorter than an Ethernet header",
            NetDropReason::TooLong => "frame longer than the MTU allows",
            NetDropReason::BadSlot => "descriptor names a frame slot it does not own",
            NetDropReason::BadRing => "ring is corrupt: the peer's index is impossible",
            NetDropReason::RingFull => "ring is full",
            NetDropReason::BadSource => "source MAC is not the sender's",
            NetDropReason::NoRoute => "no port has the destination MAC",
            NetDropReason::DeviceError => "device error",
            NetDropReason::Stale => "frame from a driver incarnation that is gone",
        })
    }
}

/// Why a region or its header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The region cannot hold the smallest layout.
    RegionTooSmall {
        /// Region length.
        len: usize,
        /// Smallest acceptable length ([`MIN_REGION`]).
        min: usize,
    },
    /// The magic is not `"NET1"` (for a guest: the driver has not initialised it yet).
    BadMagic {
        /// The magic field.
        found: u32,
    },
    /// A version other than [`VERSION`].
    UnsupportedVersion {
        /// The version field.
        found: u32,
    },
    /// The header's ring capacity is not the one [`Layout::new`] computes for this side's
    /// mapping (the two sides map different lengths, or the header is corrupt).
    CapacityMismatch {
        /// The capacity field.
        found: u32,
        /// What this side's layout says.
        expected: u32,
    },
    /// The MTU is outside [`MIN_MTU`]`..=`[`MAX_MTU`].
    BadMtu {
        /// The MTU field (or argument).
        found: u32,
    },
    /// Re-attaching ([`NetHeader::attach_driver`]): a ring's indexes are impossible (the
    /// guest wrote them while no driver was attached).
    CorruptRings,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::RegionTooSmall { len, min } => {
                write!(f, "net region is {len} bytes, at least {min} are needed")
            }
            LayoutError::BadMagic { found } => write!(f, "net region magic is {found:#010x}, not \"NET1\""),
            LayoutError::UnsupportedVersion { found } => {
                write!(f, "net region version {found} is not supported (only {VERSION})")
            }
            LayoutError::CapacityMismatch { found, expected } => {
                write!(f, "net ring capacity {found} does not match this mapping's {expected}")
            }
            LayoutError::BadMtu { found } => write!(f, "net MTU {found} is not in {MIN_MTU}..={MAX_MTU}"),
            LayoutError::CorruptRings => f.write_str("net rings left by the previous driver are corrupt"),
        }
    }
}

/// Rounds `x` up to a multiple of the power of two `align`; `None` on overflow.
const fn align_up(x: usize, align: usize) -> Option<usize> {
    match x.checked_add(align - 1) {
        Some(v) => Some(v & !(align - 1)),
        None => None,
    }
}

/// A region layout, computed from the region's length. The fields are private: every value
/// came from [`Layout::new`], so its areas are aligned, disjoint and inside `region_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    region_len: usize,
    ring_capacity: u32,
    rx_ring: usize,
    frames: usize,
}

impl Layout {
    /// The layout for a region of `region_len` bytes: the largest ring capacity (a power of
    /// two, at most [`MAX_RING_CAPACITY`]) whose rings and `2 * capacity` frame slots per
    /// direction fit. [`LayoutError::RegionTooSmall`] below [`MIN_REGION`].
    pub fn new(region_len: usize) -> Result<Self, LayoutError> {
        let mut capacity = MAX_RING_CAPACITY;
        while capacity >= 1 {
            if let Some(layout) = Self::with_capacity(region_len, capacity) {
                return Ok(layout);
            }
            capacity /= 2;
        }
        Err(LayoutError::RegionTooSmall { len: region_len, min: MIN_REGION })
    }

    /// The layout with `capacity` entries per ring, if it fits `region_len`.
    fn with_capacity(region_len: usize, capacity: u32) -> Option<Self> {
        let ring_len = ring::ring_size(capacity, DESC_SIZE)?;
        let rx_ring = align_up(TX_RING_OFFSET.checked_add(ring_len)?, RING_ALIGN)?;
        let frames = align_up(rx_ring.checked_add(ring_len)?, FRAMES_ALIGN)?;
        let slots = (capacity as usize).checked_mul(SLOTS_PER_ENTRY as usize)?;
        let frames_len = slots.checked_mul(FRAME_SLOT_SIZE)?.checked_mul(2)?;
        let end = frames.checked_add(frames_len)?;
        (end <= region_len).then_some(Self { region_len, ring_capacity: capacity, rx_ring, frames })
    }

    /// The region length this layout was computed for.
    pub fn region_len(&self) -> usize {
        self.region_len
    }

    /// Entries per ring (a power of two in `1..=MAX_RING_CAPACITY`).
    pub fn ring_capacity(&self) -> u32 {
        self.ring_capacity
    }

    /// Frame slots in each direction's half: `SLOTS_PER_ENTRY * ring_capacity`.
    pub fn slots_per_direction(&self) -> u32 {
        // At most 2 * 256.
        self.ring_capacity * SLOTS_PER_ENTRY
    }

    /// Offset of the TX ring ([`TX_RING_OFFSET`]).
    pub fn tx_ring_offset(&self) -> usize {
        TX_RING_OFFSET
    }

    /// Offset of the RX ring.
    pub fn rx_ring_offset(&self) -> usize {
        self.rx_ring
    }

    /// Offset of a direction's ring.
    pub fn ring_offset(&self, dir: Direction) -> usize {
        match dir {
            Direction::Tx => TX_RING_OFFSET,
            Direction::Rx => self.rx_ring,
        }
    }

    /// The frame area (both halves) as region offsets.
    pub fn frames_range(&self) -> Range<usize> {
        // Checked in `with_capacity` to end inside the region.
        self.frames..self.frames + 2 * self.half_len()
    }

    /// Bytes in one direction's half of the frame area.
    fn half_len(&self) -> usize {
        self.slots_per_direction() as usize * FRAME_SLOT_SIZE
    }

    /// A direction's half of the frame area as region offsets.
    pub fn half_range(&self, dir: Direction) -> Range<usize> {
        let start = match dir {
            Direction::Tx => self.frames,
            Direction::Rx => self.frames + self.half_len(),
        };
        start..start + self.half_len()
    }

    /// Frame slot `slot` of `dir`'s half as region offsets; `None` if there is no such slot.
    pub fn slot_range(&self, dir: Direction, slot: u32) -> Option<Range<usize>> {
        if slot >= self.slots_per_direction() {
            return None;
        }
        // `slot < slots_per_direction`, so this stays inside the half (checked to fit).
        let start = self.half_range(dir).start + slot as usize * FRAME_SLOT_SIZE;
        Some(start..start + FRAME_SLOT_SIZE)
    }

    /// The slot owned by the entry with free-running ring index `index`:
    /// `index % slots_per_direction` (a power of two, so continuous across `u32` wrap-around).
    pub fn slot_for_index(&self, index: u32) -> u32 {
        index & (self.slots_per_direction() - 1)
    }

    /// The driver VM's side: attaches to both rings as they are and returns the TX receiver
    /// and the RX sender; `mtu` is the driver's own (what it put in the header).
    pub fn driver_channel<'m, M: SharedMem + ?Sized>(
        &self,
        mem: &'m M,
        mtu: u32,
    ) -> Result<(FrameReceiver<'m, M>, FrameSender<'m, M>), RingError> {
        let tx = FrameReceiver::attach(mem, *self, Direction::Tx, mtu)?;
        let rx = FrameSender::attach(mem, *self, Direction::Rx, mtu)?;
        Ok((tx, rx))
    }

    /// The guest's side: attaches to both rings as they are and returns the TX sender and the
    /// RX receiver; `mtu` from the header the guest checked ([`NetHeader::check`]).
    pub fn guest_channel<'m, M: SharedMem + ?Sized>(
        &self,
        mem: &'m M,
        mtu: u32,
    ) -> Result<(FrameSender<'m, M>, FrameReceiver<'m, M>), RingError> {
        let tx = FrameSender::attach(mem, *self, Direction::Tx, mtu)?;
        let rx = FrameReceiver::attach(mem, *self, Direction::Rx, mtu)?;
        Ok((tx, rx))
    }
}

/// Longest frame allowed with `mtu`: `min(MAX_FRAME_LEN, mtu + 14)`.
pub fn max_frame_len(mtu: u32) -> usize {
    (mtu as usize).saturating_add(ETH_HEADER_LEN).min(MAX_FRAME_LEN)
}

/// A ring entry: which frame slot, and how many bytes of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Frame slot index in the direction's half.
    pub slot: u32,
    /// Frame length in bytes.
    pub len: u32,
}

impl Descriptor {
    /// The ring slot for this descriptor.
    pub fn encode(&self) -> [u8; DESC_SIZE] {
        let mut b = [0u8; DESC_SIZE];
        b[desc::SLOT..desc::SLOT + 4].copy_from_slice(&self.slot.to_le_bytes());
        b[desc::LEN..desc::LEN + 4].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes a ring slot. Total: every byte pattern is some descriptor; whether it makes
    /// sense is [`validate`]'s job. Reserved bytes are ignored.
    pub fn decode(b: &[u8; DESC_SIZE]) -> Self {
        let [s0, s1, s2, s3, l0, l1, l2, l3, ..] = *b;
        Self { slot: u32::from_le_bytes([s0, s1, s2, s3]), len: u32::from_le_bytes([l0, l1, l2, l3]) }
    }
}

/// Checks a decoded descriptor of direction `dir` against the layout and the MTU, and returns
/// the frame as a range of region offsets.
///
/// - `slot` not in `dir`'s half: [`NetDropReason::BadSlot`].
/// - `len < 14`: [`NetDropReason::TooShort`].
/// - `len > min(1514, mtu + 14)`: [`NetDropReason::TooLong`].
///
/// Whether the slot is the one the entry's ring index owns is checked by
/// [`FrameReceiver::recv`] (or by the caller, with [`Layout::slot_for_index`]). The returned
/// range lies inside the slot, hence inside `dir`'s half and the region. Never panics.
pub fn validate(d: &Descriptor, layout: &Layout, dir: Direction, mtu: u32) -> Result<Range<usize>, NetDropReason> {
    let slot = layout.slot_range(dir, d.slot).ok_or(NetDropReason::BadSlot)?;
    let len = usize::try_from(d.len).map_err(|_| NetDropReason::TooLong)?;
    if len < MIN_FRAME_LEN {
        return Err(NetDropReason::TooShort);
    }
    if len > max_frame_len(mtu) || len > FRAME_SLOT_SIZE {
        return Err(NetDropReason::TooLong);
    }
    let end = slot.start.checked_add(len).ok_or(NetDropReason::BadSlot)?;
    Ok(slot.start..end)
}

/// What the driver VM tells the guest in the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetHeader {
    /// The guest's MAC address (the driver's switch delivers frames for it to this channel
    /// and drops frames from the guest with any other source).
    pub mac: MacAddr,
    /// IP MTU, [`MIN_MTU`]`..=`[`MAX_MTU`].
    pub mtu: u32,
    /// Whether the link was up at init (later: [`set_link`], [`link_up`]).
    pub link_up: bool,
}

impl NetHeader {
    /// The driver VM's setup of a fresh region: checks that `layout` is the one for `mem`'s
    /// length and the MTU is valid, then writes the header (incarnation 1), zeroes the drop
    /// counters, empties both rings and writes the magic last (after a release fence).
    /// Writes nothing on error. A driver that may find the region already set up (it may be
    /// a restarted one) calls [`NetHeader::attach_driver`] instead.
    pub fn init<M: SharedMem + ?Sized>(&self, mem: &M, layout: &Layout) -> Result<(), LayoutError> {
        let expected = Layout::new(mem.len())?;
        if expected != *layout {
            return Err(LayoutError::CapacityMismatch {
                found: layout.ring_capacity(),
                expected: expected.ring_capacity(),
            });
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(LayoutError::BadMtu { found: self.mtu });
        }
        mem.write_u32(header::MAGIC, 0);
        mem.write_u32(header::VERSION, VERSION);
        mem.write_u32(header::RING_CAPACITY, layout.ring_capacity());
        mem.write_u32(header::MTU, self.mtu);
        mem.write_u32(header::LINK, u32::from(self.link_up));
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&self.mac.0);
        mem.write_bytes(header::MAC, &mac);
        DropCounters::default().publish(mem);
        mem.write_u32(header::RX_NO_DOORBELL, 0);
        mem.write_u32(header::TX_NO_DOORBELL, 0);
        mem.write_u32(header::INCARNATION, 1);
        for dir in [Direction::Tx, Direction::Rx] {
            // Fits: checked by `Layout::new` against `mem.len()` just above.
            Producer::<M, DESC_SIZE>::init(mem, layout.ring_offset(dir), layout.ring_capacity(), 0)
                .map_err(|_| LayoutError::RegionTooSmall { len: mem.len(), min: MIN_REGION })?;
        }
        fence(Ordering::Release);
        mem.write_u32(header::MAGIC, MAGIC);
        Ok(())
    }

    /// The guest's check: reads the header (each field once) and returns it with the layout
    /// for `mem`'s length. [`LayoutError::BadMagic`] until the driver has initialised it.
    pub fn check<M: SharedMem + ?Sized>(mem: &M) -> Result<(NetHeader, Layout), LayoutError> {
        let layout = Layout::new(mem.len())?;
        let magic = mem.read_u32(header::MAGIC);
        // Everything else is read after the magic: it was written before it.
        fence(Ordering::Acquire);
        if magic != MAGIC {
            return Err(LayoutError::BadMagic { found: magic });
        }
        let version = mem.read_u32(header::VERSION);
        if version != VERSION {
            return Err(LayoutError::UnsupportedVersion { found: version });
        }
        let capacity = mem.read_u32(header::RING_CAPACITY);
        if capacity != layout.ring_capacity() {
            return Err(LayoutError::CapacityMismatch { found: capacity, expected: layout.ring_capacity() });
        }
        let mtu = mem.read_u32(header::MTU);
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(LayoutError::BadMtu { found: mtu });
        }
        let mut mac = [0u8; 6];
        mem.read_bytes(header::MAC, &mut mac);
        let link_up = mem.read_u32(header::LINK) == 1;
        Ok((NetHeader { mac: MacAddr(mac), mtu, link_up }, layout))
    }

    /// The driver VM's attach, first or after a restart (see "Restarts"): if `mem` holds no
    /// valid header ([`NetHeader::check`]), [`NetHeader::init`] (incarnation 1); otherwise
    /// re-attach to the rings as they are, write this header's fields again and announce the
    /// next incarnation. Returns the incarnation, the TX receiver and the RX sender (which
    /// stamps the incarnation into every descriptor), and the drop counters found (zero on a
    /// fresh region), to continue counting from.
    ///
    /// Errors: the layout and MTU as [`NetHeader::init`] (nothing written);
    /// [`LayoutError::CorruptRings`] if a ring's indexes are impossible (nothing written: the
    /// guest broke its channel; the caller stops serving it).
    pub fn attach_driver<'m, M: SharedMem + ?Sized>(&self, mem: &'m M) -> Result<DriverAttach<'m, M>, LayoutError> {
        let layout = Layout::new(mem.len())?;
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(LayoutError::BadMtu { found: self.mtu });
        }
        let corrupt = |_| LayoutError::CorruptRings;
        let (incarnation, drops, fresh, (tx, mut rx)) = match NetHeader::check(mem) {
            Ok(_) => {
                // Both rings as they are, checked before anything is written.
                let rings = layout.driver_channel(mem, self.mtu).map_err(corrupt)?;
                self.write_fields(mem);
                let next = match mem.read_u32(header::INCARNATION).wrapping_add(1) {
                    0 => 1,
                    n => n,
                };
                // The header's fields before the incarnation that announces them.
                fence(Ordering::Release);
                mem.write_u32(header::INCARNATION, next);
                (next, DropCounters::read(mem), false, rings)
            }
            Err(_) => {
                self.init(mem, &layout)?;
                (1, DropCounters::default(), true, layout.driver_channel(mem, self.mtu).map_err(corrupt)?)
            }
        };
        rx.stamp = incarnation;
        Ok(DriverAttach { incarnation, fresh, tx, rx, drops })
    }

    /// Writes MTU, link and MAC, and the driver's no-doorbell word (0: ring; not the magic,
    /// version or capacity, nor the guest's no-doorbell word).
    fn write_fields<M: SharedMem + ?Sized>(&self, mem: &M) {
        mem.write_u32(header::TX_NO_DOORBELL, 0);
        mem.write_u32(header::MTU, self.mtu);
        mem.write_u32(header::LINK, u32::from(self.link_up));
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&self.mac.0);
        mem.write_bytes(header::MAC, &mac);
    }
}

/// What [`NetHeader::attach_driver`] returns.
#[derive(Debug)]
pub struct DriverAttach<'m, M: SharedMem + ?Sized> {
    /// This driver's incarnation on the channel (1: the first).
    pub incarnation: u32,
    /// Whether the region was set up afresh (no earlier incarnation's header was there).
    pub fresh: bool,
    /// The guest's TX ring (the driver receives).
    pub tx: FrameReceiver<'m, M>,
    /// The guest's RX ring (the driver sends; every descriptor carries `incarnation`).
    pub rx: FrameSender<'m, M>,
    /// The drop counters the header holds (continue counting from them).
    pub drops: DropCounters,
}

/// The guest: the incarnation of the driver attached now (0 for a region too small for a
/// header, or before the driver set it up).
pub fn incarnation<M: SharedMem + ?Sized>(mem: &M) -> u32 {
    if mem.len() < HEADER_PAGE_SIZE {
        return 0;
    }
    let n = mem.read_u32(header::INCARNATION);
    // Frames are read after the incarnation that announced their producer.
    fence(Ordering::Acquire);
    n
}

/// The driver VM: publishes the link state. `mem` must hold at least the header page (any
/// region a [`Layout`] was made for does).
pub fn set_link<M: SharedMem + ?Sized>(mem: &M, up: bool) {
    if mem.len() >= HEADER_PAGE_SIZE {
        mem.write_u32(header::LINK, u32::from(up));
    }
}

/// The guest: whether the driver says the link is up (any value but 1 is down; `false` for a
/// region too small for a header).
pub fn link_up<M: SharedMem + ?Sized>(mem: &M) -> bool {
    mem.len() >= HEADER_PAGE_SIZE && mem.read_u32(header::LINK) == 1
}

/// `"GONE"` at header +32 (the block channel's word and value): dom0 will not restart the
/// driver; no frame will move on the channel again.
pub const SERVER_GONE: u32 = crate::block::SERVER_GONE;

/// The guest: whether dom0 gave up on the channel's driver (header +32, see "Restarts");
/// `false` for a region too small for a header.
pub fn server_gone<M: SharedMem + ?Sized>(mem: &M) -> bool {
    mem.len() >= HEADER_PAGE_SIZE && mem.read_u32(header::SERVER) == SERVER_GONE
}

/// dom0's side: mark the driver as given up on (`gone`: also the link word down, for a
/// client that only looks at the link), or as coming back (the word cleared; the next
/// incarnation writes the link itself). dom0 rings the guest's doorbell after this, which
/// orders the stores before the guest's look.
pub fn mark_server_gone<M: SharedMem + ?Sized>(mem: &M, gone: bool) {
    if mem.len() < HEADER_PAGE_SIZE {
        return;
    }
    mem.write_u32(header::SERVER, if gone { SERVER_GONE } else { 0 });
    if gone {
        mem.write_u32(header::LINK, 0);
    }
}

/// Dropped frames by reason. The driver VM keeps its own copy, counts into it and publishes
/// it to the header (it never reads the header's copy back: the guest can write it); the
/// guest reads the published copy (informational) or keeps its own for its RX drops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    counts: [u32; DROP_COUNTERS],
}

impl DropCounters {
    /// Counts one dropped frame (wrapping).
    pub fn record(&mut self, reason: NetDropReason) {
        if let Some(c) = self.counts.get_mut(reason.code()) {
            *c = c.wrapping_add(1);
        }
    }

    /// Frames dropped for `reason` (modulo 2^32).
    pub fn get(&self, reason: NetDropReason) -> u32 {
        self.counts.get(reason.code()).copied().unwrap_or(0)
    }

    /// Frames dropped for any reason (modulo 2^32).
    pub fn total(&self) -> u32 {
        self.counts.iter().fold(0u32, |a, &c| a.wrapping_add(c))
    }

    /// Writes every counter into the header (one `u32` access each). Nothing if `mem` is
    /// smaller than the header page.
    pub fn publish<M: SharedMem + ?Sized>(&self, mem: &M) {
        if mem.len() < HEADER_PAGE_SIZE {
            return;
        }
        for (i, &c) in self.counts.iter().enumerate() {
            mem.write_u32(header::DROP_COUNTERS + 4 * i, c);
        }
    }

    /// Reads the counters from the header (all zero if `mem` is smaller than the header page).
    pub fn read<M: SharedMem + ?Sized>(mem: &M) -> Self {
        let mut out = Self::default();
        if mem.len() >= HEADER_PAGE_SIZE {
            for (i, c) in out.counts.iter_mut().enumerate() {
                *c = mem.read_u32(header::DROP_COUNTERS + 4 * i);
            }
        }
        out
    }
}

/// The producing half of one direction: writes frames into slots and publishes descriptors.
#[derive(Debug)]
pub struct FrameSender<'m, M: SharedMem + ?Sized> {
    mem: &'m M,
    layout: Layout,
    dir: Direction,
    mtu: u32,
    ring: Producer<'m, M, DESC_SIZE>,
    /// Written into every descriptor's incarnation field (the driver's incarnation on the RX
    /// ring; zero on the TX ring).
    stamp: u32,
}

impl<'m, M: SharedMem + ?Sized> FrameSender<'m, M> {
    /// Attaches to `dir`'s ring as its producer, continuing from the indexes in its header.
    pub fn attach(mem: &'m M, layout: Layout, dir: Direction, mtu: u32) -> Result<Self, RingError> {
        let ring = Producer::attach(mem, layout.ring_offset(dir), layout.ring_capacity())?;
        Ok(Self { mem, layout, dir, mtu, ring, stamp: 0 })
    }

    /// Copies `frame` into the slot of the next ring index and publishes its descriptor.
    /// Errors (nothing is published): [`NetDropReason::TooShort`] / [`NetDropReason::TooLong`]
    /// for the frame's length, [`NetDropReason::RingFull`] if the peer has not made room (try
    /// again after its doorbell), [`NetDropReason::BadRing`] if the ring is corrupt (sticky).
    /// The caller rings the peer's doorbell after a batch.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), NetDropReason> {
        if frame.len() < MIN_FRAME_LEN {
            return Err(NetDropReason::TooShort);
        }
        if frame.len() > max_frame_len(self.mtu) || frame.len() > FRAME_SLOT_SIZE {
            return Err(NetDropReason::TooLong);
        }
        if self.ring.free()? == 0 {
            return Err(NetDropReason::RingFull);
        }
        let slot = self.layout.slot_for_index(self.ring.index());
        let range = self.layout.slot_range(self.dir, slot).ok_or(NetDropReason::BadSlot)?;
        // The consumer has popped the entry `capacity` after this slot's previous use, so it
        // is done with it (see "Slot ownership"). `push` fences before publishing.
        self.mem.write_bytes(range.start, frame);
        let len = u32::try_from(frame.len()).map_err(|_| NetDropReason::TooLong)?;
        let mut entry = Descriptor { slot, len }.encode();
        entry[desc::INCARNATION..desc::INCARNATION + 4].copy_from_slice(&self.stamp.to_le_bytes());
        self.ring.push(&entry)?;
        Ok(())
    }

    /// Frames that can be sent now without [`NetDropReason::RingFull`].
    pub fn free(&mut self) -> Result<u32, RingError> {
        self.ring.free()
    }

    /// After a batch of [`FrameSender::send`]s: whether the consumer wants its doorbell
    /// rung. A full fence orders the descriptors published before the load of its
    /// no-doorbell word (see "Doorbells"); only [`NO_DOORBELL`] there says no.
    pub fn wants_doorbell(&self) -> bool {
        self.mem.full_fence();
        self.mem.read_u32(no_doorbell_offset(self.dir)) != NO_DOORBELL
    }

    /// Frames sent and not yet taken by the peer.
    pub fn in_flight(&mut self) -> Result<u32, RingError> {
        self.ring.len()
    }

    /// Whether the peer's index was found impossible (every send now fails).
    pub fn is_corrupt(&self) -> bool {
        self.ring.is_corrupt()
    }

    /// The direction this half sends in.
    pub fn direction(&self) -> Direction {
        self.dir
    }

    /// The incarnation written into every descriptor (see "Restarts").
    pub fn stamp(&self) -> u32 {
        self.stamp
    }
}

/// The consuming half of one direction: pops descriptors, checks them and copies frames out.
#[derive(Debug)]
pub struct FrameReceiver<'m, M: SharedMem + ?Sized> {
    mem: &'m M,
    layout: Layout,
    dir: Direction,
    mtu: u32,
    ring: Consumer<'m, M, DESC_SIZE>,
    /// The guest's RX side: the driver incarnation whose frames are taken
    /// ([`FrameReceiver::follow_incarnations`]); `None`: stamps are not looked at.
    incarnation: Option<u32>,
    /// Incarnation changes seen since [`FrameReceiver::follow_incarnations`].
    changes: u32,
}

impl<'m, M: SharedMem + ?Sized> FrameReceiver<'m, M> {
    /// Attaches to `dir`'s ring as its consumer, continuing from the indexes in its header.
    pub fn attach(mem: &'m M, layout: Layout, dir: Direction, mtu: u32) -> Result<Self, RingError> {
        let ring = Consumer::attach(mem, layout.ring_offset(dir), layout.ring_capacity())?;
        Ok(Self { mem, layout, dir, mtu, ring, incarnation: None, changes: 0 })
    }

    /// Takes the next frame: pops its descriptor, checks it ([`validate`], and that it names
    /// the slot its ring index owns) and copies the frame into the start of `buf`; returns
    /// its length, or `Ok(None)` if the ring is empty.
    ///
    /// An `Err` other than [`NetDropReason::BadRing`] means that one entry was consumed and
    /// dropped (count it, call again); [`NetDropReason::TooLong`] also when the frame does
    /// not fit `buf` (a [`MAX_FRAME_LEN`] buffer always fits). [`NetDropReason::BadRing`] is
    /// sticky: the peer's index is impossible and nothing more will be received.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetDropReason> {
        let index = self.ring.index();
        let Some(entry) = self.ring.pop()? else {
            return Ok(None);
        };
        let d = Descriptor::decode(&entry);
        if d.slot != self.layout.slot_for_index(index) {
            return Err(NetDropReason::BadSlot);
        }
        if self.incarnation.is_some() {
            let [a, b, c, e] = [0, 1, 2, 3].map(|i| entry[desc::INCARNATION + i]);
            let stamp = u32::from_le_bytes([a, b, c, e]);
            // The incarnation attached now (one load): a new one announced itself in the
            // header before its first frame; any other stamp is a frame a dead incarnation
            // left behind.
            self.check_incarnation();
            if self.incarnation != Some(stamp) {
                return Err(NetDropReason::Stale);
            }
        }
        let range = validate(&d, &self.layout, self.dir, self.mtu)?;
        let out = buf.get_mut(..range.len()).ok_or(NetDropReason::TooLong)?;
        // After `pop`'s acquire fence; the producer cannot reuse this slot before we pop the
        // entry `capacity` after this one.
        self.mem.read_bytes(range.start, out);
        Ok(Some(out.len()))
    }

    /// Frames waiting to be received.
    pub fn pending(&mut self) -> Result<u32, RingError> {
        self.ring.len()
    }

    /// Tells the producer not to ring this side's doorbell after it publishes frames: this
    /// side promises to call [`FrameReceiver::arm_doorbell`] before it next waits for it
    /// (see "Doorbells"). One store; any time.
    pub fn suppress_doorbells(&self) {
        self.mem.write_u32(no_doorbell_offset(self.dir), NO_DOORBELL);
    }

    /// Before waiting for the doorbell: asks the producer to ring it again, then, after a
    /// full fence, looks at the ring once more. `Ok(true)`: frames are waiting, so do not
    /// wait (take them first); `Ok(false)`: the ring was empty after the request was
    /// visible, so any frame published later is rung for. See "Doorbells" for why both
    /// the fence and the second look are needed.
    pub fn arm_doorbell(&mut self) -> Result<bool, RingError> {
        self.mem.write_u32(no_doorbell_offset(self.dir), 0);
        self.mem.full_fence();
        Ok(self.ring.len()? > 0)
    }

    /// The guest's RX side: from now on take only frames stamped with the incarnation of the
    /// driver attached at the time ([`incarnation`] in the header, read again for every
    /// frame: one load); others are dropped with [`NetDropReason::Stale`]. See "Restarts".
    pub fn follow_incarnations(&mut self) {
        self.incarnation = Some(incarnation(self.mem));
    }

    /// Reads the header's incarnation again (cheap: one load); whether it changed since this
    /// receiver last looked. Always `false` without [`FrameReceiver::follow_incarnations`].
    pub fn check_incarnation(&mut self) -> bool {
        let Some(known) = self.incarnation else { return false };
        let now = incarnation(self.mem);
        if now == known {
            return false;
        }
        self.incarnation = Some(now);
        self.changes = self.changes.wrapping_add(1);
        true
    }

    /// The driver incarnation whose frames are taken (`None` without
    /// [`FrameReceiver::follow_incarnations`]).
    pub fn incarnation(&self) -> Option<u32> {
        self.incarnation
    }

    /// How many times the incarnation changed since [`FrameReceiver::follow_incarnations`]:
    /// the driver restarts this receiver lived through (several restarts between two looks
    /// at the header count as one).
    pub fn incarnation_changes(&self) -> u32 {
        self.changes
    }

    /// Whether the peer's index was found impossible (every receive now fails).
    pub fn is_corrupt(&self) -> bool {
        self.ring.is_corrupt()
    }

    /// The direction this half receives from.
    pub fn direction(&self) -> Direction {
        self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::ByteMem;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::vec;
    use std::vec::Vec;

    const REGION: usize = 256 * 1024;
    const GUEST: MacAddr = MacAddr::local(1);

    fn header() -> NetHeader {
        NetHeader { mac: GUEST, mtu: 1500, link_up: true }
    }

    /// A frame of `len` bytes whose contents depend on `n`.
    fn frame(n: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len.max(ETH_HEADER_LEN)];
        let h = EthernetHeader { dst: MacAddr::BROADCAST, src: GUEST, ethertype: ETHERTYPE_IPV4 };
        f[..ETH_HEADER_LEN].copy_from_slice(&h.encode());
        for (i, b) in f[ETH_HEADER_LEN..].iter_mut().enumerate() {
            *b = (n as usize).wrapping_mul(31).wrapping_add(i) as u8;
        }
        f.truncate(len);
        f
    }

    #[test]
    fn wire_constants() {
        assert_eq!(&MAGIC.to_le_bytes(), b"NET1");
        assert_eq!(MAX_FRAME_LEN, 1514);
        for (i, r) in NetDropReason::ALL.iter().enumerate() {
            assert_eq!(r.code(), i);
        }
        assert_eq!(Descriptor::decode(&Descriptor { slot: 7, len: 1514 }.encode()), Descriptor { slot: 7, len: 1514 });
        assert_eq!(&Descriptor { slot: 0x0102_0304, len: 5 }.encode()[..8], &[4, 3, 2, 1, 5, 0, 0, 0]);
    }

    #[test]
    fn layouts() {
        assert_eq!(
            Layout::new(MIN_REGION - 1),
            Err(LayoutError::RegionTooSmall { len: MIN_REGION - 1, min: MIN_REGION })
        );
        assert_eq!(Layout::new(0), Err(LayoutError::RegionTooSmall { len: 0, min: MIN_REGION }));
        let l = Layout::new(MIN_REGION).unwrap();
        assert_eq!((l.ring_capacity(), l.slots_per_direction()), (1, 2));
        assert_eq!((l.tx_ring_offset(), l.rx_ring_offset(), l.frames_range()), (0x1000, 0x1040, 0x2000..0x4000));
        assert_eq!(l.half_range(Direction::Tx), 0x2000..0x3000);
        assert_eq!(l.half_range(Direction::Rx), 0x3000..0x4000);
        // 1 MiB: just short of capacity 128, so 64 (512 KiB of frame slots).
        let l = Layout::new(1 << 20).unwrap();
        assert_eq!(l.ring_capacity(), 64);
        // 1 MiB + 12 KiB: capacity 128 (128 * 2 * 2 * 2 KiB = 1 MiB of frames), no byte unused.
        assert_eq!(Layout::new((1 << 20) + 12 * 1024 - 1).unwrap().ring_capacity(), 64);
        let l = Layout::new((1 << 20) + 12 * 1024).unwrap();
        assert_eq!(l.ring_capacity(), 128);
        assert_eq!(l.frames_range(), 0x3000..(1 << 20) + 12 * 1024);
        assert_eq!(Layout::new((1 << 21) + 16 * 1024 - 1).unwrap().ring_capacity(), 128);
        assert_eq!(Layout::new((1 << 21) + 16 * 1024).unwrap().ring_capacity(), 256);
        // Large regions stop at MAX_RING_CAPACITY.
        let l = Layout::new(64 << 20).unwrap();
        assert_eq!(l.ring_capacity(), MAX_RING_CAPACITY);
        assert_eq!(l.rx_ring_offset(), 0x1000 + 0x1040);
        assert_eq!(l.frames_range(), 0x4000..0x4000 + (2 << 20));
        assert_eq!(Layout::new(usize::MAX).unwrap().ring_capacity(), MAX_RING_CAPACITY);
    }

    #[test]
    fn slots_and_indexes() {
        let l = Layout::new(REGION).unwrap();
        let n = l.slots_per_direction();
        assert_eq!(l.slot_for_index(0), 0);
        assert_eq!(l.slot_for_index(n + 3), 3);
        // Continuous across u32 wrap-around.
        assert_eq!(l.slot_for_index(u32::MAX), n - 1);
        assert_eq!(l.slot_for_index(u32::MAX.wrapping_add(1)), 0);
        let tx = l.half_range(Direction::Tx);
        assert_eq!(l.slot_range(Direction::Tx, 0), Some(tx.start..tx.start + 2048));
        assert_eq!(l.slot_range(Direction::Rx, n - 1).unwrap().end, l.half_range(Direction::Rx).end);
        assert_eq!(l.slot_range(Direction::Rx, n), None);
        assert_eq!(l.slot_range(Direction::Tx, u32::MAX), None);
    }

    #[test]
    fn validate_lengths_and_slots() {
        let l = Layout::new(REGION).unwrap();
        let n = l.slots_per_direction();
        let v = |slot, len, mtu| validate(&Descriptor { slot, len }, &l, Direction::Rx, mtu);
        let rx = l.half_range(Direction::Rx);
        assert_eq!(v(0, 14, 1500), Ok(rx.start..rx.start + 14));
        assert_eq!(v(n - 1, 1514, 1500), Ok(rx.end - 2048..rx.end - 2048 + 1514));
        assert_eq!(v(0, 13, 1500), Err(NetDropReason::TooShort));
        assert_eq!(v(0, 0, 1500), Err(NetDropReason::TooShort));
        assert_eq!(v(0, 1515, 1500), Err(NetDropReason::TooLong));
        assert_eq!(v(0, u32::MAX, 1500), Err(NetDropReason::TooLong));
        // A smaller MTU lowers the limit; a larger one does not raise it past 1514.
        assert_eq!(v(0, 590, 576), Ok(rx.start..rx.start + 590));
        assert_eq!(v(0, 591, 576), Err(NetDropReason::TooLong));
        assert_eq!(v(0, 1515, 9000), Err(NetDropReason::TooLong));
        assert_eq!(v(0, 1514, u32::MAX), Ok(rx.start..rx.start + 1514));
        // Slots outside the half.
        assert_eq!(v(n, 100, 1500), Err(NetDropReason::BadSlot));
        assert_eq!(v(u32::MAX, 100, 1500), Err(NetDropReason::BadSlot));
        assert_eq!(max_frame_len(0), 14);
    }

    #[test]
    fn mac_helpers() {
        assert!(MacAddr::BROADCAST.is_broadcast() && MacAddr::BROADCAST.is_multicast());
        assert!(!MacAddr::BROADCAST.is_unicast());
        let mcast = MacAddr([0x01, 0x00, 0x5E, 0x00, 0x00, 0x01]);
        assert!(mcast.is_multicast() && !mcast.is_broadcast() && !mcast.is_unicast());
        let global = MacAddr([0x00, 0x1B, 0x21, 0x12, 0x34, 0x56]);
        assert!(global.is_unicast() && !global.is_local());
        // QEMU's default 52:54:00:... is locally administered.
        assert!(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]).is_local());
        assert_eq!(MacAddr::local(0), MacAddr([0x02, 0x4D, 0, 0, 0, 0]));
        assert_eq!(MacAddr::local(0x0102_0304), MacAddr([0x02, 0x4D, 1, 2, 3, 4]));
        assert_eq!(std::format!("{}", MacAddr::local(0xAB)), "02:4d:00:00:00:ab");
        for i in [0, 1, 2, 255, 256, u32::MAX] {
            let m = MacAddr::local(i);
            assert!(m.is_unicast() && m.is_local() && !m.is_broadcast(), "{m}");
        }
    }

    #[test]
    fn ethernet_header() {
        let h = EthernetHeader { dst: MacAddr::BROADCAST, src: MacAddr::local(3), ethertype: ETHERTYPE_ARP };
        let b = h.encode();
        assert_eq!(&b[12..], &[0x08, 0x06]);
        assert_eq!(EthernetHeader::parse(&b), Some(h));
        let mut long = b.to_vec();
        long.extend_from_slice(&[9; 50]);
        assert_eq!(EthernetHeader::parse(&long), Some(h));
        assert_eq!(EthernetHeader::parse(&b[..13]), None);
        assert_eq!(EthernetHeader::parse(&[]), None);
    }

    #[test]
    fn header_init_and_check() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let l = Layout::new(REGION).unwrap();
        assert_eq!(NetHeader::check(&mem), Err(LayoutError::BadMagic { found: 0 }));
        header().init(&mem, &l).unwrap();
        assert_eq!(NetHeader::check(&mem), Ok((header(), l)));
        assert!(link_up(&mem));
        set_link(&mem, false);
        assert!(!link_up(&mem));
        assert!(!NetHeader::check(&mem).unwrap().0.link_up);

        let poke = |bytes: &mut Vec<u8>, at: usize, v: u32| bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let check = |bytes: &mut Vec<u8>| NetHeader::check(&ByteMem::new(bytes));
        poke(&mut bytes, header::VERSION, 2);
        assert_eq!(check(&mut bytes), Err(LayoutError::UnsupportedVersion { found: 2 }));
        poke(&mut bytes, header::VERSION, VERSION);
        poke(&mut bytes, header::RING_CAPACITY, 8);
        assert_eq!(check(&mut bytes), Err(LayoutError::CapacityMismatch { found: 8, expected: l.ring_capacity() }));
        poke(&mut bytes, header::RING_CAPACITY, l.ring_capacity());
        for mtu in [0, 67, 1501, u32::MAX] {
            poke(&mut bytes, header::MTU, mtu);
            assert_eq!(check(&mut bytes), Err(LayoutError::BadMtu { found: mtu }));
        }
        poke(&mut bytes, header::MTU, 68);
        assert!(check(&mut bytes).is_ok());
        poke(&mut bytes, header::LINK, 2);
        assert!(!check(&mut bytes).unwrap().0.link_up);
        // A guest that maps a shorter region than the driver: the capacity differs.
        let mut short = bytes[..REGION / 2].to_vec();
        assert!(matches!(check(&mut short), Err(LayoutError::CapacityMismatch { .. })));
        let mut tiny = bytes[..100].to_vec();
        assert_eq!(check(&mut tiny), Err(LayoutError::RegionTooSmall { len: 100, min: MIN_REGION }));
    }

    #[test]
    fn init_refuses_and_writes_nothing() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let other = Layout::new(REGION / 2).unwrap();
        assert!(matches!(header().init(&mem, &other), Err(LayoutError::CapacityMismatch { .. })));
        let l = Layout::new(REGION).unwrap();
        let bad = NetHeader { mtu: 9000, ..header() };
        assert_eq!(bad.init(&mem, &l), Err(LayoutError::BadMtu { found: 9000 }));
        assert!(bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn drop_counters() {
        let mut bytes = vec![0u8; MIN_REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut c = DropCounters::default();
        c.record(NetDropReason::TooLong);
        c.record(NetDropReason::TooLong);
        c.record(NetDropReason::NoRoute);
        assert_eq!((c.get(NetDropReason::TooLong), c.get(NetDropReason::TooShort), c.total()), (2, 0, 3));
        c.publish(&mem);
        assert_eq!(DropCounters::read(&mem), c);
        assert_eq!(mem.read_u32(header::DROP_COUNTERS + 4 * NetDropReason::NoRoute.code()), 1);
        // Too small a region: nothing happens, nothing panics.
        let mut small = [0u8; 16];
        let small = ByteMem::new(&mut small);
        c.publish(&small);
        set_link(&small, true);
        assert!(!link_up(&small));
        assert_eq!(DropCounters::read(&small), DropCounters::default());
    }

    /// Driver and guest over one region: both directions, full rings, bad descriptors.
    #[test]
    fn guest_and_driver_end_to_end() {
        let mut bytes = vec![0u8; MIN_REGION * 2];
        let mem = ByteMem::new(&mut bytes);
        let l = Layout::new(mem.len()).unwrap();
        assert_eq!(l.ring_capacity(), 2);
        header().init(&mem, &l).unwrap();
        let (mut tx_in, mut rx_out) = l.driver_channel(&mem, 1500).unwrap();
        let (h, gl) = NetHeader::check(&mem).unwrap();
        let (mut tx_out, mut rx_in) = gl.guest_channel(&mem, h.mtu).unwrap();
        let mut buf = [0u8; MAX_FRAME_LEN];

        assert_eq!(tx_out.send(&frame(0, 13)), Err(NetDropReason::TooShort));
        assert_eq!(tx_out.send(&frame(0, 1515)), Err(NetDropReason::TooLong));
        for round in 0..20u32 {
            tx_out.send(&frame(round, 14 + round as usize * 70)).unwrap();
            tx_out.send(&frame(round + 100, MAX_FRAME_LEN)).unwrap();
            assert_eq!(tx_out.send(&frame(0, 60)), Err(NetDropReason::RingFull));
            assert_eq!(tx_in.pending(), Ok(2));
            let n = tx_in.recv(&mut buf).unwrap().unwrap();
            assert_eq!(&buf[..n], &frame(round, 14 + round as usize * 70)[..]);
            // Echo it back to the guest.
            let echo = buf[..n].to_vec();
            rx_out.send(&echo).unwrap();
            let n = tx_in.recv(&mut buf).unwrap().unwrap();
            assert_eq!(&buf[..n], &frame(round + 100, MAX_FRAME_LEN)[..]);
            assert_eq!(tx_in.recv(&mut buf), Ok(None));
            let n = rx_in.recv(&mut buf).unwrap().unwrap();
            assert_eq!(&buf[..n], &echo[..]);
            assert_eq!(rx_in.recv(&mut buf), Ok(None));
        }
        // A receive buffer too small drops the frame and goes on.
        tx_out.send(&frame(1, 100)).unwrap();
        tx_out.send(&frame(2, 20)).unwrap();
        assert_eq!(tx_in.recv(&mut buf[..50]), Err(NetDropReason::TooLong));
        assert_eq!(tx_in.recv(&mut buf[..50]), Ok(Some(20)));

        // A hostile guest pushes descriptors by hand: wrong slot, other half, bad lengths.
        let ring = l.tx_ring_offset();
        let idx = mem.read_u32(ring + ring::PRODUCER_INDEX_OFFSET);
        let mut raw = TxProducer::attach(&mem, ring, l.ring_capacity()).unwrap();
        let own = l.slot_for_index(idx);
        raw.push(&Descriptor { slot: own + 1, len: 60 }.encode()).unwrap();
        raw.push(&Descriptor { slot: l.slot_for_index(idx + 1), len: 2000 }.encode()).unwrap();
        assert_eq!(tx_in.recv(&mut buf), Err(NetDropReason::BadSlot));
        assert_eq!(tx_in.recv(&mut buf), Err(NetDropReason::TooLong));
        raw.push(&Descriptor { slot: u32::MAX, len: 60 }.encode()).unwrap();
        raw.push(&Descriptor { slot: l.slot_for_index(idx + 3), len: 3 }.encode()).unwrap();
        assert_eq!(tx_in.recv(&mut buf), Err(NetDropReason::BadSlot));
        assert_eq!(tx_in.recv(&mut buf), Err(NetDropReason::TooShort));
        // Then a bad producer index: the driver's TX receiver stops for good, RX goes on.
        mem.write_u32(ring + ring::PRODUCER_INDEX_OFFSET, idx.wrapping_add(100));
        assert_eq!(tx_in.recv(&mut buf), Err(NetDropReason::BadRing));
        assert!(tx_in.is_corrupt());
        rx_out.send(&frame(5, 64)).unwrap();
        assert_eq!(rx_in.recv(&mut buf), Ok(Some(64)));
    }

    /// A driver that attaches to a fresh region, then "dies" (its handles dropped) with
    /// frames in flight both ways, `restarts` times: the guest keeps its rings, never sees them
    /// corrupt, gets every frame the guest queued while no driver ran, and drops exactly the
    /// RX frames the dead incarnations left behind.
    fn restart_scenario(in_flight: &[(usize, usize)]) {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let first = header().attach_driver(&mem).unwrap();
        assert!(first.fresh);
        assert_eq!((first.incarnation, incarnation(&mem)), (1, 1));
        let (h, gl) = NetHeader::check(&mem).unwrap();
        let (mut tx_out, mut rx_in) = gl.guest_channel(&mem, h.mtu).unwrap();
        rx_in.follow_incarnations();
        assert_eq!(rx_in.incarnation(), Some(1));
        let mut driver = Some(first);
        let mut buf = [0u8; MAX_FRAME_LEN];
        let mut n = 0u32;
        let cap = gl.ring_capacity() as usize;
        for (k, &(guest_queued, left_on_rx)) in in_flight.iter().enumerate() {
            // Room for all of them (and the new incarnation's first frame).
            let (guest_queued, left_on_rx) = (guest_queued.min(cap), left_on_rx.min(cap - 1));
            let mut d = driver.take().unwrap();
            // The dead incarnation's last frames: some the guest never took.
            for _ in 0..left_on_rx {
                d.rx.send(&frame(n, 60)).unwrap();
                n += 1;
            }
            // It records a drop, publishes it, and dies.
            d.drops.record(NetDropReason::NoRoute);
            d.drops.publish(&mem);
            let counted = d.drops;
            let _dead = d;
            // Meanwhile the guest queues frames for whoever comes next.
            let queued: Vec<Vec<u8>> = (0..guest_queued).map(|i| frame(1000 + i as u32, 100 + i)).collect();
            for f in &queued {
                tx_out.send(f).unwrap();
            }
            // The guest scribbles on the header fields the driver owns; the next one rewrites them.
            mem.write_u32(header::MTU, 576);
            mem.write_bytes(header::MAC, &[9; 6]);
            let mut next = header().attach_driver(&mem).unwrap();
            assert!(!next.fresh);
            assert_eq!(next.incarnation, k as u32 + 2);
            assert_eq!(incarnation(&mem), k as u32 + 2);
            assert_eq!(next.drops, counted, "drop counters continue");
            assert_eq!(NetHeader::check(&mem).unwrap().0, header(), "MAC and MTU as the driver says");
            // The frames the guest queued while no driver ran arrive, in order.
            for f in &queued {
                let len = next.tx.recv(&mut buf).unwrap().unwrap();
                assert_eq!(&buf[..len], &f[..]);
            }
            assert_eq!(next.tx.recv(&mut buf), Ok(None));
            // The new incarnation's frames come after the dead one's leftovers, which are dropped.
            next.rx.send(&frame(n, 70)).unwrap();
            for _ in 0..left_on_rx {
                assert_eq!(rx_in.recv(&mut buf), Err(NetDropReason::Stale));
            }
            assert_eq!(rx_in.recv(&mut buf), Ok(Some(70)));
            assert_eq!(&buf[..70], &frame(n, 70)[..]);
            n += 1;
            assert_eq!(rx_in.incarnation(), Some(k as u32 + 2));
            assert!(!tx_out.is_corrupt() && !rx_in.is_corrupt());
            driver = Some(next);
        }
        let changes = in_flight.len() as u32;
        assert_eq!(rx_in.incarnation_changes(), changes);
    }

    #[test]
    fn twenty_five_restarts_with_frames_in_flight() {
        let cap = Layout::new(REGION).unwrap().ring_capacity() as usize;
        let plan: Vec<(usize, usize)> = (0..25).map(|k| ((k * 7) % (cap + 1), (k * 5) % cap)).collect();
        restart_scenario(&plan);
    }

    #[test]
    fn frames_of_the_attached_incarnation_are_taken_until_a_successor_attaches() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut d = header().attach_driver(&mem).unwrap();
        let (h, gl) = NetHeader::check(&mem).unwrap();
        let (_, mut rx_in) = gl.guest_channel(&mem, h.mtu).unwrap();
        rx_in.follow_incarnations();
        let mut buf = [0u8; MAX_FRAME_LEN];
        d.rx.send(&frame(1, 60)).unwrap();
        d.rx.send(&frame(2, 61)).unwrap();
        assert_eq!(rx_in.recv(&mut buf), Ok(Some(60)));
        // The guest notices the restart from the header before any frame of the new one.
        let _dead = d;
        let mut d2 = header().attach_driver(&mem).unwrap();
        assert!(rx_in.check_incarnation());
        assert!(!rx_in.check_incarnation());
        assert_eq!(rx_in.recv(&mut buf), Err(NetDropReason::Stale));
        d2.rx.send(&frame(3, 62)).unwrap();
        assert_eq!(rx_in.recv(&mut buf), Ok(Some(62)));
        assert_eq!(rx_in.incarnation_changes(), 1);
        // A stamp that was never announced (a lying driver) is dropped too.
        let l = Layout::new(REGION).unwrap();
        let idx = mem.read_u32(l.rx_ring_offset() + ring::PRODUCER_INDEX_OFFSET);
        let mut raw = RxProducer::attach(&mem, l.rx_ring_offset(), l.ring_capacity()).unwrap();
        let mut e = Descriptor { slot: l.slot_for_index(idx), len: 60 }.encode();
        e[desc::INCARNATION] = 77;
        raw.push(&e).unwrap();
        assert_eq!(rx_in.recv(&mut buf), Err(NetDropReason::Stale));
        // A receiver that does not follow incarnations takes everything (the driver's TX side).
        let (_, mut plain) = l.guest_channel(&mem, 1500).unwrap();
        assert_eq!(plain.incarnation(), None);
        assert!(!plain.check_incarnation());
    }

    #[test]
    fn reattach_refuses_corrupt_rings_and_writes_nothing() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        header().attach_driver(&mem).unwrap();
        let l = Layout::new(REGION).unwrap();
        // The guest moved the RX producer index (the driver's) far ahead while no driver ran.
        mem.write_u32(l.rx_ring_offset() + ring::PRODUCER_INDEX_OFFSET, 1000);
        let other = NetHeader { mac: MacAddr::local(5), ..header() };
        assert_eq!(other.attach_driver(&mem).err(), Some(LayoutError::CorruptRings));
        assert_eq!(incarnation(&mem), 1);
        assert_eq!(NetHeader::check(&mem).unwrap().0.mac, GUEST);
        // A bad MTU is refused before anything is looked at.
        let bad = NetHeader { mtu: 20, ..header() };
        assert_eq!(bad.attach_driver(&mem).err(), Some(LayoutError::BadMtu { found: 20 }));
        // A region whose header the guest destroyed is set up afresh (its own loss).
        mem.write_u32(header::MAGIC, 0);
        let d = header().attach_driver(&mem).unwrap();
        assert!(d.fresh);
        assert_eq!(d.incarnation, 1);
    }

    #[test]
    fn dom0_marks_the_driver_gone_and_back_and_no_attach_touches_the_mark() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        assert!(!server_gone(&mem), "a zeroed region: not gone");
        header().attach_driver(&mem).unwrap();
        assert!(!server_gone(&mem) && link_up(&mem));
        mark_server_gone(&mem, true);
        assert!(server_gone(&mem));
        assert!(!link_up(&mem), "a client that reads only the link sees it down");
        assert_eq!(mem.read_u32(header::SERVER), SERVER_GONE);
        // The header still checks (the guest keeps its MAC), and a re-attach leaves the mark.
        assert_eq!(NetHeader::check(&mem).unwrap().0.mac, GUEST);
        header().attach_driver(&mem).unwrap();
        assert!(server_gone(&mem));
        // `ctl restart`: cleared before the next incarnation, which raises the link again.
        mark_server_gone(&mem, false);
        assert!(!server_gone(&mem));
        assert_eq!(header().attach_driver(&mem).unwrap().incarnation, 3);
        assert!(link_up(&mem));
        // Only the exact word counts; a small region is never gone and is not written.
        mem.write_u32(header::SERVER, SERVER_GONE ^ 1);
        assert!(!server_gone(&mem));
        let mut small = [0u8; 16];
        let small = ByteMem::new(&mut small);
        mark_server_gone(&small, true);
        assert!(!server_gone(&small));
    }

    #[test]
    fn the_incarnation_skips_zero_when_it_wraps() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        header().attach_driver(&mem).unwrap();
        mem.write_u32(header::INCARNATION, u32::MAX);
        assert_eq!(header().attach_driver(&mem).unwrap().incarnation, 1);
        assert_eq!(incarnation(&mem), 1);
        let mut small = [0u8; 16];
        assert_eq!(incarnation(&ByteMem::new(&mut small)), 0);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Send(usize),
        Recv,
    }

    proptest! {
        #[test]
        fn layout_invariants(len in prop_oneof![0usize..(4 << 20), Just(MIN_REGION), (1usize << 20)..(1usize << 27)]) {
            match Layout::new(len) {
                Err(e) => {
                    prop_assert!(len < MIN_REGION);
                    prop_assert_eq!(e, LayoutError::RegionTooSmall { len, min: MIN_REGION });
                }
                Ok(l) => {
                    prop_assert!(len >= MIN_REGION);
                    let cap = l.ring_capacity();
                    prop_assert!(ring::capacity_is_valid(cap) && cap <= MAX_RING_CAPACITY);
                    // The largest that fits.
                    prop_assert!(cap == MAX_RING_CAPACITY || Layout::with_capacity(len, cap * 2).is_none());
                    let ring_len = ring::ring_size(cap, DESC_SIZE).unwrap();
                    let areas = [
                        0..HEADER_PAGE_SIZE,
                        l.tx_ring_offset()..l.tx_ring_offset() + ring_len,
                        l.rx_ring_offset()..l.rx_ring_offset() + ring_len,
                        l.half_range(Direction::Tx),
                        l.half_range(Direction::Rx),
                    ];
                    for (i, a) in areas.iter().enumerate() {
                        prop_assert!(a.start < a.end && a.end <= len);
                        for b in &areas[i + 1..] {
                            prop_assert!(a.end <= b.start || b.end <= a.start, "{:?} overlaps {:?}", a, b);
                        }
                    }
                    prop_assert_eq!(l.rx_ring_offset() % RING_ALIGN, 0);
                    prop_assert_eq!(l.frames_range().start % FRAMES_ALIGN, 0);
                    prop_assert_eq!(l.slots_per_direction(), cap * SLOTS_PER_ENTRY);
                    prop_assert!(l.slots_per_direction().is_power_of_two());
                    prop_assert_eq!(l.half_range(Direction::Tx).end, l.half_range(Direction::Rx).start);
                    prop_assert_eq!(l.frames_range().end, l.half_range(Direction::Rx).end);
                    if len <= 4 << 20 {
                        let mut bytes = vec![0u8; len];
                        let mem = ByteMem::new(&mut bytes);
                        header().init(&mem, &l).unwrap();
                        prop_assert_eq!(NetHeader::check(&mem), Ok((header(), l)));
                        prop_assert!(l.driver_channel(&mem, 1500).is_ok());
                        prop_assert!(l.guest_channel(&mem, 1500).is_ok());
                    }
                }
            }
        }

        #[test]
        fn validated_ranges_stay_in_their_half(
            len in MIN_REGION..(3usize << 20),
            slot in prop_oneof![any::<u32>(), 0u32..600],
            flen in prop_oneof![any::<u32>(), 0u32..1600],
            mtu in prop_oneof![any::<u32>(), 0u32..1600],
            rx in any::<bool>(),
        ) {
            let l = Layout::new(len).unwrap();
            let dir = if rx { Direction::Rx } else { Direction::Tx };
            let d = Descriptor { slot, len: flen };
            match validate(&d, &l, dir, mtu) {
                Ok(r) => {
                    let half = l.half_range(dir);
                    prop_assert!(r.start >= half.start && r.end <= half.end && r.end <= len);
                    prop_assert_eq!(r.clone(), l.slot_range(dir, slot).unwrap().start..r.end);
                    prop_assert_eq!(r.len(), flen as usize);
                    prop_assert!(r.len() >= MIN_FRAME_LEN && r.len() <= max_frame_len(mtu));
                    prop_assert_eq!((r.start - half.start) % FRAME_SLOT_SIZE, 0);
                }
                Err(e) => prop_assert!(matches!(e, NetDropReason::BadSlot | NetDropReason::TooShort | NetDropReason::TooLong)),
            }
        }

        #[test]
        fn restarts_with_random_frames_in_flight(plan in proptest::collection::vec((0usize..=64, 0usize..64), 1..30)) {
            restart_scenario(&plan);
        }

        #[test]
        fn descriptor_decode_is_total(b in any::<[u8; DESC_SIZE]>()) {
            let d = Descriptor::decode(&b);
            let mut again = d.encode();
            again[8..].copy_from_slice(&b[8..]);
            prop_assert_eq!(again, b);
        }

        #[test]
        fn hostile_ring_contents_never_panic(
            region in prop_oneof![Just(MIN_REGION), Just(MIN_REGION * 2), Just(REGION)],
            junk in proptest::collection::vec((any::<u16>(), any::<u32>()), 0..64),
            steps in 0usize..40,
        ) {
            let mut bytes = vec![0u8; region];
            let mem = ByteMem::new(&mut bytes);
            let l = Layout::new(region).unwrap();
            header().init(&mem, &l).unwrap();
            let (mut tx_in, mut rx_out) = l.driver_channel(&mem, 1500).unwrap();
            let mut buf = [0u8; MAX_FRAME_LEN];
            // The guest scribbles on its TX ring (indexes and descriptors) and on the header.
            let ring_len = ring::ring_size(l.ring_capacity(), DESC_SIZE).unwrap();
            for (i, &(at, v)) in junk.iter().enumerate() {
                let off = if i % 4 == 0 { usize::from(at) % 256 } else { l.tx_ring_offset() + usize::from(at) % ring_len };
                mem.write_u32(off & !3, v);
                for _ in 0..steps / 8 {
                    match tx_in.recv(&mut buf) {
                        Ok(Some(n)) => prop_assert!((MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&n)),
                        Ok(None) => {}
                        Err(NetDropReason::BadRing) => prop_assert!(tx_in.is_corrupt()),
                        Err(e) => prop_assert!(matches!(e, NetDropReason::BadSlot | NetDropReason::TooShort | NetDropReason::TooLong)),
                    }
                    let _ = rx_out.send(&frame(i as u32, 60));
                }
            }
            let _ = NetHeader::check(&mem);
            let _ = DropCounters::read(&mem);
        }

        #[test]
        fn sender_and_receiver_match_a_queue(
            cap_region in prop_oneof![Just(MIN_REGION), Just(MIN_REGION * 2), Just(MIN_REGION * 4 + 4096)],
            start in prop_oneof![any::<u32>(), (u32::MAX - 40)..=u32::MAX],
            steps in proptest::collection::vec(
                prop_oneof![(0usize..1600).prop_map(Step::Send), Just(Step::Recv)], 0..200),
        ) {
            let mut bytes = vec![0u8; cap_region];
            let mem = ByteMem::new(&mut bytes);
            let l = Layout::new(cap_region).unwrap();
            header().init(&mem, &l).unwrap();
            // Start the TX ring near wrap-around.
            mem.write_u32(l.tx_ring_offset() + ring::PRODUCER_INDEX_OFFSET, start);
            mem.write_u32(l.tx_ring_offset() + ring::CONSUMER_INDEX_OFFSET, start);
            let (mut tx_out, _) = l.guest_channel(&mem, 1500).unwrap();
            let (mut tx_in, _) = l.driver_channel(&mem, 1500).unwrap();
            let cap = l.ring_capacity() as usize;
            let mut model = VecDeque::new();
            let mut buf = [0u8; MAX_FRAME_LEN];
            for (n, step) in steps.into_iter().enumerate() {
                match step {
                    Step::Send(len) => {
                        let f = frame(n as u32, len);
                        let r = tx_out.send(&f);
                        if len < MIN_FRAME_LEN {
                            prop_assert_eq!(r, Err(NetDropReason::TooShort));
                        } else if len > MAX_FRAME_LEN {
                            prop_assert_eq!(r, Err(NetDropReason::TooLong));
                        } else if model.len() == cap {
                            prop_assert_eq!(r, Err(NetDropReason::RingFull));
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            model.push_back(f);
                        }
                    }
                    Step::Recv => match model.pop_front() {
                        Some(f) => {
                            let got = tx_in.recv(&mut buf);
                            prop_assert_eq!(got, Ok(Some(f.len())));
                            prop_assert_eq!(&buf[..f.len()], &f[..]);
                        }
                        None => prop_assert_eq!(tx_in.recv(&mut buf), Ok(None)),
                    },
                }
                prop_assert_eq!(tx_out.in_flight().unwrap() as usize, model.len());
                prop_assert_eq!(tx_in.pending().unwrap() as usize, model.len());
            }
        }
    }

    /// A view of shared memory as one CPU of an x86 machine sees it: its stores wait in a
    /// FIFO store buffer (so they are seen by the other side in program order, late) until
    /// a full fence or [`TsoView::drain`]; its loads see its own buffered stores first. That
    /// is x86's memory model for ordinary accesses (TSO): the one reordering it allows is a
    /// load done before an earlier store to another place.
    struct TsoView<'a> {
        memory: &'a std::cell::RefCell<Vec<u8>>,
        buffer: std::cell::RefCell<VecDeque<(usize, Vec<u8>)>>,
    }

    impl<'a> TsoView<'a> {
        fn new(memory: &'a std::cell::RefCell<Vec<u8>>) -> Self {
            Self { memory, buffer: Default::default() }
        }

        /// The store buffer empties into memory (a fence, or just time passing).
        fn drain(&self) {
            let mut m = self.memory.borrow_mut();
            for (at, bytes) in self.buffer.borrow_mut().drain(..) {
                m[at..at + bytes.len()].copy_from_slice(&bytes);
            }
        }
    }

    impl SharedMem for TsoView<'_> {
        fn read_bytes(&self, offset: usize, out: &mut [u8]) {
            out.copy_from_slice(&self.memory.borrow()[offset..offset + out.len()]);
            // Store forwarding: this CPU sees its own buffered stores, the latest last.
            for (at, bytes) in self.buffer.borrow().iter() {
                for (i, b) in bytes.iter().enumerate() {
                    if let Some(o) = (at + i).checked_sub(offset).and_then(|k| out.get_mut(k)) {
                        *o = *b;
                    }
                }
            }
        }
        fn write_bytes(&self, offset: usize, data: &[u8]) {
            self.buffer.borrow_mut().push_back((offset, data.to_vec()));
        }
        fn len(&self) -> usize {
            self.memory.borrow().len()
        }
        fn full_fence(&self) {
            self.drain();
        }
    }

    /// The doorbell suppression of the RX ring (see "Doorbells"), run on memory that models
    /// x86's store buffer, with the worst timing: each side's stores stay buffered until its
    /// own fences, so the other side sees them as late as x86 allows. The guest was running
    /// (no doorbell wanted) and now prepares to wait ([`FrameReceiver::arm_doorbell`]) while
    /// the driver publishes a frame and decides whether to ring
    /// ([`FrameSender::wants_doorbell`]), in either order. The guest must either find the
    /// frame or be rung. Dropping the fence on either side, or the guest's second look at
    /// the ring, makes this fail (the store-buffering outcome: both miss each other).
    #[test]
    fn doorbell_suppression_loses_no_wake_up() {
        for driver_first in [false, true] {
            let memory = std::cell::RefCell::new(vec![0u8; REGION]);
            let (driver, guest) = (TsoView::new(&memory), TsoView::new(&memory));
            let attached = header().attach_driver(&driver).unwrap();
            driver.drain();
            let (_, layout) = NetHeader::check(&guest).unwrap();
            let (_, mut guest_rx) = layout.guest_channel(&guest, 1500).unwrap();
            let mut driver_rx = attached.rx;
            // The guest is running: it told the driver not to ring, and that is visible.
            guest_rx.suppress_doorbells();
            guest.drain();
            assert!(!driver_rx.wants_doorbell(), "a suppressed doorbell is not wanted");

            let mut found = false;
            let mut rung = false;
            let mut guest_prepares = |found: &mut bool| *found = guest_rx.arm_doorbell().unwrap();
            let mut driver_publishes = |rung: &mut bool| {
                driver_rx.send(&frame(1, 100)).unwrap();
                *rung = driver_rx.wants_doorbell();
            };
            if driver_first {
                driver_publishes(&mut rung);
                guest_prepares(&mut found);
            } else {
                guest_prepares(&mut found);
                driver_publishes(&mut rung);
            }
            assert!(found || rung, "lost wake-up (driver first: {driver_first}): the guest waits, nobody rings");
            // Afterwards everything is visible: the frame is there, and the guest, which
            // asked for a doorbell, gets one for the next frame.
            driver.drain();
            guest.drain();
            assert_eq!(guest_rx.pending().unwrap(), 1);
            assert!(driver_rx.wants_doorbell());
        }
    }

    #[test]
    fn no_doorbell_words_start_as_ring_and_survive_a_restart_as_the_guests() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        // Garbage where the words go: init makes them "ring".
        mem.write_u32(header::RX_NO_DOORBELL, NO_DOORBELL);
        mem.write_u32(header::TX_NO_DOORBELL, NO_DOORBELL);
        let first = header().attach_driver(&mem).unwrap();
        assert!(first.rx.wants_doorbell());
        assert_eq!(mem.read_u32(header::TX_NO_DOORBELL), 0);
        let (_, layout) = NetHeader::check(&mem).unwrap();
        let (guest_tx, guest_rx) = layout.guest_channel(&mem, 1500).unwrap();
        assert!(guest_tx.wants_doorbell());
        guest_rx.suppress_doorbells();
        mem.write_u32(header::TX_NO_DOORBELL, NO_DOORBELL);
        // A restarted driver keeps the guest's word and writes its own again.
        let second = header().attach_driver(&mem).unwrap();
        assert!(!second.rx.wants_doorbell());
        assert!(guest_tx.wants_doorbell());
        // Any value but NO_DOORBELL asks for the doorbell.
        mem.write_u32(header::RX_NO_DOORBELL, 7);
        assert!(second.rx.wants_doorbell());
    }
}
