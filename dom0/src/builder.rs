//! Building the stack the manifest describes, with hypercalls only: domains with their RAM
//! and images, a timer notification each, channels as capabilities copied into both ends,
//! dom0's fault endpoint as every domain's fault handler — except a VM's, whose exits go
//! to its VMM — then the vCPUs.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use domain_rt::hypercall::{call, Regs};
use domain_rt::{hypercall, println};
use ipc_spec::bundle::Bundle;
use ipc_spec::hypercall::{dom0_slots, domain_flags, rights};
use ipc_spec::manifest::{ChannelKind, DomainSpec, Manifest, Restart, DEVICE_KINDS};
use ipc_spec::{Error, Hypercall};
use pvh::elf::ElfImage;
use pvh::start_info::{build_start_page, MemmapEntry, MEMMAP_RAM};

/// Guest-physical address of every domain's start info page.
const START_INFO_GPA: u64 = 0x1000;
/// Where block-channel regions go in both domains: from 1 GiB, 64 MiB apart; below 3 GiB,
/// which the domains' boot page tables map uncached (MMIO), and far above their RAM.
const REGION_BASE_GPA: u64 = 0x4000_0000;
const REGION_STRIDE: u64 = 64 << 20;
/// Images are linked at or above 1 MiB.
const IMAGE_MIN_GPA: u64 = 0x10_0000;
/// Where a Linux VM's files (kernel, initramfs, command line) are mapped: in dom0 while it
/// copies them in, then read-only in the VMM. Above the channel regions (at most 16 of
/// 64 MiB from 1 GiB), below the VMM's view of its VM's RAM (`vmm`'s `VIEW`, 0xa000_0000).
const FILES_GPA: u64 = 0x9000_0000;
/// The largest files region (up to the VMM's view).
const FILES_MAX: u64 = 0xa000_0000 - FILES_GPA;
/// Where dom0 maps the block channels of restartable servers for itself (its own view:
/// I/O counts, the server-gone mark): above the files window, below 3 GiB (uncached in its
/// boot page tables). Not at the channels' own addresses: dom0 has the bundle at 1 GiB.
const DOM0_VIEW_GPA: u64 = 0xa000_0000;
const DOM0_VIEW_END: u64 = 0xc000_0000;

/// A domain dom0 built.
pub struct Built {
    pub name: String,
    /// Slot of dom0's capability to the domain.
    pub slot: u64,
    /// Command-line words dom0 adds (capability slots).
    args: String,
    entry: u32,
    ram: u64,
    /// A VM: its VMM's index in the stack, and its vCPU's slot (created early: the VMM's
    /// command line names it).
    pub vmm: Option<usize>,
    vcpu: Option<u64>,
    /// A hypercall fuzzer (`fuzz = true`): the machine's `MachineStatus` just before dom0
    /// built it, to compare with after it is destroyed.
    pub fuzz_baseline: Option<MachineStatus>,
    /// A VM booting a kernel: its VMM creates and starts its vCPU.
    vmm_boots: bool,
    /// The hang watchdog (manifest `watchdog_ms`): dom0's capability (WAIT) to the
    /// notification the domain signals as its heartbeat.
    pub heartbeat: Option<u64>,
}

/// What `MachineStatus` says: free frames, then live domains, vCPUs, regions, endpoints
/// and notifications.
pub type MachineStatus = [u64; 6];

/// The machine's free frames and live kernel objects, now.
pub fn machine_status() -> Result<MachineStatus, String> {
    let r = hc(Hypercall::MachineStatus, dom0_slots::MACHINE, [0; 6])?;
    Ok(r.args)
}

/// Names of the [`MachineStatus`] fields, in order.
pub const MACHINE_STATUS_FIELDS: [&str; 6] =
    ["free_frames", "domains", "vcpus", "regions", "endpoints", "notifications"];

/// The built stack.
pub struct Stack {
    pub domains: Vec<Built>,
    /// Endpoint on which dom0 receives the domains' faults.
    pub fault_endpoint: u64,
    /// What dom0 keeps to give a restarted server its channels again.
    pub reattach: Vec<Reattach>,
}

/// A channel whose server may be restarted (`restart = "always"`): dom0 keeps its own
/// capabilities to the shared region and to both doorbells, so that it can map the same
/// region (where the client's rings and buffers are) into the next incarnation and give it
/// the same doorbells.
pub struct Reattach {
    /// The server's index in the stack.
    pub server: usize,
    pub name: String,
    pub kind: ChannelKind,
    /// Block and net channels: dom0's region capability, the address and the size.
    pub region: Option<(u64, u64, u64)>,
    /// dom0's capabilities to the notification the client signals, and the one it waits on.
    to_server: u64,
    pub to_client: u64,
    /// Where a block or net channel's region is mapped into dom0 too (a block one's read
    /// for `ctl list`'s I/O counts; both written to tell the client its server is gone).
    pub in_dom0: Option<u64>,
}

pub fn hc(h: Hypercall, slot: u64, args: [u64; 6]) -> Result<Regs, String> {
    call(h, slot, args).map_err(|e: Error| format!("{h:?}: {e}"))
}

/// Assign device `dev` to the domain in `slot`. A device whose function-level reset (on its
/// last release) is not 100 ms old is refused with `DeviceResetting` until it is (PCIe base
/// spec §6.6.2): wait on a timer meanwhile, so that the other domains run rather than the
/// microvisor spinning the core.
fn assign(dev: u64, slot: u64) -> Result<(), String> {
    loop {
        match call(Hypercall::DeviceAssign, dev, [slot, 0, 0, 0, 0, 0]) {
            Err(Error::DeviceResetting) => {
                let timer = create(Hypercall::NotificationCreate)?;
                let slept = hypercall::sleep_ns(timer, 10_000_000);
                delete(timer)?;
                slept.map_err(|e| format!("waiting for a device reset: {e}"))?;
            }
            other => return other.map(|_| ()).map_err(|e| format!("{:?}: {e}", Hypercall::DeviceAssign)),
        }
    }
}

/// Create a fresh object in dom0's table; returns its slot.
fn create(h: Hypercall) -> Result<u64, String> {
    Ok(hc(h, dom0_slots::MEMORY, [0; 6])?.args[0])
}

/// Copy dom0's capability in `slot` into domain `target` with `mask` rights and `badge`.
fn give(slot: u64, target: u64, mask: u64, badge: u64) -> Result<u64, String> {
    Ok(hc(Hypercall::CapCopy, slot, [target, mask, badge, 0, 0, 0])?.args[0])
}

fn delete(slot: u64) -> Result<(), String> {
    hc(Hypercall::CapDelete, slot, [0; 6]).map(|_| ())
}

/// Copy `data` into the domain's RAM at `gpa`, staging it in dom0's RAM (the microvisor
/// copies only from the caller's RAM, and the bundle is not RAM).
fn load(domain: u64, gpa: u64, data: &[u8]) -> Result<(), String> {
    let mut buf = alloc::vec![0u8; 4096];
    for (i, chunk) in data.chunks(4096).enumerate() {
        buf[..chunk.len()].copy_from_slice(chunk);
        let dst = gpa + (i * 4096) as u64;
        hc(Hypercall::DomainWrite, domain, [dst, buf.as_ptr() as u64, chunk.len() as u64, 0, 0, 0])?;
    }
    Ok(())
}

/// dom0's device capabilities: (slot, vendor, device, assigned).
pub fn devices() -> Vec<(u64, u16, u16, bool)> {
    let mut list = Vec::new();
    let mut slot = dom0_slots::FIRST_DEVICE;
    while let Ok(r) = call(Hypercall::DeviceInfo, slot, [0; 6]) {
        list.push((slot, r.args[1] as u16, (r.args[1] >> 16) as u16, r.args[3] != 0));
        slot += 1;
    }
    list
}

pub fn build(bundle: &Bundle, m: &Manifest) -> Result<Stack, String> {
    let fault_endpoint = create(Hypercall::EndpointCreate)?;
    let mut domains: Vec<Built> = Vec::new();
    let mut devices = devices();
    println!("{} PCI function(s) to give out", devices.len());

    for (i, d) in m.domains.iter().enumerate() {
        if d.fuzz {
            // Built last (below), so that nothing but the fuzzer changes the machine's
            // free memory and objects between the two measurements.
            let placeholder = Built {
                name: d.name.clone(),
                slot: u64::MAX,
                args: String::new(),
                entry: 0,
                ram: 0,
                vmm: None,
                vcpu: None,
                fuzz_baseline: None,
                vmm_boots: false,
                heartbeat: None,
            };
            domains.push(placeholder);
            continue;
        }
        let built = create_domain(bundle, m, d, i, fault_endpoint, &mut devices, None)?;
        domains.push(built);
    }

    // Each VM's exits go to an endpoint only its VMM receives on; the VMM also gets the
    // VM's domain (to map its RAM, pause it) and its vCPU (to inject interrupts).
    for i in 0..domains.len() {
        let Some(vmm) = domains[i].vmm else { continue };
        let (vm, host) = (domains[i].slot, domains[vmm].slot);
        let e = create(Hypercall::EndpointCreate)?;
        hc(Hypercall::DomainSetFaultEndpoint, vm, [e, i as u64 + 1, 0, 0, 0, 0])?;
        let exits = give(e, host, rights::RECV, 0)?;
        delete(e)?;
        let ram = domains[i].ram;
        if domains[i].vmm_boots {
            // The VMM makes the vCPU (CONTROL) once it has loaded the kernel.
            let vm_cap = give(vm, host, rights::VMM | rights::CONTROL, 0)?;
            let files = hand_over_files(bundle, &m.domains[i], host)?;
            let _ = write!(domains[vmm].args, " vm={vm_cap} exits={exits} vm_ram={ram}{files}");
        } else {
            let Some(vcpu) = domains[i].vcpu else { continue };
            let vm_cap = give(vm, host, rights::VMM, 0)?;
            let vcpu_cap = give(vcpu, host, rights::CONTROL, 0)?;
            let _ = write!(domains[vmm].args, " vm={vm_cap} vcpu={vcpu_cap} exits={exits} vm_ram={ram}");
        }
        println!("{} is the VMM of VM {}", domains[vmm].name, domains[i].name);
    }

    let mut reattach = Vec::new();
    let mut view = DOM0_VIEW_GPA;
    for (i, c) in m.channels.iter().enumerate() {
        let find = |name: &str| domains.iter().position(|d| d.name == name);
        let (Some(client), Some(server)) = (find(&c.client), find(&c.server)) else {
            return Err(format!("channel {}: unknown domain", c.name));
        };
        match c.kind {
            ChannelKind::Endpoint => {
                let e = create(Hypercall::EndpointCreate)?;
                let s = give(e, domains[server].slot, rights::RECV, 0)?;
                let k = give(e, domains[client].slot, rights::CALL, i as u64 + 1)?;
                delete(e)?;
                let _ = write!(domains[server].args, " chan.{}={s}", c.name);
                let _ = write!(domains[client].args, " chan.{}={k}", c.name);
            }
            ChannelKind::Block | ChannelKind::Net => {
                let bytes = c.size_kib as u64 * 1024;
                let gpa = REGION_BASE_GPA + i as u64 * REGION_STRIDE;
                let r = hc(Hypercall::RegionCreate, dom0_slots::MEMORY, [bytes, 0, 0, 0, 0, 0])?.args[0];
                let rw = rights::READ | rights::WRITE;
                for end in [client, server] {
                    hc(Hypercall::Map, domains[end].slot, [r, gpa, rw, 0, 0, 0]).map_err(|e| {
                        format!("channel {}: mapping the region into {}: {e}", c.name, domains[end].name)
                    })?;
                }
                let keep = m.domains[server].restart.mode == Restart::Always;
                if !keep {
                    // The mappings keep the region alive.
                    delete(r)?;
                }
                let (cs, cw, ss, sw, to_server, to_client) =
                    doorbells_kept(domains[client].slot, domains[server].slot, keep)?;
                if keep {
                    let region = Some((r, gpa, bytes));
                    let fits = view.saturating_add(bytes) <= DOM0_VIEW_END;
                    let in_dom0 = (matches!(c.kind, ChannelKind::Block | ChannelKind::Net) && fits)
                        .then(|| hc(Hypercall::Map, dom0_slots::SELF_DOMAIN, [r, view, rw, 0, 0, 0]))
                        .and_then(|mapped| {
                            mapped.map_err(|e| println!("channel {}: not watched by dom0: {e}", c.name)).ok()
                        })
                        .map(|_| view);
                    if in_dom0.is_some() {
                        view = (view + bytes).next_multiple_of(2 << 20);
                    }
                    reattach.push(Reattach {
                        server,
                        name: c.name.clone(),
                        kind: c.kind,
                        region,
                        to_server,
                        to_client,
                        in_dom0,
                    });
                }
                let _ = write!(
                    domains[client].args,
                    " chan.{n}.kind={k} chan.{n}.region={gpa:#x}:{bytes} chan.{n}.signal={cs} chan.{n}.wait={cw}",
                    n = c.name,
                    k = c.kind.as_str()
                );
                let _ = write!(
                    domains[server].args,
                    " chan.{n}.kind={k} chan.{n}.region={gpa:#x}:{bytes} chan.{n}.signal={ss} chan.{n}.wait={sw}",
                    n = c.name,
                    k = c.kind.as_str()
                );
            }
            ChannelKind::Notification => {
                let keep = m.domains[server].restart.mode == Restart::Always;
                let (cs, cw, ss, sw, to_server, to_client) =
                    doorbells_kept(domains[client].slot, domains[server].slot, keep)?;
                if keep {
                    reattach.push(Reattach {
                        server,
                        name: c.name.clone(),
                        kind: c.kind,
                        region: None,
                        to_server,
                        to_client,
                        in_dom0: None,
                    });
                }
                let _ = write!(domains[client].args, " chan.{n}.signal={cs} chan.{n}.wait={cw}", n = c.name);
                let _ = write!(domains[server].args, " chan.{n}.signal={ss} chan.{n}.wait={sw}", n = c.name);
            }
        }
    }

    for (d, spec) in domains.iter().zip(m.domains.iter()) {
        if !spec.fuzz {
            start(d, spec, true)?;
        }
    }

    // The fuzzers, after everything else: measure, build, give memory, start.
    for (i, spec) in m.domains.iter().enumerate() {
        if !spec.fuzz {
            continue;
        }
        let baseline = machine_status()?;
        let mut built = create_domain(bundle, m, spec, i, fault_endpoint, &mut devices, None)?;
        let mem = give(dom0_slots::MEMORY, built.slot, rights::CONTROL | rights::GRANT, 0)?;
        let _ = write!(built.args, " mem={mem} prio={}", spec.priority);
        start(&built, spec, true)?;
        built.fuzz_baseline = Some(baseline);
        domains[i] = built;
    }
    Ok(Stack { domains, fault_endpoint, reattach })
}

/// Copies a VM's kernel, initramfs and command line into a fresh region, maps it read-only
/// into its VMM (`host`) at [`FILES_GPA`], and returns the VMM's command-line words saying
/// where each part is (`files=`, `files_len=`, `kernel=`, `initramfs=`, `cmdline=` as
/// hexadecimal `<offset>:<length>`). Policy only: which files, and that the VMM may not
/// change them; the VMM does the loading.
fn hand_over_files(bundle: &Bundle, d: &ipc_spec::manifest::DomainSpec, host: u64) -> Result<String, String> {
    let get =
        |name: &str| bundle.get(name).ok_or_else(|| format!("domain {}: \"{name}\" is not in the boot bundle", d.name));
    let kernel = get(&d.kernel)?;
    let initramfs = if d.initramfs.is_empty() { &[][..] } else { get(&d.initramfs)? };
    let page = |n: usize| (n as u64).next_multiple_of(4096);
    let parts: [(&str, &[u8]); 3] = [("kernel", kernel), ("initramfs", initramfs), ("cmdline", d.cmdline.as_bytes())];
    let total: u64 = parts.iter().map(|(_, p)| page(p.len())).sum();
    if total > FILES_MAX {
        return Err(format!(
            "domain {}: kernel, initramfs and command line ({total} bytes) exceed {FILES_MAX}",
            d.name
        ));
    }
    let r = hc(Hypercall::RegionCreate, dom0_slots::MEMORY, [total, 0, 0, 0, 0, 0])
        .map_err(|e| format!("domain {}: room for its kernel and initramfs: {e}", d.name))?
        .args[0];
    hc(Hypercall::Map, dom0_slots::SELF_DOMAIN, [r, FILES_GPA, rights::READ | rights::WRITE, 0, 0, 0])?;
    // SAFETY: the region was just mapped read-write at FILES_GPA (total bytes) in dom0,
    // inside its page tables' identity map of the low 4 GiB; nothing else maps it yet.
    let dst = unsafe { core::slice::from_raw_parts_mut(FILES_GPA as *mut u8, total as usize) };
    let mut words = format!(" files={FILES_GPA:#x} files_len={total:#x}");
    let mut at = 0usize;
    for (name, data) in parts {
        dst[at..at + data.len()].copy_from_slice(data);
        if !data.is_empty() {
            let _ = write!(words, " {name}={at:#x}:{:#x}", data.len());
        }
        at += page(data.len()) as usize;
    }
    hc(Hypercall::Map, host, [r, FILES_GPA, rights::READ, 0, 0, 0])
        .map_err(|e| format!("domain {}: mapping its files into the VMM: {e}", d.name))?;
    hc(Hypercall::Unmap, dom0_slots::SELF_DOMAIN, [r, 0, 0, 0, 0, 0])?;
    // The VMM's mapping keeps the region alive.
    delete(r)?;
    println!(
        "{}: kernel \"{}\" ({} KiB), initramfs \"{}\" ({} KiB) handed to its VMM read-only",
        d.name,
        d.kernel,
        kernel.len() >> 10,
        d.initramfs,
        initramfs.len() >> 10
    );
    Ok(words)
}

/// A doorbell each way between `client` and `server` (domain slots): returns the client's
/// signal and wait slots and the server's, then dom0's own to the notification the client
/// signals and to the one it waits on (kept if `keep`, else deleted: returned as 0).
fn doorbells_kept(client: u64, server: u64, keep: bool) -> Result<(u64, u64, u64, u64, u64, u64), String> {
    let to_server = create(Hypercall::NotificationCreate)?;
    let to_client = create(Hypercall::NotificationCreate)?;
    let cs = give(to_server, client, rights::SIGNAL, 0)?;
    let cw = give(to_client, client, rights::WAIT, 0)?;
    let ss = give(to_client, server, rights::SIGNAL, 0)?;
    let sw = give(to_server, server, rights::WAIT, 0)?;
    if keep {
        return Ok((cs, cw, ss, sw, to_server, to_client));
    }
    delete(to_server)?;
    delete(to_client)?;
    Ok((cs, cw, ss, sw, 0, 0))
}

/// Build domain `index` again after it was destroyed: a new domain from the same image,
/// the same device kind (its function was released by the destruction: quiesced, its
/// IOMMU context and interrupt-remapping entries revoked), the same channels' regions at
/// the same addresses and the same doorbells; then start it. Endpoint channels are not
/// re-attached. Returns when each step ended ([`RestartStamps`], the machine's clock).
pub fn restart(bundle: &Bundle, m: &Manifest, stack: &mut Stack, index: usize) -> Result<RestartStamps, String> {
    let spec = m.domains.get(index).ok_or_else(|| format!("no domain {index}"))?;
    let old = stack.domains.get_mut(index).ok_or_else(|| format!("no domain {index}"))?;
    // The capability went stale with the domain; free dom0's slot (and its heartbeat's).
    let _ = delete(old.slot);
    if let Some(h) = old.heartbeat.take() {
        let _ = delete(h);
    }
    let mut devices = devices();
    let mut stamps = RestartStamps::default();
    let mut built = create_domain(bundle, m, spec, index, stack.fault_endpoint, &mut devices, Some(&mut stamps))?;
    let rw = rights::READ | rights::WRITE;
    for k in stack.reattach.iter().filter(|k| k.server == index) {
        if let Some((r, gpa, _)) = k.region {
            hc(Hypercall::Map, built.slot, [r, gpa, rw, 0, 0, 0])
                .map_err(|e| format!("channel {}: mapping the region into {}: {e}", k.name, spec.name))?;
        }
        let ss = give(k.to_client, built.slot, rights::SIGNAL, 0)?;
        let sw = give(k.to_server, built.slot, rights::WAIT, 0)?;
        let n = &k.name;
        match k.region {
            Some((_, gpa, bytes)) => {
                let _ = write!(
                    built.args,
                    " chan.{n}.kind={} chan.{n}.region={gpa:#x}:{bytes} chan.{n}.signal={ss} chan.{n}.wait={sw}",
                    k.kind.as_str()
                );
            }
            None => {
                let _ = write!(built.args, " chan.{n}.signal={ss} chan.{n}.wait={sw}");
            }
        }
    }
    stamps.attached = hypercall::clock_ns();
    // Quietly: the restart's one line (supervise.rs) says what was done. Every console
    // byte is a port write the microvisor makes while the guest waits for its disk.
    start(&built, spec, false)?;
    stamps.started = hypercall::clock_ns();
    stack.domains[index] = built;
    Ok(stamps)
}

/// When each step of [`restart`] ended (machine clock, ns): the bench's phase breakdown.
#[derive(Clone, Copy, Default)]
pub struct RestartStamps {
    /// The domain exists with its RAM (zeroed) and stage-2 tables.
    pub created: u64,
    /// Its image is loaded.
    pub loaded: u64,
    /// Its device is assigned (IOMMU context, FLR-free function handed over).
    pub assigned: u64,
    /// Its channels' regions and doorbells are given again.
    pub attached: u64,
    /// Its vCPU runs.
    pub started: u64,
}

/// Create the domain `d` (index `i` in the manifest `m`), load its image, give it its fault
/// handler (a VM: its vCPU, wired to its VMM later), timer, device and status capability.
fn create_domain(
    bundle: &Bundle,
    m: &Manifest,
    d: &DomainSpec,
    i: usize,
    fault_endpoint: u64,
    devices: &mut [(u64, u16, u16, bool)],
    mut stamps: Option<&mut RestartStamps>,
) -> Result<Built, String> {
    if !d.kernel.is_empty() {
        // A VM booting a kernel: an empty VM; its VMM loads the kernel (handed over by
        // `build`) and makes the vCPU.
        let ram = (d.memory_mib as u64 * 1024 * 1024).next_multiple_of(2 << 20);
        let name = d.name.as_bytes();
        let r = hc(
            Hypercall::DomainCreate,
            dom0_slots::MEMORY,
            [ram, d.priority as u64, name.as_ptr() as u64, name.len() as u64, domain_flags::VM, 0],
        )
        .map_err(|e| format!("domain {}: {e}", d.name))?;
        let vmm = m.domains.iter().position(|x| x.name == d.vmm);
        return Ok(Built {
            name: d.name.clone(),
            slot: r.args[0],
            args: String::new(),
            entry: 0,
            ram,
            vmm,
            vcpu: None,
            fuzz_baseline: None,
            vmm_boots: true,
            heartbeat: None,
        });
    }
    let image =
        bundle.get(&d.image).ok_or_else(|| format!("domain {}: image \"{}\" is not in the bundle", d.name, d.image))?;
    let elf = ElfImage::parse(image).map_err(|e| format!("domain {}: image {}: {e}", d.name, d.image))?;
    let entry = elf.pvh_entry().ok_or_else(|| format!("domain {}: image has no PVH entry note", d.name))?;
    let ram = d.memory_mib as u64 * 1024 * 1024;
    let ram = ram.next_multiple_of(2 << 20);
    elf.check_fits(IMAGE_MIN_GPA, ram - IMAGE_MIN_GPA).map_err(|e| format!("domain {}: {e}", d.name))?;

    let name = d.name.as_bytes();
    let vm = !d.vmm.is_empty();
    let flags = if vm { domain_flags::VM } else { 0 };
    let r = hc(
        Hypercall::DomainCreate,
        dom0_slots::MEMORY,
        [ram, d.priority as u64, name.as_ptr() as u64, name.len() as u64, flags, 0],
    )
    .map_err(|e| format!("domain {}: {e}", d.name))?;
    let slot = r.args[0];
    if let Some(s) = stamps.as_deref_mut() {
        s.created = hypercall::clock_ns();
    }
    for seg in elf.segments() {
        load(slot, seg.paddr, elf.segment_data(seg)).map_err(|e| format!("domain {}: loading: {e}", d.name))?;
    }
    if let Some(s) = stamps.as_deref_mut() {
        s.loaded = hypercall::clock_ns();
    }
    if vm {
        // Its VMM is wired up once every domain exists; its vCPU is made now (started
        // last, like everyone's) so that the VMM's command line can name it.
        let v = hc(Hypercall::VcpuCreate, slot, [entry as u64, START_INFO_GPA, 0, 0, 0, 0])?.args[0];
        let vmm = m.domains.iter().position(|x| x.name == d.vmm);
        return Ok(Built {
            name: d.name.clone(),
            slot,
            args: String::new(),
            entry,
            ram,
            vmm,
            vcpu: Some(v),
            fuzz_baseline: None,
            vmm_boots: false,
            heartbeat: None,
        });
    }
    hc(Hypercall::DomainSetFaultEndpoint, slot, [fault_endpoint, i as u64 + 1, 0, 0, 0, 0])?;

    // Its own timer notification.
    let n = create(Hypercall::NotificationCreate)?;
    let timer = give(n, slot, rights::SIGNAL | rights::WAIT, 0)?;
    delete(n)?;
    let mut args = String::new();
    let _ = write!(args, "timer={timer}");

    let mut heartbeat = None;
    if d.restart.watchdog_ms != 0 {
        // The domain signals it; dom0 polls it (supervise.rs) and keeps its capability.
        let n = create(Hypercall::NotificationCreate)?;
        let beat = give(n, slot, rights::SIGNAL, 0)?;
        let _ = write!(args, " heartbeat={beat} heartbeat_ms={}", d.restart.watchdog_ms);
        heartbeat = Some(n);
    }

    if !d.device.is_empty() {
        let (_, vendor, device) = DEVICE_KINDS
            .iter()
            .copied()
            .find(|(name, _, _)| *name == d.device)
            .ok_or_else(|| format!("domain {}: unknown device {}", d.name, d.device))?;
        let found = devices
            .iter_mut()
            .find(|(_, v, dv, taken)| *v == vendor && *dv == device && !*taken)
            .ok_or_else(|| format!("domain {}: no free {} device on this machine", d.name, d.device))?;
        assign(found.0, slot).map_err(|e| format!("domain {}: {e}", d.name))?;
        found.3 = true;
        // The driver names the device to reach its configuration space; it cannot
        // reassign it (no rights).
        let dev = give(found.0, slot, 0, 0)?;
        // A notification for the device's interrupts (routed with DeviceIrq).
        let n = create(Hypercall::NotificationCreate)?;
        let irq = give(n, slot, rights::SIGNAL | rights::WAIT, 0)?;
        delete(n)?;
        let _ = write!(args, " dev={dev} irq={irq}");
        if stamps.is_none() {
            // (A restart says it in its one line.)
            println!("assigned {} ({vendor:04x}:{device:04x}) to {}", d.device, d.name);
        }
    }
    if let Some(s) = stamps {
        s.assigned = hypercall::clock_ns();
    }
    if d.status {
        // A call right on dom0's endpoint, badged apart from fault messages: the status
        // service (`ipc_spec::status`).
        let st = give(fault_endpoint, slot, rights::CALL, ipc_spec::status::STATUS_BADGE | (i as u64 + 1))?;
        let _ = write!(args, " status={st}");
    }
    if d.console_input {
        // The machine capability with READ alone: ConsoleRead, nothing else.
        let c = give(dom0_slots::MACHINE, slot, rights::READ, 0)?;
        let _ = write!(args, " console={c}");
        println!("{} receives the console's input", d.name);
    }
    Ok(Built {
        name: d.name.clone(),
        slot,
        args,
        entry,
        ram,
        vmm: None,
        vcpu: None,
        fuzz_baseline: None,
        vmm_boots: false,
        heartbeat,
    })
}

/// Write the start info of `d` and start its vCPU; `report`: say so on the console.
fn start(d: &Built, spec: &DomainSpec, report: bool) -> Result<(), String> {
    if d.vmm_boots {
        println!("{}: {} MiB, priority {}, booted by its VMM", d.name, d.ram >> 20, spec.priority);
        return Ok(());
    }
    let mut cmdline = spec.args.clone();
    if !cmdline.is_empty() && !d.args.is_empty() {
        cmdline.push(' ');
    }
    cmdline.push_str(&d.args);
    let mut page = alloc::vec![0u8; 4096];
    let page_arr: &mut [u8; 4096] = page.as_mut_slice().try_into().map_err(|_| String::from("page size"))?;
    build_start_page(page_arr, START_INFO_GPA, cmdline.as_bytes(), &[MemmapEntry::new(0, d.ram, MEMMAP_RAM)], &[], 0)
        .map_err(|e| format!("domain {}: start info: {e}", d.name))?;
    hc(Hypercall::DomainWrite, d.slot, [START_INFO_GPA, page.as_ptr() as u64, 4096, 0, 0, 0])?;
    let v = match d.vcpu {
        Some(v) => v,
        None => hc(Hypercall::VcpuCreate, d.slot, [d.entry as u64, START_INFO_GPA, 0, 0, 0, 0])?.args[0],
    };
    hc(Hypercall::VcpuStart, v, [0; 6])?;
    delete(v)?;
    if report {
        println!("started {}: {} MiB, priority {}, command line \"{}\"", d.name, d.ram >> 20, spec.priority, cmdline);
    }
    Ok(())
}
