//! The block-device channel: how a domain asks a disk driver VM to read and write sectors.
//!
//! The two sides share one memory region (mapped into both stage-2 spaces, at addresses each
//! side chooses; offsets below are from the region's start) and a doorbell notification each
//! way. The guest puts [`Request`]s on the request ring and rings the driver's doorbell; the
//! driver answers with [`Response`]s on the response ring and rings the guest's. Data buffers
//! live in the region's data area, so the device DMAs straight into (or out of) them.
//!
//! The driver treats the whole region as hostile: the guest can change any byte at any time.
//! So it reads the header once at attach time ([`BlockLayout::read`], which checks every
//! range), copies each request out of the ring once ([`crate::ring::Consumer::pop`]), decodes
//! the copy ([`Request::decode`], total) and checks it against the layout and the disk
//! ([`validate`]) before acting, then uses only the checked values in [`Validated`].
//!
//! # Region layout
//!
//! ```text
//! 0x0000  header page (4 KiB), u32 little endian, written by the guest (or dom0) at setup:
//!           +0   magic            = "BLK1" (bytes 42 4c 4b 31)
//!           +4   version          = 1
//!           +8   request ring offset   (RING_ALIGN-aligned)
//!           +12  response ring offset  (RING_ALIGN-aligned)
//!           +16  ring capacity         (entries per ring, power of two, <= 1024)
//!           +20  data offset           (4 KiB aligned)
//!           +24  data length           (bytes, > 0)
//!           +28  incarnation           written by the **driver** each time it attaches
//!                                      (0: no driver attached yet); see "Restarts"
//!           +32  server state          written by **dom0**: [`SERVER_GONE`] once it gave up
//!                                      restarting the driver (0 otherwise); see "Restarts"
//!           +36  attach index          written by the **driver** at attach, before the
//!                                      incarnation: the request-ring index it serves from
//!           +40  doorbell wanted       written by the **driver** (1 at setup by the guest):
//!                                      1 while it sleeps and would take requests if
//!                                      it looked; see "Doorbells"
//!           +44  last answer only      written by the **guest**: 1 while it has nothing
//!                                      more to send and wants only its last answer rung
//!                                      (any other value: 0); see "Doorbells"
//!           rest of the page reserved (ignored)
//!  ...    request ring, response ring: ring::HEADER_SIZE + capacity * SLOT_SIZE bytes each
//!  ...    data area: request buffers
//! ```
//!
//! The header page, the two rings and the data area must lie inside the region and must not
//! overlap. [`BlockLayout::standard`] puts the rings (64 entries) in pages 1 and 2 and gives
//! the rest to the data area.
//!
//! # Messages (one 32-byte ring slot each, little endian)
//!
//! ```text
//! request:                          response:
//!   +0  id          u64               +0  id                       u64  (the request's)
//!   +8  sector      u64               +8  capacity_sectors         u64  \
//!   +16 count       u32 (sectors)     +16 sector_size              u32   | GetInfo only,
//!   +20 data_offset u32 (region)      +20 max_sectors_per_request  u32   | zero otherwise
//!   +24 data_len    u32 (bytes)       +24 status                   u8    |
//!   +28 op          u8                +25 read_only                u8   /
//!   +29 reserved, written as zero     +26 reserved, written as zero
//!                                     +28 incarnation              u32 (the answering driver's)
//! ```
//!
//! Sectors are always [`SECTOR_SIZE`] (512) bytes, whatever the device's own block size.
//! `data_offset` is an offset from the start of the **region** (not of the data area) and
//! must fall inside the data area; `id` is chosen by the guest and only echoed. Reserved
//! bytes are ignored when decoding.
//!
//! # Setup
//!
//! 1. The guest (or dom0) picks a layout ([`BlockLayout::standard`]), writes it
//!    ([`BlockLayout::write`]) and creates both rings empty ([`BlockLayout::guest_rings`]),
//!    then starts or tells the driver (the IPC or doorbell that does so orders the writes).
//! 2. The driver reads and checks the layout once ([`BlockLayout::read`]) and attaches
//!    ([`BlockLayout::driver_rings`]), then announces itself ([`BlockLayout::driver_attach`]).
//!    Later changes to the header are never looked at.
//!
//! # Restarts
//!
//! A driver VM may die at any moment and be replaced (dom0 builds a new one on the same
//! regions). The protocol makes that invisible to the client except for delay:
//!
//! - Each driver, when it attaches, drops every request still waiting on the request ring
//!   ([`crate::ring::Consumer::skip_all`]) and then writes a new **incarnation** number
//!   (the old one plus one, never 0) at header +28 ([`BlockLayout::driver_attach`]). Every
//!   response it sends carries that number.
//! - Request ids are unique per client (it never reuses one), so a request may be executed
//!   more than once: reads and writes of the same buffer and sectors are idempotent, and so
//!   is a flush.
//! - The client keeps every request it has not seen answered (with its buffer untouched).
//!   When it sees the incarnation change, it sends again, oldest first, every one it put on
//!   the request ring below the **attach index** (header +36: the new driver's consumer
//!   index after the drop): those the dead driver took and never answered, and those the
//!   new one dropped. One it put at or above that index is on the new driver's ring already
//!   and is not sent twice: a second copy of a write could otherwise still be on the device
//!   after the client acknowledged the first and sent a later write to the same sectors,
//!   and land over it.
//!   Responses carrying any other incarnation than the one in the header, or an id that is
//!   not outstanding (a duplicate), are ignored ([`crate::block_client`]).
//! - When dom0 gives up on the driver (its restart limit), it writes [`SERVER_GONE`] at
//!   header +32 and rings the client's doorbell: the client then fails every outstanding
//!   request and every new one at once with a "server gone" error instead of waiting for
//!   an answer that cannot come. If dom0 builds the driver again later (`xtask ctl
//!   restart`), it clears the word first; the new incarnation is then served as usual.
//!
//! # Doorbells
//!
//! Each doorbell is a world switch, dearer under emulation than a request, so both sides
//! ring only when the other would otherwise not look. The driver asks for the client's
//! doorbell with a flag, "doorbell wanted" (header +40); the client decides from it
//! whether to ring. Sleep/wake flags are where lost wake-ups hide, so the rules are exact:
//!
//! **The driver, before it sleeps** (`driver-vms/disk`, `ask_for_doorbells`), for each
//! channel where it would take a request now if one were there (its device has room, no
//! flush or refused request holds the channel):
//!
//! 1. D1: stores 1 to the flag ([`BlockLayout::set_doorbell_wanted`]);
//! 2. D2: a full fence (`fence(SeqCst)`, an `MFENCE` on x86: a later load may otherwise
//!    be performed while the flag's store still sits in the store buffer: Intel SDM Vol. 3A,
//!    "Memory Ordering", "Loads May Be Reordered with Earlier Stores to Different
//!    Locations");
//! 3. D3: looks again: the request ring's producer index and the response ring's consumer
//!    index. If a request is waiting and a response slot is free for it (beyond those the
//!    requests on its device hold), it does not sleep but goes round again.
//!
//! It sleeps until an interrupt came after it read its interrupt count at the top of the
//! pass (a doorbell or a completion), and stores 0 when it wakes. With its device full it
//! sets no flag: the next completion wakes it and it looks at every ring then (a lost
//! completion interrupt is what its fallback timer is for, not a doorbell).
//!
//! **The client** (`block_client::Client::doorbell_needed`), after it pushed requests
//! (request producer index) **or took answers** (response consumer index), and at the
//! latest before it waits for answers:
//!
//! 1. C1: its stores to the indices (done);
//! 2. C2: a full fence ([`BlockLayout::doorbell_wanted`] starts with it);
//! 3. C3: loads the flag; if 1 and requests are still on the request ring, rings.
//!
//! **Why no wake-up is lost.** The fences are both `SeqCst`, so they are totally ordered.
//! If D2 comes before C2, the client's C3 sees the driver's 1 (or a later 0, stored only
//! by a driver already awake, which then runs D3 again before it sleeps) and rings; if C2
//! comes before D2, the driver's D3 sees the client's indices: the requests, and the slots
//! the answers taken freed. Either way the request is seen (Dekker's argument). Without
//! D2 or C2 both loads can read the old values (each store still in its store buffer)
//! and both sides sleep; without D3 a request pushed between the driver's last pass and
//! D1 is seen by nobody. The **check after taking answers** is what covers a driver that
//! stopped taking for want of a response slot: its requests wait on the ring, the client
//! takes answers and then waits for the rest; with the check only after pushing, nobody
//! rings (issue 9's "driver halted, nothing pending, guest waiting" stall, for a client
//! with more requests outstanding than response slots: answers left unread by a dead
//! incarnation count too). `block_wakeup_model.rs` (host test) explores every
//! interleaving of both sides on x86's memory model and finds a lost wake-up as soon as
//! either fence, D3 or the check after taking answers is removed.
//!
//! Both sides write their ring indexes once per batch ([`crate::ring::Producer::push_batched`],
//! [`crate::ring::Consumer::pop_batched`]: the index store comes when the batch ends, at the
//! latest when the half is dropped). The stores above are those: the client's C1 are done
//! before `doorbell_needed` (its ring halves are dropped by then), the driver's index
//! stores before D1 (its halves live for one `take_requests` or `complete`). A batch only
//! holds a store back over steps that neither fence nor look at that index, which is what a
//! store buffer may do to the per-entry stores anyway, so the model's interleavings cover it.
//!
//! A doorbell itself (a Signal hypercall, a VM exit) is ordered after the client's earlier
//! stores. Ringing anyway is always allowed (a client that ignores the flag works
//! unchanged); a client rings after replaying to a new incarnation whatever the flag says
//! (it may have been left by a dead one). The client's setup writes 1, so a client rings
//! until a driver has said otherwise.
//!
//! **The driver rings a client** once half of what the client has in flight with it
//! (answers not yet rung about, requests on the device, requests still on the ring) is
//! answered, so a client that keeps the ring full refills it while the device still works
//! on the rest; and whenever it has nothing of the client's left (the last answer). A ring
//! found due is sent when the driver next goes to sleep (the disk driver VM: with the halt,
//! one exit; a client of lower priority could not run before anyway). The
//! client's notification keeps its bits until the client waits, so an answer rung between
//! its look at the ring and its wait is not lost. A client with nothing more to send may
//! set "last answer only" (header +44): the driver then holds back the half-window ring
//! as long as the response ring has a slot for every answer it still owes the client
//! ([`may_hold_ring`]), and rings at the last one; a wake-up that would only show the
//! client answers it has no use for yet (each costs world switches) is saved. The flag is
//! a hint, read without ordering: the last answer rings whatever it says, and a driver
//! short of response slots rings at half the window whatever it says.
//!
//! # Durability
//!
//! A write answered `Ok` has been **completed by the device**, which may still hold it in a
//! volatile cache. It is **durable** only once a [`Op::Flush`] sent after the write's answer
//! was received has itself been answered `Ok` (FUA is not offered; a client that needs one
//! write durable sends it, waits for its answer, then flushes). The driver orders a flush
//! after every request of the channel it took before it, and answers it only after the device
//! completed the flush. Across a driver restart this holds because a completed write is held
//! by the device (or below it: the host's image file), which a driver restart resets but
//! does not empty; a flush interrupted by the restart is replayed like any other request, so
//! the client gets its `Ok` only from a flush the device completed.

use core::fmt;
use core::ops::Range;
use core::sync::atomic::{fence, Ordering};

use crate::ring::{self, Consumer, Producer, RingError, SharedMem};

/// The driver's rule for ringing a client ("The driver rings a client" in "Doorbells"):
/// `answered` answers pushed since its last ring, out of `window`, what the client has in
/// flight with it (those answers, requests on the device, requests still on the ring).
/// Rings once half the window is answered, which includes the last answer
/// (`answered == window`), so no client waits for an answer already on the ring. (Ringing
/// at three quarters instead, fewer wake-ups of a client that keeps the ring full, measured
/// no better on `bench blk`.)
///
/// `hold`: the half-window ring is held back ([`may_hold_ring`]: the client asked to be
/// rung at its last answer only, and the driver is not short of response slots); the
/// last answer rings whatever `hold` says.
pub fn ring_client_now(answered: u32, window: u32, hold: bool) -> bool {
    answered > 0 && (answered >= window || (!hold && u64::from(answered) * 2 >= u64::from(window)))
}

/// Whether the driver may hold back the half-window ring ("The driver rings a client" in
/// "Doorbells"): the client set "last answer only" (header +44, `last_only`, a hint it
/// writes when it has nothing more to send) and the response ring has a free slot for
/// every answer the driver still owes it (`free` slots, `owed` = its requests on the
/// device and still on the request ring), so the driver never waits for the client to
/// drain answers. A client whose hint is stale only gets rung earlier or later than it
/// asked, never not at all: the last answer always rings.
pub fn may_hold_ring(last_only: bool, free: u32, owed: u32) -> bool {
    last_only && free >= owed
}

/// `"BLK1"` as a little-endian `u32`: the bytes `42 4c 4b 31` at offset 0.
pub const MAGIC: u32 = u32::from_le_bytes(*b"BLK1");
/// The only layout version this module reads and writes.
pub const VERSION: u32 = 1;
/// Size of the header page at offset 0; nothing else may start inside it.
pub const HEADER_PAGE_SIZE: usize = 4096;
/// Alignment of the data area, so buffers can be mapped and DMA'd page by page.
pub const DATA_ALIGN: usize = 4096;
/// Alignment of each ring: a cache line, so the two rings' index words and the data area
/// never share one (a performance matter; [`ring::RING_ALIGN`] is what correctness needs).
pub const RING_ALIGN: usize = 64;
/// Size of a protocol sector; `sector` and `count` are in these units.
pub const SECTOR_SIZE: u32 = 512;
/// Bytes per ring slot: one request or one response.
pub const SLOT_SIZE: usize = 32;
/// Ring capacity used by [`BlockLayout::standard`].
pub const STANDARD_RING_CAPACITY: u32 = 64;
/// Ring capacity of [`BlockLayout::deep`]: for a client that keeps many requests in flight
/// (a sliding window over a data area of a few MiB). The driver is rung back once half of
/// a client's window is answered (`ring_client_now`), so the deeper the ring, the fewer
/// wake-ups of the client per request: each costs two exits and two world switches.
pub const DEEP_RING_CAPACITY: u32 = 256;
/// Smallest region [`BlockLayout::standard`] accepts: header, two ring pages, one data page.
pub const STANDARD_MIN_REGION: usize = 4 * 4096;

/// Offsets of the header fields.
pub mod header {
    /// `u32`: [`super::MAGIC`].
    pub const MAGIC: usize = 0;
    /// `u32`: [`super::VERSION`].
    pub const VERSION: usize = 4;
    /// `u32`: offset of the request ring.
    pub const REQUEST_RING: usize = 8;
    /// `u32`: offset of the response ring.
    pub const RESPONSE_RING: usize = 12;
    /// `u32`: entries per ring.
    pub const RING_CAPACITY: usize = 16;
    /// `u32`: offset of the data area.
    pub const DATA_OFFSET: usize = 20;
    /// `u32`: length of the data area in bytes.
    pub const DATA_LEN: usize = 24;
    /// `u32`: the attached driver's incarnation (0: none yet), written by the driver.
    pub const INCARNATION: usize = 28;
    /// `u32`: [`super::SERVER_GONE`] once dom0 gave up on the driver, else 0.
    pub const SERVER: usize = 32;
    /// `u32`: the request-ring index the attached driver serves from (written at attach).
    pub const ATTACH_INDEX: usize = 36;
    /// `u32`: 1 while the driver sleeps and would take requests (ring it), written by the
    /// driver; see "Doorbells".
    pub const DOORBELL_WANTED: usize = 40;
    /// `u32`: 1 while the client wants to be rung only at its last answer (it has nothing
    /// more to send), written by the client; see "Doorbells" and [`super::may_hold_ring`].
    pub const LAST_ANSWER_ONLY: usize = 44;
}

/// `"GONE"` at header +32: dom0 will not restart the driver; requests cannot be answered.
pub const SERVER_GONE: u32 = u32::from_le_bytes(*b"GONE");

/// Offsets of the request fields inside a slot.
pub mod request {
    /// `u64`
    pub const ID: usize = 0;
    /// `u64`
    pub const SECTOR: usize = 8;
    /// `u32`
    pub const COUNT: usize = 16;
    /// `u32`
    pub const DATA_OFFSET: usize = 20;
    /// `u32`
    pub const DATA_LEN: usize = 24;
    /// `u8`
    pub const OP: usize = 28;
}

/// Offsets of the response fields inside a slot.
pub mod response {
    /// `u64`
    pub const ID: usize = 0;
    /// `u64`
    pub const CAPACITY_SECTORS: usize = 8;
    /// `u32`
    pub const SECTOR_SIZE: usize = 16;
    /// `u32`
    pub const MAX_SECTORS_PER_REQUEST: usize = 20;
    /// `u8`
    pub const STATUS: usize = 24;
    /// `u8`
    pub const READ_ONLY: usize = 25;
    /// `u32`
    pub const INCARNATION: usize = 28;
}

/// The guest's half of the request ring.
pub type RequestProducer<'m, M> = Producer<'m, M, SLOT_SIZE>;
/// The driver's half of the request ring.
pub type RequestConsumer<'m, M> = Consumer<'m, M, SLOT_SIZE>;
/// The driver's half of the response ring.
pub type ResponseProducer<'m, M> = Producer<'m, M, SLOT_SIZE>;
/// The guest's half of the response ring.
pub type ResponseConsumer<'m, M> = Consumer<'m, M, SLOT_SIZE>;

/// A part of the region, for errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Area {
    /// The header page at offset 0.
    Header,
    /// The request ring.
    RequestRing,
    /// The response ring.
    ResponseRing,
    /// The data area.
    Data,
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Area::Header => "header page",
            Area::RequestRing => "request ring",
            Area::ResponseRing => "response ring",
            Area::Data => "data area",
        })
    }
}

/// Why a region layout was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The region is too small for even the header page (or, for
    /// [`BlockLayout::standard`], for the standard layout).
    RegionTooSmall {
        /// Region length.
        len: usize,
        /// Smallest acceptable length.
        min: usize,
    },
    /// The magic is not `"BLK1"`.
    BadMagic {
        /// The magic field.
        found: u32,
    },
    /// A version other than [`VERSION`].
    UnsupportedVersion {
        /// The version field.
        found: u32,
    },
    /// The ring capacity is not a power of two in `1..=ring::MAX_CAPACITY`.
    BadRingCapacity {
        /// The capacity field.
        found: u32,
    },
    /// An area starts at an offset that is not a multiple of its alignment.
    Misaligned {
        /// Which area.
        area: Area,
        /// Its offset.
        offset: u32,
        /// Required alignment.
        align: usize,
    },
    /// An area does not lie entirely inside the region.
    OutsideRegion {
        /// Which area.
        area: Area,
        /// Its first byte.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// Region length.
        region_len: usize,
    },
    /// Two areas share bytes.
    Overlap {
        /// One area.
        a: Area,
        /// The other.
        b: Area,
    },
    /// The data area is empty.
    EmptyData,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::RegionTooSmall { len, min } => {
                write!(f, "block region is {len} bytes, at least {min} are needed")
            }
            LayoutError::BadMagic { found } => write!(f, "block region magic is {found:#010x}, not \"BLK1\""),
            LayoutError::UnsupportedVersion { found } => {
                write!(f, "block region version {found} is not supported (only {VERSION})")
            }
            LayoutError::BadRingCapacity { found } => {
                write!(f, "block ring capacity {found} is not a power of two between 1 and {}", ring::MAX_CAPACITY)
            }
            LayoutError::Misaligned { area, offset, align } => {
                write!(f, "{area} at {offset:#x} is not {align}-byte aligned")
            }
            LayoutError::OutsideRegion { area, start, end, region_len } => {
                write!(f, "{area} {start:#x}..{end:#x} is outside the {region_len:#x}-byte region")
            }
            LayoutError::Overlap { a, b } => write!(f, "{a} overlaps {b}"),
            LayoutError::EmptyData => f.write_str("block data area is empty"),
        }
    }
}

/// A checked region layout. Every value of this type has passed the checks of
/// [`BlockLayout::new`] against some region length, so its areas are aligned, disjoint and
/// (for that length) inside the region; the fields are private to keep it that way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    request_ring: u32,
    response_ring: u32,
    ring_capacity: u32,
    data_offset: u32,
    data_len: u32,
}

impl BlockLayout {
    /// Checks a layout for a region of `region_len` bytes: ring capacity valid; rings
    /// [`RING_ALIGN`]-aligned and the data area [`DATA_ALIGN`]-aligned; data area non-empty;
    /// header page, both rings and data area inside the region and pairwise disjoint. All
    /// arithmetic is in `u64` from `u32` fields, so nothing can overflow.
    pub fn new(
        request_ring: u32,
        response_ring: u32,
        ring_capacity: u32,
        data_offset: u32,
        data_len: u32,
        region_len: usize,
    ) -> Result<Self, LayoutError> {
        if region_len < HEADER_PAGE_SIZE {
            return Err(LayoutError::RegionTooSmall { len: region_len, min: HEADER_PAGE_SIZE });
        }
        if !ring::capacity_is_valid(ring_capacity) {
            return Err(LayoutError::BadRingCapacity { found: ring_capacity });
        }
        for (area, offset, align) in [
            (Area::RequestRing, request_ring, RING_ALIGN),
            (Area::ResponseRing, response_ring, RING_ALIGN),
            (Area::Data, data_offset, DATA_ALIGN),
        ] {
            if !(offset as usize).is_multiple_of(align) {
                return Err(LayoutError::Misaligned { area, offset, align });
            }
        }
        if data_len == 0 {
            return Err(LayoutError::EmptyData);
        }
        // `ring_capacity <= 1024`, so this is at most 32 KiB + 8.
        let ring_len = u64::from(ring_capacity) * SLOT_SIZE as u64 + ring::HEADER_SIZE as u64;
        let areas = [
            (Area::Header, 0u64, HEADER_PAGE_SIZE as u64),
            (Area::RequestRing, u64::from(request_ring), u64::from(request_ring) + ring_len),
            (Area::ResponseRing, u64::from(response_ring), u64::from(response_ring) + ring_len),
            (Area::Data, u64::from(data_offset), u64::from(data_offset) + u64::from(data_len)),
        ];
        let region_end = region_len as u64;
        for &(area, start, end) in &areas {
            if end > region_end {
                return Err(LayoutError::OutsideRegion { area, start, end, region_len });
            }
        }
        for (i, &(a, a_start, a_end)) in areas.iter().enumerate() {
            for &(b, b_start, b_end) in areas.iter().skip(i + 1) {
                if a_start < b_end && b_start < a_end {
                    return Err(LayoutError::Overlap { a, b });
                }
            }
        }
        Ok(Self { request_ring, response_ring, ring_capacity, data_offset, data_len })
    }

    /// The usual layout for a region of `region_len` bytes: request ring at 0x1000, response
    /// ring at 0x2000 (64 entries each), data area from 0x3000 to the end of the region
    /// (rounded down to whole sectors, and to the first 4 GiB, which is all a request's
    /// `u32` data offset can reach).
    pub fn standard(region_len: usize) -> Result<Self, LayoutError> {
        if region_len < STANDARD_MIN_REGION {
            return Err(LayoutError::RegionTooSmall { len: region_len, min: STANDARD_MIN_REGION });
        }
        Self::paged(region_len, STANDARD_RING_CAPACITY)
    }

    /// The layout for a client that keeps up to [`DEEP_RING_CAPACITY`] requests in flight:
    /// as [`Self::standard`], with each ring in whole pages of its own (request ring at
    /// 0x1000, response ring after it, data area after that), if the region's data area
    /// then holds at least 2 KiB per ring entry (a 1 MiB channel qualifies); else the
    /// standard layout (a deeper ring could hardly be kept full).
    pub fn deep(region_len: usize) -> Result<Self, LayoutError> {
        let ring_pages = Self::ring_pages(DEEP_RING_CAPACITY) as usize;
        let min = (1 + 2 * ring_pages) * 4096 + DEEP_RING_CAPACITY as usize * 2048;
        if region_len < min {
            return Self::standard(region_len);
        }
        Self::paged(region_len, DEEP_RING_CAPACITY)
    }

    /// Pages one ring of `capacity` entries takes.
    const fn ring_pages(capacity: u32) -> u64 {
        (capacity as u64 * SLOT_SIZE as u64 + ring::HEADER_SIZE as u64).div_ceil(4096)
    }

    /// Header page, request ring, response ring (each in whole pages), data area to the
    /// end of the region (rounded down to whole sectors, and to the first 4 GiB).
    fn paged(region_len: usize, capacity: u32) -> Result<Self, LayoutError> {
        let ring = Self::ring_pages(capacity) * 4096;
        let data = 4096 + 2 * ring;
        let end = (region_len as u64).min(1 << 32);
        let data_len =
            end.checked_sub(data).ok_or(LayoutError::EmptyData)? / u64::from(SECTOR_SIZE) * u64::from(SECTOR_SIZE);
        let data_len = u32::try_from(data_len).map_err(|_| LayoutError::EmptyData)?;
        Self::new(0x1000, (4096 + ring) as u32, capacity, data as u32, data_len, region_len)
    }

    /// Reads the header of `mem` (each field once, into locals) and checks it against
    /// `mem.len()`. The driver calls this once at attach and never looks at the header again.
    pub fn read<M: SharedMem + ?Sized>(mem: &M) -> Result<Self, LayoutError> {
        let region_len = mem.len();
        if region_len < HEADER_PAGE_SIZE {
            return Err(LayoutError::RegionTooSmall { len: region_len, min: HEADER_PAGE_SIZE });
        }
        let magic = mem.read_u32(header::MAGIC);
        let version = mem.read_u32(header::VERSION);
        let request_ring = mem.read_u32(header::REQUEST_RING);
        let response_ring = mem.read_u32(header::RESPONSE_RING);
        let ring_capacity = mem.read_u32(header::RING_CAPACITY);
        let data_offset = mem.read_u32(header::DATA_OFFSET);
        let data_len = mem.read_u32(header::DATA_LEN);
        fence(Ordering::Acquire);
        if magic != MAGIC {
            return Err(LayoutError::BadMagic { found: magic });
        }
        if version != VERSION {
            return Err(LayoutError::UnsupportedVersion { found: version });
        }
        Self::new(request_ring, response_ring, ring_capacity, data_offset, data_len, region_len)
    }

    /// Writes the header into `mem` (the guest's or dom0's setup step). Fails, writing
    /// nothing, if the layout does not fit `mem`.
    pub fn write<M: SharedMem + ?Sized>(&self, mem: &M) -> Result<(), LayoutError> {
        self.check_fits(mem)?;
        mem.write_u32(header::VERSION, VERSION);
        mem.write_u32(header::REQUEST_RING, self.request_ring);
        mem.write_u32(header::RESPONSE_RING, self.response_ring);
        mem.write_u32(header::RING_CAPACITY, self.ring_capacity);
        mem.write_u32(header::DATA_OFFSET, self.data_offset);
        mem.write_u32(header::DATA_LEN, self.data_len);
        // No driver has said anything yet: ring.
        mem.write_u32(header::DOORBELL_WANTED, 1);
        mem.write_u32(header::LAST_ANSWER_ONLY, 0);
        // Magic last: a reader that sees it sees a complete header.
        fence(Ordering::Release);
        mem.write_u32(header::MAGIC, MAGIC);
        Ok(())
    }

    /// Re-checks this layout against `mem`'s length (it was checked against some length
    /// when created, not necessarily this one).
    fn check_fits<M: SharedMem + ?Sized>(&self, mem: &M) -> Result<(), LayoutError> {
        Self::new(self.request_ring, self.response_ring, self.ring_capacity, self.data_offset, self.data_len, mem.len())
            .map(|_| ())
    }

    /// The guest's setup: makes both rings empty (indexes 0) and returns the request
    /// producer and the response consumer. Fails with [`RingError::BadLayout`] if a ring does
    /// not fit `mem`.
    pub fn guest_rings<'m, M: SharedMem + ?Sized>(
        &self,
        mem: &'m M,
    ) -> Result<(RequestProducer<'m, M>, ResponseConsumer<'m, M>), RingError> {
        let requests = Producer::init(mem, self.request_ring_offset(), self.ring_capacity, 0)?;
        let responses = Consumer::init(mem, self.response_ring_offset(), self.ring_capacity, 0)?;
        Ok((requests, responses))
    }

    /// The guest's request ring after [`Self::guest_rings`], attached at the indexes in the
    /// header (its own producer index, the driver's consumer index), so a client need not
    /// keep the halves alive between requests (nor read the other ring's indexes).
    pub fn guest_requests_attach<'m, M: SharedMem + ?Sized>(
        &self,
        mem: &'m M,
    ) -> Result<RequestProducer<'m, M>, RingError> {
        Producer::attach(mem, self.request_ring_offset(), self.ring_capacity)
    }

    /// The guest's response ring alone (see [`Self::guest_requests_attach`]).
    pub fn guest_responses_attach<'m, M: SharedMem + ?Sized>(
        &self,
        mem: &'m M,
    ) -> Result<ResponseConsumer<'m, M>, RingError> {
        Consumer::attach(mem, self.response_ring_offset(), self.ring_capacity)
    }

    /// The driver's side: attaches to both rings as they are (continuing after a restart)
    /// and returns the request consumer and the response producer. [`RingError::Corrupt`]
    /// if the guest left an impossible ring header.
    pub fn driver_rings<'m, M: SharedMem + ?Sized>(
        &self,
        mem: &'m M,
    ) -> Result<(RequestConsumer<'m, M>, ResponseProducer<'m, M>), RingError> {
        Ok((self.driver_requests_attach(mem)?, self.driver_responses_attach(mem)?))
    }

    /// The driver's request ring alone, as [`Self::driver_rings`] attaches it (the driver
    /// only looking whether requests wait need not read and check the other ring).
    pub fn driver_requests_attach<'m, M: SharedMem + ?Sized>(
        &self,
        mem: &'m M,
    ) -> Result<RequestConsumer<'m, M>, RingError> {
        Consumer::attach(mem, self.request_ring_offset(), self.ring_capacity)
    }

    /// The driver's response ring alone (answering completions needs no request ring).
    pub fn driver_responses_attach<'m, M: SharedMem + ?Sized>(
        &self,
        mem: &'m M,
    ) -> Result<ResponseProducer<'m, M>, RingError> {
        Producer::attach(mem, self.response_ring_offset(), self.ring_capacity)
    }

    /// The driver's announcement at (re)attach: drops the requests waiting on the request
    /// ring (the client replays them) and writes the next incarnation number into the
    /// header, after the drop is published. Returns the new incarnation, which every
    /// response of this driver carries.
    pub fn driver_attach<M: SharedMem + ?Sized>(&self, mem: &M) -> Result<u32, RingError> {
        let (mut requests, _) = self.driver_rings(mem)?;
        requests.skip_all()?;
        let next = match mem.read_u32(header::INCARNATION).wrapping_add(1) {
            0 => 1,
            n => n,
        };
        mem.write_u32(header::ATTACH_INDEX, requests.index());
        // The skip (our consumer index) and the attach index must be visible before the new
        // incarnation: a client that sees the incarnation replays into a ring that has room,
        // and only what we dropped.
        fence(Ordering::Release);
        mem.write_u32(header::INCARNATION, next);
        Ok(next)
    }

    /// The request-ring index the attached driver serves from (header +36): requests the
    /// client put below it were dropped or taken by a dead incarnation. Read after
    /// [`Self::incarnation`].
    pub fn attach_index<M: SharedMem + ?Sized>(mem: &M) -> u32 {
        mem.read_u32(header::ATTACH_INDEX)
    }

    /// Whether dom0 gave up on the channel's driver (header +32, see "Restarts").
    pub fn server_gone<M: SharedMem + ?Sized>(mem: &M) -> bool {
        mem.read_u32(header::SERVER) == SERVER_GONE
    }

    /// dom0's side: mark the driver as given up on (`gone`), or as coming back. dom0 rings
    /// the client's doorbell after this, which orders the store before the client's look.
    pub fn set_server_gone<M: SharedMem + ?Sized>(mem: &M, gone: bool) {
        mem.write_u32(header::SERVER, if gone { SERVER_GONE } else { 0 });
    }

    /// The incarnation of the driver attached now (0: none yet), as the client reads it.
    pub fn incarnation<M: SharedMem + ?Sized>(mem: &M) -> u32 {
        let n = mem.read_u32(header::INCARNATION);
        // Responses read after this must not be older than this read.
        fence(Ordering::Acquire);
        n
    }

    /// The driver, before it sleeps (`true`, when it could take requests now: D1 and D2
    /// of "Doorbells") and when it wakes (`false`): whether a client that pushed requests
    /// or took answers must ring its doorbell. Ends with a full fence: a driver that wrote
    /// `true` must then look at the rings once more (D3) before it sleeps.
    pub fn set_doorbell_wanted<M: SharedMem + ?Sized>(mem: &M, wanted: bool) {
        mem.write_u32(header::DOORBELL_WANTED, u32::from(wanted));
        // The flag's store must be visible before the driver's next look at the producer
        // index (a load, which x86 may otherwise perform first).
        fence(Ordering::SeqCst);
    }

    /// The client, after it pushed requests or took answers: whether the driver asked for
    /// its doorbell. Starts with a full fence (C2 of "Doorbells"), so the indices it
    /// stored are visible to the driver before the flag is read.
    pub fn doorbell_wanted<M: SharedMem + ?Sized>(mem: &M) -> bool {
        fence(Ordering::SeqCst);
        mem.read_u32(header::DOORBELL_WANTED) != 0
    }

    /// The client: ring me only at my last answer (`true`: I have nothing more to send
    /// for now), or at half my window as usual (`false`); see [`may_hold_ring`]. A hint:
    /// no fence, a driver that reads the old value rings earlier or later, never not at
    /// all.
    pub fn set_last_answer_only<M: SharedMem + ?Sized>(mem: &M, on: bool) {
        mem.write_u32(header::LAST_ANSWER_ONLY, u32::from(on));
    }

    /// The driver: whether the client asked to be rung at its last answer only.
    pub fn last_answer_only<M: SharedMem + ?Sized>(mem: &M) -> bool {
        mem.read_u32(header::LAST_ANSWER_ONLY) == 1
    }

    /// Offset of the request ring.
    pub fn request_ring_offset(&self) -> usize {
        self.request_ring as usize
    }

    /// Offset of the response ring.
    pub fn response_ring_offset(&self) -> usize {
        self.response_ring as usize
    }

    /// Entries per ring.
    pub fn ring_capacity(&self) -> u32 {
        self.ring_capacity
    }

    /// Offset of the data area.
    pub fn data_offset(&self) -> usize {
        self.data_offset as usize
    }

    /// Length of the data area in bytes.
    pub fn data_len(&self) -> usize {
        self.data_len as usize
    }

    /// The data area as a range of region offsets.
    pub fn data_range(&self) -> Range<usize> {
        // Checked in `new` to end inside the region, whose length is a `usize`.
        self.data_offset()..self.data_offset() + self.data_len()
    }
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Describe the disk (the response carries a [`DiskInfo`]).
    GetInfo,
    /// Read sectors into the buffer.
    Read,
    /// Write the buffer to sectors.
    Write,
    /// Make earlier completed writes durable.
    Flush,
    /// A code this version does not know; [`validate`] answers [`Status::BadRequest`].
    Unknown(u8),
}

impl Op {
    /// The wire code.
    pub const fn code(self) -> u8 {
        match self {
            Op::GetInfo => 0,
            Op::Read => 1,
            Op::Write => 2,
            Op::Flush => 3,
            Op::Unknown(code) => code,
        }
    }

    /// The op for a wire code (total: unknown codes become [`Op::Unknown`]).
    pub const fn from_code(code: u8) -> Self {
        match code {
            0 => Op::GetInfo,
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            other => Op::Unknown(other),
        }
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok,
    /// Malformed: unknown op, zero sectors, or more than `max_sectors_per_request`.
    BadRequest,
    /// The sector range goes past the end of the disk.
    OutOfRange,
    /// The buffer is not inside the data area, not sector-aligned, or its length is not
    /// `count * 512`.
    BadBuffer,
    /// The device failed.
    IoError,
    /// The disk cannot do this (e.g. a write to a read-only disk).
    Unsupported,
    /// A code this version does not know (only produced by [`Response::decode`]).
    Unknown(u8),
}

impl Status {
    /// The wire code.
    pub const fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::BadRequest => 1,
            Status::OutOfRange => 2,
            Status::BadBuffer => 3,
            Status::IoError => 4,
            Status::Unsupported => 5,
            Status::Unknown(code) => code,
        }
    }

    /// The status for a wire code (total: unknown codes become [`Status::Unknown`]).
    pub const fn from_code(code: u8) -> Self {
        match code {
            0 => Status::Ok,
            1 => Status::BadRequest,
            2 => Status::OutOfRange,
            3 => Status::BadBuffer,
            4 => Status::IoError,
            5 => Status::Unsupported,
            other => Status::Unknown(other),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Ok => f.write_str("ok"),
            Status::BadRequest => f.write_str("bad request"),
            Status::OutOfRange => f.write_str("sector range past the end of the disk"),
            Status::BadBuffer => f.write_str("bad data buffer"),
            Status::IoError => f.write_str("I/O error"),
            Status::Unsupported => f.write_str("not supported by this disk"),
            Status::Unknown(code) => write!(f, "unknown status {code}"),
        }
    }
}

/// What the driver knows about its disk; sent in answer to [`Op::GetInfo`] and used by
/// [`validate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size of the disk in 512-byte sectors.
    pub capacity_sectors: u64,
    /// The device's own block size in bytes (informational: the protocol always counts
    /// 512-byte sectors; a guest aligns to this for speed).
    pub sector_size: u32,
    /// Most sectors one read or write may move.
    pub max_sectors_per_request: u32,
    /// Whether writes are refused ([`validate`] answers [`Status::Unsupported`]).
    pub read_only: bool,
}

fn get_u64(b: &[u8; SLOT_SIZE], at: usize) -> u64 {
    b.get(at..at + 8).and_then(|s| <[u8; 8]>::try_from(s).ok()).map_or(0, u64::from_le_bytes)
}

fn get_u32(b: &[u8; SLOT_SIZE], at: usize) -> u32 {
    b.get(at..at + 4).and_then(|s| <[u8; 4]>::try_from(s).ok()).map_or(0, u32::from_le_bytes)
}

fn get_u8(b: &[u8; SLOT_SIZE], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// A slot from its four words, each little endian.
fn words_to_slot(words: [u64; SLOT_SIZE / 8]) -> [u8; SLOT_SIZE] {
    let mut b = [0u8; SLOT_SIZE];
    for (bytes, w) in b.chunks_exact_mut(8).zip(words) {
        bytes.copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// A request as decoded from a ring slot: raw, unchecked values (see [`validate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the guest, echoed in the response.
    pub id: u64,
    /// What to do.
    pub op: Op,
    /// First sector (Read/Write).
    pub sector: u64,
    /// Number of sectors (Read/Write).
    pub count: u32,
    /// Region offset of the buffer (Read/Write).
    pub data_offset: u32,
    /// Buffer length in bytes, `count * 512` (Read/Write).
    pub data_len: u32,
}

impl Request {
    /// A request without a buffer (GetInfo, Flush).
    pub const fn simple(id: u64, op: Op) -> Self {
        Self { id, op, sector: 0, count: 0, data_offset: 0, data_len: 0 }
    }

    /// The ring slot for this request.
    pub fn encode(&self) -> [u8; SLOT_SIZE] {
        // As four little-endian words (the fields in the layout above, reserved bytes
        // zero): four stores, which the ring's 8-byte slot copy then loads as they are.
        words_to_slot([
            self.id,
            self.sector,
            u64::from(self.count) | u64::from(self.data_offset) << 32,
            u64::from(self.data_len) | u64::from(self.op.code()) << 32,
        ])
    }

    /// Decodes a ring slot. Total: every byte pattern is some request (an unknown op is
    /// [`Op::Unknown`]); whether it makes sense is [`validate`]'s job.
    pub fn decode(b: &[u8; SLOT_SIZE]) -> Self {
        Self {
            id: get_u64(b, request::ID),
            op: Op::from_code(get_u8(b, request::OP)),
            sector: get_u64(b, request::SECTOR),
            count: get_u32(b, request::COUNT),
            data_offset: get_u32(b, request::DATA_OFFSET),
            data_len: get_u32(b, request::DATA_LEN),
        }
    }
}

/// A response as carried in a ring slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// How it ended.
    pub status: Status,
    /// For a successful GetInfo, the disk; all zero otherwise.
    pub info: DiskInfo,
    /// The answering driver's incarnation (see "Restarts" above).
    pub incarnation: u32,
}

impl Response {
    /// A response without disk information.
    pub fn new(id: u64, status: Status) -> Self {
        Self { id, status, info: DiskInfo::default(), incarnation: 0 }
    }

    /// This response, sent by the driver of `incarnation`.
    pub fn from(self, incarnation: u32) -> Self {
        Self { incarnation, ..self }
    }

    /// A successful GetInfo response.
    pub fn info(id: u64, info: DiskInfo) -> Self {
        Self { id, status: Status::Ok, info, incarnation: 0 }
    }

    /// The ring slot for this response.
    pub fn encode(&self) -> [u8; SLOT_SIZE] {
        // As four little-endian words, as [`Request::encode`].
        words_to_slot([
            self.id,
            self.info.capacity_sectors,
            u64::from(self.info.sector_size) | u64::from(self.info.max_sectors_per_request) << 32,
            u64::from(self.status.code())
                | u64::from(u8::from(self.info.read_only)) << 8
                | u64::from(self.incarnation) << 32,
        ])
    }

    /// Decodes a ring slot. Total: unknown status codes are [`Status::Unknown`], any
    /// non-zero `read_only` byte is `true`.
    pub fn decode(b: &[u8; SLOT_SIZE]) -> Self {
        Self {
            id: get_u64(b, response::ID),
            status: Status::from_code(get_u8(b, response::STATUS)),
            info: DiskInfo {
                capacity_sectors: get_u64(b, response::CAPACITY_SECTORS),
                sector_size: get_u32(b, response::SECTOR_SIZE),
                max_sectors_per_request: get_u32(b, response::MAX_SECTORS_PER_REQUEST),
                read_only: get_u8(b, response::READ_ONLY) != 0,
            },
            incarnation: get_u32(b, response::INCARNATION),
        }
    }
}

/// A checked read or write: sectors inside the disk, buffer inside the data area.
///
/// Only [`validate`] makes these (private fields), so holding one is proof of the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    sector: u64,
    count: u32,
    data_offset: usize,
    data_len: usize,
}

impl Transfer {
    /// First sector.
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// Number of sectors, at least 1 and at most the disk's `max_sectors_per_request`.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// One past the last sector; at most the disk's capacity.
    pub fn end_sector(&self) -> u64 {
        // Checked in `validate` not to overflow.
        self.sector + u64::from(self.count)
    }

    /// Region offset of the buffer (512-aligned, inside the data area).
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Buffer length: `count * 512`.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// The buffer as a range of region offsets, inside the data area.
    pub fn data_range(&self) -> Range<usize> {
        // Checked in `validate` to end inside the data area.
        self.data_offset..self.data_offset + self.data_len
    }
}

/// A request that passed [`validate`]: what the driver may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validated {
    /// Answer with [`Response::info`].
    GetInfo,
    /// Read the sectors into the buffer.
    Read(Transfer),
    /// Write the buffer to the sectors.
    Write(Transfer),
    /// Flush the device's write cache.
    Flush,
}

/// Checks a decoded request against the layout and the disk; the error is the status to
/// answer with.
///
/// - Unknown op: [`Status::BadRequest`]. GetInfo and Flush ignore the other fields.
/// - Write to a read-only disk: [`Status::Unsupported`].
/// - Read/Write with `count == 0` or `count > max_sectors_per_request`:
///   [`Status::BadRequest`].
/// - `sector + count` overflowing or past `capacity_sectors`: [`Status::OutOfRange`]
///   (so the last sector of the disk is reachable, one past it is not).
/// - `data_len != count * 512`, `data_offset` not 512-aligned, or
///   `data_offset..data_offset + data_len` not inside the data area: [`Status::BadBuffer`].
///
/// All arithmetic is checked or done in `u64` from narrower fields, so no input can make it
/// overflow, and the ranges in the returned [`Transfer`] are exactly the checked ones.
pub fn validate(req: &Request, layout: &BlockLayout, disk: DiskInfo) -> Result<Validated, Status> {
    let write = match req.op {
        Op::GetInfo => return Ok(Validated::GetInfo),
        Op::Flush => return Ok(Validated::Flush),
        Op::Read => false,
        Op::Write => true,
        Op::Unknown(_) => return Err(Status::BadRequest),
    };
    if write && disk.read_only {
        return Err(Status::Unsupported);
    }
    if req.count == 0 || req.count > disk.max_sectors_per_request {
        return Err(Status::BadRequest);
    }
    let end_sector = req.sector.checked_add(u64::from(req.count)).ok_or(Status::OutOfRange)?;
    if end_sector > disk.capacity_sectors {
        return Err(Status::OutOfRange);
    }
    // `count < 2^32`, so `count * 512 < 2^41`: no overflow in u64.
    if u64::from(req.data_len) != u64::from(req.count) * u64::from(SECTOR_SIZE) {
        return Err(Status::BadBuffer);
    }
    if !req.data_offset.is_multiple_of(SECTOR_SIZE) {
        return Err(Status::BadBuffer);
    }
    let start = u64::from(req.data_offset);
    let end = start + u64::from(req.data_len);
    let area_start = u64::from(layout.data_offset);
    let area_end = area_start + u64::from(layout.data_len);
    if start < area_start || end > area_end {
        return Err(Status::BadBuffer);
    }
    let transfer = Transfer {
        sector: req.sector,
        count: req.count,
        data_offset: usize::try_from(start).map_err(|_| Status::BadBuffer)?,
        data_len: usize::try_from(req.data_len).map_err(|_| Status::BadBuffer)?,
    };
    Ok(if write { Validated::Write(transfer) } else { Validated::Read(transfer) })
}

/// The self-test pattern: what the demo guest writes to `sector` and the end-to-end tests
/// expect to find in the disk image. Every sector differs (its number is in it) and no two
/// bytes in a row repeat, so a misplaced or torn write shows.
pub fn pattern(sector: u64, out: &mut [u8; 512]) {
    out[..8].copy_from_slice(b"MVBLKPAT");
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    let mut x = sector.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in out[16..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::ByteMem;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    const REGION: usize = 64 * 1024;

    fn disk() -> DiskInfo {
        DiskInfo { capacity_sectors: 1000, sector_size: 512, max_sectors_per_request: 64, read_only: false }
    }

    fn layout() -> BlockLayout {
        BlockLayout::standard(REGION).unwrap()
    }

    fn rw(op: Op, sector: u64, count: u32, data_offset: u32) -> Request {
        Request { id: 7, op, sector, count, data_offset, data_len: count * 512 }
    }

    fn header_bytes(fields: [u32; 7], len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        for (i, f) in fields.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&f.to_le_bytes());
        }
        b
    }

    #[test]
    fn ring_client_at_half_the_window_and_at_the_last_answer() {
        assert!(!ring_client_now(0, 0, false));
        assert!(!ring_client_now(0, 5, false));
        assert!(ring_client_now(1, 1, false));
        assert!(!ring_client_now(1, 3, false));
        assert!(ring_client_now(2, 4, false));
        assert!(!ring_client_now(31, 64, false));
        assert!(ring_client_now(32, 64, false));
        assert!(ring_client_now(u32::MAX, u32::MAX, false));
        // Held back: only the last answer rings.
        assert!(!ring_client_now(32, 64, true));
        assert!(!ring_client_now(63, 64, true));
        assert!(ring_client_now(64, 64, true));
        assert!(ring_client_now(1, 1, true));
        assert!(!ring_client_now(0, 0, true));
    }

    #[test]
    fn the_ring_is_held_back_only_if_asked_and_no_answer_waits_for_a_slot() {
        assert!(may_hold_ring(true, 128, 128));
        assert!(may_hold_ring(true, 200, 10));
        assert!(!may_hold_ring(true, 127, 128), "the driver would wait for the client to drain");
        assert!(!may_hold_ring(false, 256, 0));
        let mut bytes = vec![0u8; 64 * 1024];
        let mem = ByteMem::new(&mut bytes);
        BlockLayout::standard(mem.len()).unwrap().write(&mem).unwrap();
        assert!(!BlockLayout::last_answer_only(&mem), "a fresh header asks for the usual rings");
        BlockLayout::set_last_answer_only(&mem, true);
        assert!(BlockLayout::last_answer_only(&mem));
        BlockLayout::set_last_answer_only(&mem, false);
        assert!(!BlockLayout::last_answer_only(&mem));
    }

    #[test]
    fn wire_constants() {
        assert_eq!(&MAGIC.to_le_bytes(), b"BLK1");
        assert_eq!(ring::ring_size(STANDARD_RING_CAPACITY, SLOT_SIZE), Some(8 + 64 * 32));
        // The largest ring still fits the format's arithmetic comfortably.
        assert_eq!(ring::ring_size(ring::MAX_CAPACITY, SLOT_SIZE), Some(8 + 32 * 1024));
    }

    #[test]
    fn deep_layout_gives_each_ring_its_pages_and_falls_back_when_small() {
        let l = BlockLayout::deep(4160 * 1024).unwrap();
        assert_eq!(l.ring_capacity(), DEEP_RING_CAPACITY);
        // 256 slots of 32 bytes and the ring header: three pages per ring.
        assert_eq!((l.request_ring_offset(), l.response_ring_offset(), l.data_offset()), (0x1000, 0x4000, 0x7000));
        assert_eq!(l.data_len(), 4160 * 1024 - 0x7000);
        assert_eq!(BlockLayout::deep(1024 * 1024).unwrap().ring_capacity(), DEEP_RING_CAPACITY);
        // Too small for 2 KiB per entry: the standard layout.
        let small = BlockLayout::deep(512 * 1024).unwrap();
        assert_eq!(small, BlockLayout::standard(512 * 1024).unwrap());
        assert_eq!(small.ring_capacity(), STANDARD_RING_CAPACITY);
    }

    #[test]
    fn standard_layout_round_trips() {
        for len in [STANDARD_MIN_REGION, REGION, 1 << 20, (1 << 20) + 100, 5 << 30] {
            let l = BlockLayout::standard(len).unwrap();
            assert_eq!((l.request_ring_offset(), l.response_ring_offset(), l.data_offset()), (0x1000, 0x2000, 0x3000));
            assert_eq!(l.ring_capacity(), 64);
            assert!(l.data_range().end <= len.min(1 << 32));
            assert_eq!(l.data_len() % 512, 0);
            if len < 1 << 30 {
                let mut bytes = vec![0u8; len];
                let mem = ByteMem::new(&mut bytes);
                l.write(&mem).unwrap();
                assert_eq!(BlockLayout::read(&mem), Ok(l));
            }
        }
        assert_eq!(
            BlockLayout::standard(STANDARD_MIN_REGION - 1),
            Err(LayoutError::RegionTooSmall { len: STANDARD_MIN_REGION - 1, min: STANDARD_MIN_REGION })
        );
    }

    #[test]
    fn write_refuses_a_region_too_small() {
        let l = layout();
        let mut bytes = vec![0u8; 8192];
        let mem = ByteMem::new(&mut bytes);
        assert!(matches!(l.write(&mem), Err(LayoutError::OutsideRegion { .. })));
        assert!(bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn read_rejects_bad_headers() {
        let good = [MAGIC, VERSION, 0x1000, 0x2000, 64, 0x3000, 0x1000];
        let check = |fields: [u32; 7], len: usize| {
            let mut b = header_bytes(fields, len);
            BlockLayout::read(&ByteMem::new(&mut b))
        };
        assert!(check(good, 0x4000).is_ok());
        assert_eq!(check(good, 100), Err(LayoutError::RegionTooSmall { len: 100, min: 4096 }));
        let with = |i: usize, v: u32| {
            let mut f = good;
            f[i] = v;
            f
        };
        assert_eq!(check(with(0, 0x314b_4c41), 0x4000), Err(LayoutError::BadMagic { found: 0x314b_4c41 }));
        assert_eq!(check(with(1, 2), 0x4000), Err(LayoutError::UnsupportedVersion { found: 2 }));
        for cap in [0, 3, 2048, u32::MAX] {
            assert_eq!(check(with(4, cap), 0x4000), Err(LayoutError::BadRingCapacity { found: cap }));
        }
        assert_eq!(
            check(with(2, 0x1004), 0x4000),
            Err(LayoutError::Misaligned { area: Area::RequestRing, offset: 0x1004, align: RING_ALIGN })
        );
        assert_eq!(
            check(with(5, 0x3200), 0x4000),
            Err(LayoutError::Misaligned { area: Area::Data, offset: 0x3200, align: DATA_ALIGN })
        );
        assert_eq!(check(with(6, 0), 0x4000), Err(LayoutError::EmptyData));
        // Data one byte past the region; offsets near u32::MAX (no overflow).
        assert!(matches!(check(with(6, 0x1001), 0x4000), Err(LayoutError::OutsideRegion { area: Area::Data, .. })));
        assert!(matches!(
            check(with(3, 0xFFFF_FFC0), 0x4000),
            Err(LayoutError::OutsideRegion { area: Area::ResponseRing, .. })
        ));
        assert!(matches!(check(with(6, u32::MAX), 0x4000), Err(LayoutError::OutsideRegion { area: Area::Data, .. })));
        // Overlaps: ring in the header page, rings on each other, ring on the data area.
        assert_eq!(check(with(2, 0), 0x4000), Err(LayoutError::Overlap { a: Area::Header, b: Area::RequestRing }));
        assert_eq!(
            check(with(3, 0x1000 + 2048), 0x4000),
            Err(LayoutError::Overlap { a: Area::RequestRing, b: Area::ResponseRing })
        );
        assert_eq!(
            check(with(3, 0x3000 - 64), 0x4000),
            Err(LayoutError::Overlap { a: Area::ResponseRing, b: Area::Data })
        );
        assert_eq!(check(with(5, 0x2000), 0x4000), Err(LayoutError::Overlap { a: Area::ResponseRing, b: Area::Data }));
        assert_eq!(check(with(5, 0), 0x4000), Err(LayoutError::Overlap { a: Area::Header, b: Area::Data }));
        // Rings packed back to back (2056 bytes each, next 64-byte boundary) are fine.
        assert!(check(with(3, 0x1000 + 2112), 0x4000).is_ok());
    }

    #[test]
    fn request_and_response_round_trip() {
        let reqs = [
            Request { id: u64::MAX, op: Op::Read, sector: u64::MAX - 1, count: 3, data_offset: 0x3000, data_len: 1536 },
            Request { id: 0, op: Op::Write, sector: 0, count: u32::MAX, data_offset: u32::MAX, data_len: 0 },
            Request::simple(5, Op::Flush),
            Request::simple(6, Op::GetInfo),
            Request { id: 1, op: Op::Unknown(200), sector: 2, count: 3, data_offset: 4, data_len: 5 },
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()), r);
        }
        let b = reqs[0].encode();
        assert_eq!(&b[0..8], &u64::MAX.to_le_bytes());
        assert_eq!(&b[8..16], &(u64::MAX - 1).to_le_bytes());
        assert_eq!(&b[16..20], &3u32.to_le_bytes());
        assert_eq!(&b[20..24], &0x3000u32.to_le_bytes());
        assert_eq!(&b[24..28], &1536u32.to_le_bytes());
        assert_eq!(b[28], 1);
        assert_eq!(&b[29..], &[0, 0, 0]);

        let info =
            DiskInfo { capacity_sectors: 1 << 40, sector_size: 4096, max_sectors_per_request: 256, read_only: true };
        for r in [Response::info(9, info), Response::new(10, Status::IoError), Response::new(11, Status::Unknown(99))] {
            assert_eq!(Response::decode(&r.encode()), r);
        }
        let b = Response::info(9, info).encode();
        assert_eq!(&b[0..8], &9u64.to_le_bytes());
        assert_eq!(&b[8..16], &(1u64 << 40).to_le_bytes());
        assert_eq!(&b[16..20], &4096u32.to_le_bytes());
        assert_eq!(&b[20..24], &256u32.to_le_bytes());
        assert_eq!((b[24], b[25]), (0, 1));
        assert_eq!(&b[26..], &[0; 6]);
    }

    #[test]
    fn codes_round_trip() {
        for c in 0..=255u8 {
            assert_eq!(Op::from_code(c).code(), c);
            assert_eq!(Status::from_code(c).code(), c);
        }
        assert_eq!(Op::from_code(4), Op::Unknown(4));
        assert_eq!(Status::from_code(6), Status::Unknown(6));
    }

    #[test]
    fn validate_sector_ranges() {
        let (l, d) = (layout(), disk());
        let ok = validate(&rw(Op::Read, 999, 1, 0x3000), &l, d).unwrap();
        let Validated::Read(t) = ok else { panic!("{ok:?}") };
        assert_eq!((t.sector(), t.count(), t.end_sector()), (999, 1, 1000));
        assert_eq!(t.data_range(), 0x3000..0x3200);
        assert_eq!(validate(&rw(Op::Read, 1000, 1, 0x3000), &l, d), Err(Status::OutOfRange));
        assert_eq!(validate(&rw(Op::Write, 990, 11, 0x3000), &l, d), Err(Status::OutOfRange));
        assert!(validate(&rw(Op::Write, 990, 10, 0x3000), &l, d).is_ok());
        assert_eq!(validate(&rw(Op::Read, u64::MAX, 1, 0x3000), &l, d), Err(Status::OutOfRange));
        assert_eq!(validate(&rw(Op::Read, u64::MAX - 1, 2, 0x3000), &l, d), Err(Status::OutOfRange));
        // Even a disk as large as u64 cannot be overflowed.
        let huge = DiskInfo { capacity_sectors: u64::MAX, ..d };
        assert_eq!(validate(&rw(Op::Read, u64::MAX, 1, 0x3000), &l, huge), Err(Status::OutOfRange));
        assert!(validate(&rw(Op::Read, u64::MAX - 1, 1, 0x3000), &l, huge).is_ok());
    }

    #[test]
    fn validate_counts_and_ops() {
        let (l, d) = (layout(), disk());
        assert_eq!(validate(&rw(Op::Read, 0, 0, 0x3000), &l, d), Err(Status::BadRequest));
        assert!(validate(&rw(Op::Read, 0, 64, 0x3000), &l, d).is_ok());
        assert_eq!(validate(&rw(Op::Read, 0, 65, 0x3000), &l, d), Err(Status::BadRequest));
        assert_eq!(validate(&rw(Op::Unknown(4), 0, 1, 0x3000), &l, d), Err(Status::BadRequest));
        let ro = DiskInfo { read_only: true, ..d };
        assert_eq!(validate(&rw(Op::Write, 0, 1, 0x3000), &l, ro), Err(Status::Unsupported));
        assert!(matches!(validate(&rw(Op::Read, 0, 1, 0x3000), &l, ro), Ok(Validated::Read(_))));
        // GetInfo and Flush ignore garbage in the other fields.
        let junk = Request { id: 1, op: Op::Flush, sector: u64::MAX, count: u32::MAX, data_offset: 3, data_len: 1 };
        assert_eq!(validate(&junk, &l, ro), Ok(Validated::Flush));
        assert_eq!(validate(&Request { op: Op::GetInfo, ..junk }, &l, d), Ok(Validated::GetInfo));
    }

    #[test]
    fn validate_buffers() {
        let (l, d) = (layout(), disk());
        let end = l.data_range().end as u32;
        // First and last sector of the data area.
        assert!(validate(&rw(Op::Read, 0, 1, 0x3000), &l, d).is_ok());
        let last = validate(&rw(Op::Write, 0, 2, end - 1024), &l, d).unwrap();
        let Validated::Write(t) = last else { panic!("{last:?}") };
        assert_eq!(t.data_range(), end as usize - 1024..end as usize);
        // One sector past either edge.
        assert_eq!(validate(&rw(Op::Write, 0, 2, end - 512), &l, d), Err(Status::BadBuffer));
        assert_eq!(validate(&rw(Op::Read, 0, 1, 0x3000 - 512), &l, d), Err(Status::BadBuffer));
        // Pointing at the rings or the header.
        assert_eq!(validate(&rw(Op::Read, 0, 1, 0x1000), &l, d), Err(Status::BadBuffer));
        assert_eq!(validate(&rw(Op::Read, 0, 1, 0), &l, d), Err(Status::BadBuffer));
        // Far away, and at the top of u32 (no overflow).
        assert_eq!(validate(&rw(Op::Read, 0, 1, u32::MAX - 511), &l, d), Err(Status::BadBuffer));
        // Misaligned.
        assert_eq!(validate(&rw(Op::Read, 0, 1, 0x3100), &l, d), Err(Status::BadBuffer));
        // Mis-sized.
        for data_len in [0, 511, 513, 1024, u32::MAX] {
            let r = Request { data_len, ..rw(Op::Read, 0, 1, 0x3000) };
            assert_eq!(validate(&r, &l, d), Err(Status::BadBuffer), "data_len {data_len}");
        }
        // A count whose byte length does not fit u32 can never match.
        let big = DiskInfo { max_sectors_per_request: u32::MAX, capacity_sectors: u64::MAX, ..d };
        let r = Request { data_len: 0, ..rw(Op::Read, 0, 1, 0x3000) };
        assert_eq!(validate(&Request { count: 1 << 23, ..r }, &l, big), Err(Status::BadBuffer));
    }

    /// Guest and driver over one region: the whole protocol, as the two domains use it.
    #[test]
    fn guest_and_driver_end_to_end() {
        let mut bytes = vec![0u8; REGION];
        let mem = ByteMem::new(&mut bytes);
        let mut disk_bytes = vec![0u8; 1000 * 512];
        let info = disk();

        // Guest setup.
        let layout = BlockLayout::standard(REGION).unwrap();
        layout.write(&mem).unwrap();
        let (mut requests, mut responses) = layout.guest_rings(&mem).unwrap();
        // Driver attach.
        let driver_layout = BlockLayout::read(&mem).unwrap();
        let (mut incoming, mut outgoing) = driver_layout.driver_rings(&mem).unwrap();

        let buf = layout.data_offset();
        mem.write_bytes(buf, &[0x5A; 1024]);
        requests.push(&Request::simple(1, Op::GetInfo).encode()).unwrap();
        requests.push(&rw(Op::Write, 10, 2, buf as u32).encode()).unwrap();
        requests.push(&Request { id: 3, ..rw(Op::Read, 11, 1, (buf + 4096) as u32) }.encode()).unwrap();
        requests.push(&Request { id: 4, ..rw(Op::Read, 999, 2, buf as u32) }.encode()).unwrap();
        requests.push(&Request::simple(5, Op::Unknown(77)).encode()).unwrap();

        while let Some(slot) = incoming.pop().unwrap() {
            let req = Request::decode(&slot);
            let resp = match validate(&req, &driver_layout, info) {
                Ok(Validated::GetInfo) => Response::info(req.id, info),
                Ok(Validated::Flush) => Response::new(req.id, Status::Ok),
                Ok(Validated::Read(t)) => {
                    let from = t.sector() as usize * 512;
                    mem.write_bytes(t.data_offset(), &disk_bytes[from..from + t.data_len()]);
                    Response::new(req.id, Status::Ok)
                }
                Ok(Validated::Write(t)) => {
                    let from = t.sector() as usize * 512;
                    mem.read_bytes(t.data_offset(), &mut disk_bytes[from..from + t.data_len()]);
                    Response::new(req.id, Status::Ok)
                }
                Err(status) => Response::new(req.id, status),
            };
            outgoing.push(&resp.encode()).unwrap();
        }

        let mut got = Vec::new();
        while let Some(slot) = responses.pop().unwrap() {
            got.push(Response::decode(&slot));
        }
        assert_eq!(
            got,
            [
                Response::info(1, info),
                Response::new(7, Status::Ok),
                Response::new(3, Status::Ok),
                Response::new(4, Status::OutOfRange),
                Response::new(5, Status::BadRequest),
            ]
        );
        let mut read_back = [0u8; 512];
        mem.read_bytes(buf + 4096, &mut read_back);
        assert_eq!(read_back, [0x5A; 512]);
        assert!(disk_bytes[10 * 512..12 * 512].iter().all(|&b| b == 0x5A));
        assert_eq!(disk_bytes[12 * 512], 0);
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::GetInfo),
            Just(Op::Read),
            Just(Op::Write),
            Just(Op::Flush),
            any::<u8>().prop_map(Op::from_code)
        ]
    }

    /// Requests that are often near the edges, so the accepting paths get exercised too.
    fn any_request(l: BlockLayout) -> impl Strategy<Value = Request> {
        let area = l.data_range();
        (
            any::<u64>(),
            any_op(),
            prop_oneof![any::<u64>(), 0u64..1100, (u64::MAX - 100)..=u64::MAX],
            prop_oneof![any::<u32>(), 0u32..80],
            prop_oneof![any::<u32>(), (area.start as u32 / 512 - 2..area.end as u32 / 512 + 2).prop_map(|s| s * 512)],
            prop_oneof![any::<u32>(), (0u32..80).prop_map(|n| n * 512)],
        )
            .prop_map(|(id, op, sector, count, data_offset, data_len)| Request {
                id,
                op,
                sector,
                count,
                data_offset,
                data_len,
            })
    }

    fn any_disk() -> impl Strategy<Value = DiskInfo> {
        (prop_oneof![any::<u64>(), 0u64..2000], any::<u32>(), prop_oneof![any::<u32>(), 0u32..100], any::<bool>())
            .prop_map(|(capacity_sectors, sector_size, max_sectors_per_request, read_only)| DiskInfo {
                capacity_sectors,
                sector_size,
                max_sectors_per_request,
                read_only,
            })
    }

    proptest! {
        #[test]
        fn request_round_trips(r in any_request(layout())) {
            prop_assert_eq!(Request::decode(&r.encode()), r);
        }

        #[test]
        fn response_round_trips(id in any::<u64>(), code in any::<u8>(), info in any_disk()) {
            let r = Response { id, status: Status::from_code(code), info, incarnation: 0 };
            prop_assert_eq!(Response::decode(&r.encode()), r);
        }

        #[test]
        fn decode_is_total(bytes in any::<[u8; SLOT_SIZE]>()) {
            let r = Request::decode(&bytes);
            // Decoding then encoding keeps every field (reserved bytes are dropped).
            let mut again = r.encode();
            again[29..].copy_from_slice(&bytes[29..]);
            prop_assert_eq!(again, bytes);
            let _ = Response::decode(&bytes);
        }

        #[test]
        fn validate_never_panics_and_accepts_only_safe_ranges(
            region in prop_oneof![Just(STANDARD_MIN_REGION), Just(REGION), STANDARD_MIN_REGION..(1usize << 24)],
            seed in any_request(layout()),
            disk in any_disk(),
        ) {
            let l = BlockLayout::standard(region).unwrap();
            match validate(&seed, &l, disk) {
                Ok(Validated::Read(t)) | Ok(Validated::Write(t)) => {
                    prop_assert!(matches!(seed.op, Op::Read | Op::Write));
                    prop_assert!(seed.op == Op::Read || !disk.read_only);
                    prop_assert!(t.count() >= 1 && t.count() <= disk.max_sectors_per_request);
                    prop_assert!(t.sector().checked_add(u64::from(t.count())).is_some());
                    prop_assert!(t.end_sector() <= disk.capacity_sectors);
                    prop_assert_eq!(t.data_len(), t.count() as usize * 512);
                    prop_assert_eq!(t.data_offset() % 512, 0);
                    let area = l.data_range();
                    prop_assert!(t.data_range().start >= area.start && t.data_range().end <= area.end);
                    prop_assert!(t.data_range().end <= region);
                    prop_assert_eq!((t.sector(), t.data_offset()), (seed.sector, seed.data_offset as usize));
                }
                Ok(Validated::GetInfo) => prop_assert_eq!(seed.op, Op::GetInfo),
                Ok(Validated::Flush) => prop_assert_eq!(seed.op, Op::Flush),
                Err(s) => prop_assert!(matches!(
                    s,
                    Status::BadRequest | Status::OutOfRange | Status::BadBuffer | Status::Unsupported
                )),
            }
        }

        #[test]
        fn any_accepted_layout_is_sane(
            fields in prop_oneof![
                any::<[u32; 7]>(),
                // Mostly-valid headers with small offsets, so acceptance happens often.
                (0u32..16, 0u32..16, 0u32..12, 0u32..16, 1u32..0x8000).prop_map(|(a, b, c, d, e)| {
                    [MAGIC, VERSION, a * 0x400, b * 0x400, 1 << c, d * 0x1000, e]
                }),
            ],
            len in 0usize..0x10000,
        ) {
            let mut bytes = header_bytes(fields, len.max(28));
            bytes.truncate(len);
            let mem = ByteMem::new(&mut bytes);
            if let Ok(l) = BlockLayout::read(&mem) {
                let ring = ring::ring_size(l.ring_capacity(), SLOT_SIZE).unwrap();
                let areas = [
                    0..HEADER_PAGE_SIZE,
                    l.request_ring_offset()..l.request_ring_offset() + ring,
                    l.response_ring_offset()..l.response_ring_offset() + ring,
                    l.data_range(),
                ];
                for (i, a) in areas.iter().enumerate() {
                    prop_assert!(a.end <= len && a.start < a.end);
                    for b in &areas[i + 1..] {
                        prop_assert!(a.end <= b.start || b.end <= a.start, "{:?} overlaps {:?}", a, b);
                    }
                }
                prop_assert_eq!(l.data_offset() % DATA_ALIGN, 0);
                // Both sides can attach to a layout that was accepted.
                prop_assert!(l.guest_rings(&mem).is_ok());
                prop_assert!(l.driver_rings(&mem).is_ok());
            }
        }
    }
}
