//! The demo guest. It has no device: it reaches the disk through the disk driver VM over a
//! block channel (a shared region with request and response rings, and a doorbell each
//! way). At boot it runs a block self-test: a pattern written across many sectors
//! (including the last one), flushed, read back and checked, and out-of-range requests
//! that must be refused. With a net channel to the net driver VM it then serves HTTP on
//! port 80 (smoltcp over the channel; see `server.rs` and `demo_guest::http`). Without a net
//! channel but with a virtio-net function of its own (`dev=` and `irq=` from dom0, as in
//! `stacks/bench-net.toml`), it drives that NIC directly (`direct.rs`) and serves the same
//! HTTP server on it.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod blk;
#[cfg(target_os = "none")]
mod direct;
#[cfg(target_os = "none")]
mod net;
#[cfg(target_os = "none")]
mod rogue;
#[cfg(target_os = "none")]
mod server;

#[cfg(target_os = "none")]
mod guest {
    use domain_rt::shared::Region;
    use domain_rt::{channels, println, BootInfo};
    use ipc_spec::block::{pattern, Op, Status};

    use crate::blk::BlockClient;

    domain_rt::domain_main!(main);

    /// Sectors per request in the self-test (64 KiB).
    const CHUNK: u32 = 128;

    fn main(info: &BootInfo) -> u64 {
        let mut disk = connect(info);
        match disk.as_mut() {
            None => println!("no block channel on my command line: \"{}\"", info.cmdline),
            // A failure is reported, not fatal: the guest stays up (without its disk).
            Some(disk) if info.arg("bench") == Some("blk") => {
                let turn = info.slot("chan.turn.signal").zip(info.slot("chan.turn.wait"));
                bench(disk, turn);
            }
            Some(disk) => match self_test(disk) {
                Ok(summary) => println!("block self-test passed: {summary}"),
                Err(e) => println!("block self-test FAILED: {e}"),
            },
        }
        if let (Some((name, region, signal, wait)), Some("net")) = (channel(info, "net"), info.arg("rogue")) {
            crate::rogue::break_the_net_channel(name, region, signal, wait);
        } else if let Some((name, region, signal, wait)) = channel(info, "net") {
            match crate::net::ChannelDevice::open(region, signal, wait, 5_000_000_000) {
                Ok(dev) => {
                    let what = alloc::format!("net channel \"{name}\": MAC {}, MTU {}", dev.header.mac, dev.header.mtu);
                    serve(info, dev, wait, disk, &what);
                }
                Err(e) => println!("net channel \"{name}\": {e}"),
            }
        } else if let Some(dev) = info.slot("dev") {
            serve_direct(info, dev, disk);
        }
        println!("ready");
        // Nothing more to do: wait (the microvisor parks this vCPU).
        loop {
            // SAFETY: HLT only waits.
            unsafe { core::arch::asm!("hlt") };
        }
    }

    /// No net channel, but a NIC of our own (`dev=<slot> irq=<slot>`, a virtio-net function
    /// dom0 assigned to us): drive it directly and serve HTTP on it. Returns only if the
    /// device cannot be opened.
    fn serve_direct(info: &BootInfo, dev: u64, disk: Option<BlockClient>) {
        let irq = info.slot("irq");
        let dev = match crate::direct::DirectDevice::open(dev, irq) {
            Ok(d) => d,
            Err(e) => {
                println!("net device: {e}");
                return;
            }
        };
        // The server waits on one notification: the device's, where its receive interrupt
        // arrives (and the server's timer, which the WAIT right lets it set there). Without
        // a routed interrupt it polls with that timer (on `timer=`, our own notification).
        let wait = match (irq, dev.irq_handle) {
            (Some(irq), Some(_)) => irq,
            _ => match info.slot("timer").or(irq) {
                Some(t) => t,
                None => {
                    println!("net device: no notification to wait on");
                    return;
                }
            },
        };
        let what =
            alloc::format!("net device {} owned directly: MAC {}", dev.function, crate::net::NetDevice::mac(&dev));
        serve(info, dev, wait, disk, &what);
    }

    /// Serve HTTP on `dev` (waking on notification `wait`) forever, at `ip=`/`gw=` or the
    /// defaults; `what` names the device in the line that says so.
    fn serve<D: crate::net::NetDevice>(info: &BootInfo, dev: D, wait: u64, disk: Option<BlockClient>, what: &str) -> ! {
        let address = info.arg("ip").and_then(|a| a.parse().ok()).unwrap_or(DEFAULT_ADDRESS);
        let gateway = info.arg("gw").and_then(|a| a.parse().ok()).unwrap_or(DEFAULT_GATEWAY);
        let mut server = crate::server::Server::new(dev, wait, address, gateway, disk).with_status(info.slot("status"));
        println!("{what}; serving HTTP on {address}, port 80");
        println!("ready");
        server.run()
    }

    /// The guest's address and gateway on QEMU's user network, unless `ip=` and `gw=` say
    /// otherwise.
    const DEFAULT_ADDRESS: smoltcp::wire::Ipv4Cidr =
        smoltcp::wire::Ipv4Cidr::new(smoltcp::wire::Ipv4Address::new(10, 0, 2, 15), 24);
    const DEFAULT_GATEWAY: smoltcp::wire::Ipv4Address = smoltcp::wire::Ipv4Address::new(10, 0, 2, 2);

    /// The first channel of `kind` with a shared region: its name, region and doorbells
    /// (`chan.<name>.kind=<kind> chan.<name>.region=… .signal=… .wait=…`).
    fn channel(info: &BootInfo, kind: &'static str) -> Option<(&'static str, Region, u64, u64)> {
        let a = channels::channel_names(info.cmdline, kind).find_map(|n| channels::channel(info.cmdline, n).ok())?;
        // SAFETY: dom0 mapped this region into our stage-2 for the channel, at the address
        // and size on our command line; nothing else here uses that memory.
        Some((a.name, unsafe { a.region() }, a.signal, a.wait))
    }

    /// The block benchmark through the disk driver VM: requests stay on the ring as many
    /// at a time as the ring and the shared data area hold (a sliding window: each answer
    /// lets the next request go, with one doorbell per refill); the driver VM DMAs straight
    /// into the shared region.
    ///
    /// `turn` (signal, wait): the domain that owns a disk directly runs each workload right
    /// after ours, not meanwhile (it would take the CPU whenever the driver VM sleeps), and
    /// gives the turn back: each pair is measured under the same load of the host.
    fn bench(disk: &mut BlockClient, turn: Option<(u64, u64)>) {
        let Ok(info) = disk.info() else {
            println!("bench blk: the disk did not answer");
            if let Some((signal, _)) = turn {
                let _ = domain_rt::hypercall::signal(signal, 1);
            }
            return;
        };
        let data = disk.data_range();
        // The direct domain says when it is ready (its start-up must not overlap our run).
        if let Some((_, wait)) = turn {
            let _ = domain_rt::hypercall::wait(wait);
        }
        for w in (0..domain_rt::bench::ROUNDS).flat_map(|_| domain_rt::bench::WORKLOADS) {
            let len = w.sectors as usize * 512;
            const MAX: usize = ipc_spec::block_client::MAX_OUTSTANDING;
            let depth = (data.len() / len).min(disk.ring_capacity()).clamp(1, MAX);
            let op = if w.write { Op::Write } else { Op::Read };
            let t0 = domain_rt::hypercall::clock_ns();
            // The free buffers are a stack (`free[..nfree]`, lowest on top, so a shallow
            // window reuses the same few); the request with id `id` uses buffer
            // buf_of[id % MAX] (the client never has two outstanding requests whose ids
            // share that slot).
            let mut free = [0u16; MAX];
            for (i, f) in free.iter_mut().take(depth).enumerate() {
                *f = (depth - 1 - i) as u16;
            }
            let mut nfree = depth;
            let mut buf_of = [0u16; MAX];
            let slot = |id: u64| (id % MAX as u64) as usize;
            let (mut sent, mut done) = (0u32, 0u32);
            while done < w.count {
                let mut queued = false;
                if sent < w.count && nfree > 0 {
                    // A batch: the channel's header is looked at once for all of them.
                    let mut batch = match disk.submitter() {
                        Ok(b) => b,
                        Err(e) => {
                            println!("bench blk: {} could not queue request {sent}: {e}", w.name);
                            return;
                        }
                    };
                    while sent < w.count && nfree > 0 {
                        let k = free[nfree - 1];
                        let buffer = data.start + usize::from(k) * len;
                        match batch.submit(op, w.sector(sent, info.capacity_sectors), w.sectors, buffer) {
                            Ok(id) => {
                                buf_of[slot(id)] = k;
                                nfree -= 1;
                            }
                            Err(e) => {
                                println!("bench blk: {} could not queue request {sent}: {e}", w.name);
                                return;
                            }
                        }
                        sent += 1;
                        queued = true;
                    }
                }
                // Everything sent: no use for answers before the last one (each wake-up
                // costs world switches), so the driver VM may hold back its rings.
                if queued && sent == w.count {
                    disk.last_answer_only(true);
                }
                // The driver VM is rung only if it sleeps with room on its device; else it
                // takes these when one of the earlier requests completes.
                if queued && disk.kick_if_needed().is_err() {
                    return;
                }
                // Wait for one answer, then take every one already there before refilling,
                // so the driver VM's one doorbell covers a whole batch of answers.
                let mut failed = false;
                let taken = disk.complete_all(|r| {
                    failed |= r.status != Status::Ok;
                    // At most `depth` are outstanding, each with its buffer off the stack.
                    if let Some(f) = free.get_mut(nfree) {
                        *f = buf_of[slot(r.id)];
                        nfree += 1;
                    }
                    done += 1;
                });
                if failed || taken.is_err() {
                    println!("bench blk: {} request failed", w.name);
                    return;
                }
            }
            disk.last_answer_only(false);
            domain_rt::bench::report("driver", w, domain_rt::hypercall::clock_ns() - t0);
            if let Some((signal, wait)) = turn {
                if domain_rt::hypercall::signal(signal, 1).is_ok() {
                    let _ = domain_rt::hypercall::wait(wait);
                }
            }
        }
        println!("bench blk: via=driver done");
    }

    /// The first block channel.
    fn connect(info: &BootInfo) -> Option<BlockClient> {
        let (name, region, signal, wait) = channel(info, "block")?;
        let (base, len) = (region.base(), region.len_kib() * 1024);
        match BlockClient::new(region, signal, wait) {
            Ok(c) => {
                println!("block channel \"{name}\": {} KiB shared at {base:#x}", len / 1024);
                Some(c)
            }
            Err(e) => {
                println!("block channel \"{name}\": {e}");
                None
            }
        }
    }

    struct Failure(&'static str, u64, Status);

    impl core::fmt::Display for Failure {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, "{} at sector {}: status {:?}", self.0, self.1, self.2)
        }
    }

    fn expect_ok(
        what: &'static str,
        sector: u64,
        r: Result<Status, crate::blk::ClientError>,
    ) -> Result<(), alloc_free::Error> {
        match r {
            Ok(Status::Ok) => Ok(()),
            Ok(s) => Err(alloc_free::Error::Failure(Failure(what, sector, s))),
            Err(e) => Err(alloc_free::Error::Client(e)),
        }
    }

    mod alloc_free {
        pub enum Error {
            Failure(super::Failure),
            Client(crate::blk::ClientError),
            Mismatch { sector: u64 },
            NotRefused { sector: u64, count: u32, status: ipc_spec::block::Status },
        }

        impl core::fmt::Display for Error {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self {
                    Self::Failure(x) => x.fmt(f),
                    Self::Client(e) => write!(f, "{e}"),
                    Self::Mismatch { sector } => write!(f, "sector {sector} read back differs from what was written"),
                    Self::NotRefused { sector, count, status } => {
                        write!(f, "out-of-range request at sector {sector} (+{count}) got {status:?}")
                    }
                }
            }
        }
    }

    use alloc_free::Error;

    /// Write the pattern to `count` sectors from `first`, in chunks.
    fn write_run(disk: &mut BlockClient, first: u64, count: u64) -> Result<(), Error> {
        let data = disk.data_range().start;
        let mut s = first;
        while s < first + count {
            let n = CHUNK.min((first + count - s) as u32);
            let mut buf = [0u8; 512];
            for i in 0..n as u64 {
                pattern(s + i, &mut buf);
                disk.write_bytes(data + (i as usize) * 512, &buf);
            }
            expect_ok("write", s, disk.write(s, n, data))?;
            s += n as u64;
        }
        Ok(())
    }

    /// Read `count` sectors from `first` back and check the pattern.
    fn check_run(disk: &mut BlockClient, first: u64, count: u64) -> Result<(), Error> {
        let data = disk.data_range().start;
        let mut s = first;
        while s < first + count {
            let n = CHUNK.min((first + count - s) as u32);
            expect_ok("read", s, disk.read(s, n, data))?;
            let (mut got, mut want) = ([0u8; 512], [0u8; 512]);
            for i in 0..n as u64 {
                disk.read_bytes(data + (i as usize) * 512, &mut got);
                pattern(s + i, &mut want);
                if got != want {
                    return Err(Error::Mismatch { sector: s + i });
                }
            }
            s += n as u64;
        }
        Ok(())
    }

    /// The runs the self-test writes: (first sector, count). The tests check the same ones
    /// in the disk image.
    fn runs(capacity: u64) -> [(u64, u64); 3] {
        [(0, 2048), (capacity / 2, 77), (capacity - 1, 1)]
    }

    fn self_test(disk: &mut BlockClient) -> Result<heapless_summary::Summary, Error> {
        let info = disk.info().map_err(Error::Client)?;
        println!(
            "disk: {} sectors of 512 bytes, up to {} per request",
            info.capacity_sectors, info.max_sectors_per_request
        );
        let cap = info.capacity_sectors;
        let mut written = 0;
        for (first, count) in runs(cap) {
            write_run(disk, first, count)?;
            written += count;
        }
        expect_ok("flush", 0, disk.flush())?;
        for (first, count) in runs(cap) {
            check_run(disk, first, count)?;
        }
        // Past the end, and straddling it: both must be refused, not served.
        let data = disk.data_range().start;
        for (sector, count) in [(cap, 1u32), (cap - 1, 2)] {
            match disk.read(sector, count, data) {
                Ok(Status::OutOfRange) => {}
                Ok(status) => return Err(Error::NotRefused { sector, count, status }),
                Err(e) => return Err(Error::Client(e)),
            }
        }
        Ok(heapless_summary::Summary { written, last: cap - 1 })
    }

    mod heapless_summary {
        pub struct Summary {
            pub written: u64,
            pub last: u64,
        }

        impl core::fmt::Display for Summary {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(
                    f,
                    "wrote, flushed, read back and verified {} sectors (the last one, {}, included); out-of-range requests refused",
                    self.written, self.last
                )
            }
        }
    }
}
