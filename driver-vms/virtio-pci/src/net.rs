//! Buffer management for a virtio-net device driven with virtio-drivers' [`VirtIONetRaw`],
//! shared by the net driver VM and a guest that owns its NIC.
//!
//! [`RxQueue`] keeps `N` receive buffers posted to the device; a received frame is handed
//! out without its virtio-net header and its buffer posted again at once. [`TxQueue`] has
//! `M` transmit buffers, each holding the virtio-net header and one frame: a frame is handed
//! to the device without waiting for it ([`TxQueue::send`], or built in place through
//! [`TxQueue::slot`]), and a frame for which no buffer is free is refused, never waited for;
//! buffers come back with [`TxQueue::reap`].
//!
//! virtio-drivers' own decision whether to notify the device after publishing a buffer can
//! be wrong on x86 (see [`crate::Kicker`]): after a round of posting or sending, the caller
//! kicks the queue itself when [`RxQueue::take_posted`] / [`TxQueue::take_sent`] say so.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{fence, Ordering};

use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::Transport;
use virtio_drivers::{Error, Hal};

/// One receive or transmit buffer: the virtio-net header and a full Ethernet frame.
pub const BUF_LEN: usize = 2048;

/// The receive buffers and the token of the request each is posted with.
pub struct RxQueue<const N: usize> {
    buffers: Vec<Vec<u8>>,
    tokens: [Option<u16>; N],
    /// Buffers were posted since the last [`RxQueue::take_posted`].
    posted: bool,
}

impl<const N: usize> Default for RxQueue<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RxQueue<N> {
    /// `N` buffers, none posted yet ([`RxQueue::post`]).
    pub fn new() -> Self {
        Self { buffers: (0..N).map(|_| alloc::vec![0u8; BUF_LEN]).collect(), tokens: [None; N], posted: false }
    }

    /// Whether buffers were posted since the last call: then kick the receive queue.
    pub fn take_posted(&mut self) -> bool {
        core::mem::take(&mut self.posted)
    }

    /// Post every buffer not yet with the device.
    pub fn post<H: Hal, T: Transport, const QS: usize>(
        &mut self,
        net: &mut VirtIONetRaw<H, T, QS>,
    ) -> Result<(), Error> {
        for (buffer, token) in self.buffers.iter_mut().zip(self.tokens.iter_mut()) {
            if token.is_none() {
                // SAFETY: the buffer stays allocated and untouched by us until the device
                // hands it back (receive_complete in `next`); it lies in our own RAM, which
                // the IOMMU maps for the device.
                *token = Some(unsafe { net.receive_begin(buffer)? });
                self.posted = true;
            }
        }
        Ok(())
    }

    /// Take the next frame the device has filled, if any, and hand it (without the
    /// virtio-net header) to `f`; the buffer is posted again afterwards. `None` if the
    /// device has no frame; an error if the device returned a buffer we did not post, or
    /// completing or reposting failed (a buffer left unposted is posted by the next
    /// [`RxQueue::post`]).
    pub fn next<H: Hal, T: Transport, const QS: usize, R>(
        &mut self,
        net: &mut VirtIONetRaw<H, T, QS>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Option<Result<R, Error>> {
        // Completing the last frame told the device which used entry to interrupt for next
        // (`used_event`, a store); looking for a new entry is a load. Without a full fence
        // x86 may do the load first: we would miss an entry the device added meanwhile
        // while the device, reading the old `used_event`, sends no interrupt for it.
        fence(Ordering::SeqCst);
        let token = net.poll_receive()?;
        let Some(i) = self.tokens.iter().position(|t| *t == Some(token)) else {
            return Some(Err(Error::WrongToken));
        };
        self.tokens[i] = None;
        // SAFETY: the same buffer that was posted with this token.
        let r = unsafe { net.receive_complete(token, &mut self.buffers[i]) };
        Some(r.and_then(|(header, len)| {
            let frame = header.checked_add(len).and_then(|end| self.buffers[i].get(header..end));
            let r = f(frame.unwrap_or(&[]));
            self.post(net).map(|()| r)
        }))
    }
}

/// Why [`TxQueue::send`] (or [`TxQueue::slot`], [`TxSlot::submit`]) refused a frame; the
/// frame is dropped.
#[derive(Clone, Copy, Debug)]
pub enum SendError {
    /// Every buffer is still with the device.
    Busy,
    /// The frame does not fit in a buffer after the virtio-net header.
    TooLong,
    /// The device refused it.
    Device(Error),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Busy => write!(f, "every transmit buffer is with the device"),
            Self::TooLong => write!(f, "frame too long"),
            Self::Device(e) => write!(f, "{e}"),
        }
    }
}

/// Why [`TxQueue::reap`] failed. After it the queue takes nothing back any more (so its
/// buffers run out and later frames are refused).
#[derive(Clone, Copy, Debug)]
pub enum ReapError {
    /// The device completed a request (this token) we did not submit.
    UnknownToken(u16),
    /// Completing this request failed.
    Complete(u16, Error),
}

impl fmt::Display for ReapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownToken(token) => write!(f, "the device completed an unknown request {token}"),
            Self::Complete(token, e) => write!(f, "completing request {token}: {e}"),
        }
    }
}

impl From<ReapError> for Error {
    fn from(e: ReapError) -> Self {
        match e {
            ReapError::UnknownToken(_) => Error::WrongToken,
            ReapError::Complete(_, e) => e,
        }
    }
}

/// The transmit buffers and, for each one the device holds, its token and length.
pub struct TxQueue<const M: usize> {
    buffers: Vec<Vec<u8>>,
    in_flight: [Option<(u16, usize)>; M],
    /// A reap failed: transmit completions are no longer taken.
    stuck: bool,
    /// Frames were handed to the device since the last [`TxQueue::take_sent`].
    sent: bool,
    /// Buffers the device gave back so far (a running count, for the heartbeat).
    completed: u64,
}

impl<const M: usize> Default for TxQueue<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const M: usize> TxQueue<M> {
    /// `M` buffers, all free.
    pub fn new() -> Self {
        Self {
            buffers: (0..M).map(|_| alloc::vec![0u8; BUF_LEN]).collect(),
            in_flight: [None; M],
            stuck: false,
            sent: false,
            completed: 0,
        }
    }

    /// Whether frames were handed to the device since the last call: then kick the
    /// transmit queue.
    pub fn take_sent(&mut self) -> bool {
        core::mem::take(&mut self.sent)
    }

    /// Take back every buffer the device is done with. After an error nothing is taken back
    /// any more (and later calls return `Ok`).
    pub fn reap<H: Hal, T: Transport, const QS: usize>(
        &mut self,
        net: &mut VirtIONetRaw<H, T, QS>,
    ) -> Result<(), ReapError> {
        while !self.stuck {
            let Some(token) = net.poll_transmit() else { break };
            let Some(i) = self.in_flight.iter().position(|t| t.is_some_and(|(k, _)| k == token)) else {
                self.stuck = true;
                return Err(ReapError::UnknownToken(token));
            };
            let len = self.in_flight[i].map_or(0, |(_, len)| len);
            // SAFETY: the same buffer (and length) that was submitted with this token.
            match unsafe { net.transmit_complete(token, &self.buffers[i][..len]) } {
                Ok(_) => {
                    self.in_flight[i] = None;
                    self.completed += 1;
                }
                Err(e) => {
                    self.stuck = true;
                    return Err(ReapError::Complete(token, e));
                }
            }
        }
        Ok(())
    }

    /// How many buffers the device holds, and how many it gave back so far: whether it is
    /// keeping up (`domain_rt::heartbeat::Progress`).
    pub fn progress(&self) -> (usize, u64) {
        (self.in_flight.iter().filter(|t| t.is_some()).count(), self.completed)
    }

    /// Whether every buffer is with the device (a frame now would be refused).
    pub fn is_full(&self) -> bool {
        self.in_flight.iter().all(Option::is_some)
    }

    /// A free buffer with the virtio-net header filled in, for a frame of `len` bytes to be
    /// built in place and then submitted. Nothing is reaped here.
    pub fn slot<H: Hal, T: Transport, const QS: usize>(
        &mut self,
        net: &mut VirtIONetRaw<H, T, QS>,
        len: usize,
    ) -> Result<TxSlot<'_, M>, SendError> {
        let i = self.in_flight.iter().position(Option::is_none).ok_or(SendError::Busy)?;
        let header = net.fill_buffer_header(&mut self.buffers[i]).map_err(SendError::Device)?;
        let end = header.checked_add(len).filter(|&l| l <= self.buffers[i].len()).ok_or(SendError::TooLong)?;
        Ok(TxSlot { queue: self, index: i, header, end })
    }

    /// Hand `frame` to the device without waiting for it. Nothing is reaped here.
    pub fn send<H: Hal, T: Transport, const QS: usize>(
        &mut self,
        net: &mut VirtIONetRaw<H, T, QS>,
        frame: &[u8],
    ) -> Result<(), SendError> {
        let mut slot = self.slot(net, frame.len())?;
        slot.frame().copy_from_slice(frame);
        slot.submit(net)
    }
}

/// A transmit buffer taken for one frame ([`TxQueue::slot`]); dropped without
/// [`TxSlot::submit`], it stays free.
pub struct TxSlot<'a, const M: usize> {
    queue: &'a mut TxQueue<M>,
    index: usize,
    header: usize,
    end: usize,
}

impl<const M: usize> TxSlot<'_, M> {
    /// Where the frame goes (after the virtio-net header), exactly as long as asked for.
    pub fn frame(&mut self) -> &mut [u8] {
        &mut self.queue.buffers[self.index][self.header..self.end]
    }

    /// Hand the buffer to the device without waiting for it.
    pub fn submit<H: Hal, T: Transport, const QS: usize>(
        self,
        net: &mut VirtIONetRaw<H, T, QS>,
    ) -> Result<(), SendError> {
        let buf = &self.queue.buffers[self.index][..self.end];
        // SAFETY: the buffer is not touched again until the device hands it back (reap); it
        // lies in our own RAM, which the IOMMU maps for the device.
        let token = unsafe { net.transmit_begin(buf) }.map_err(SendError::Device)?;
        self.queue.in_flight[self.index] = Some((token, self.end));
        self.queue.sent = true;
        Ok(())
    }
}
