//! Hypercall decoding: registers in, kernel operation, registers out. Every argument is
//! checked; a bad one becomes an error code in RAX, never a panic.

use ipc_spec::exit::ExitKind;
use ipc_spec::hypercall::{
    domain_flags, rights, status_of, Hypercall, CONSOLE_INPUT_BUFFER, CONSOLE_WRITE_MAX, DOMAIN_NAME_MAX,
};
use ipc_spec::Error;

use super::caps::Object;
use super::{Event, Kernel, PendingExit, Platform, VcpuId, VcpuState, PAGE};
use crate::stage2::Stage2Format;

/// How a hypercall ended for its caller.
enum Done {
    /// Status (and results already written); the caller continues.
    Status(Result<(), Error>),
    /// The call blocked or switched: its status is written when it completes.
    Pending,
}

fn pending(r: Result<(), Error>) -> Done {
    match r {
        Ok(()) => Done::Pending,
        Err(e) => Done::Status(Err(e)),
    }
}

impl<F: Stage2Format> Kernel<F> {
    /// Handle the hypercall the running vCPU `v` just made (RIP already past VMMCALL).
    /// Afterwards `self.current` says which vCPU runs next.
    ///
    /// IPC is decoded first, then the null call; all three stay small. Everything else
    /// goes through [`Self::hypercall_slow`], whose large buffers stay out of this frame.
    pub fn hypercall<P: Platform>(&mut self, p: &mut P, v: VcpuId) -> Option<Event> {
        let (number, slot) = {
            let r = &self.vcpus[v as usize].regs;
            (r.rax, r.rbx)
        };
        // IPC is tested first: it is what the fast path is for.
        let result = if number == Hypercall::Call as u64 {
            self.call(p, v, slot)
        } else if number == Hypercall::ReplyRecv as u64 {
            self.reply_recv(p, v, slot)
        } else if number == Hypercall::Null as u64 {
            self.stats.hypercalls += 1;
            self.vcpus[v as usize].regs.rax = 0;
            return None;
        } else if number == Hypercall::SignalWait as u64 {
            // The doorbell ping-pong: decoded before the rest, after IPC and the null call.
            self.stats.hypercalls += 1;
            if self.signal_wait_fast(v, slot) {
                return None;
            }
            let r = &self.vcpus[v as usize].regs;
            let (bits, wait) = (r.rdi, r.rsi);
            self.signal_wait(v, slot, bits, wait)
        } else {
            return self.hypercall_slow(p, v, number, slot);
        };
        // On success the status arrives with the message (the call blocked or switched).
        if let Err(e) = result {
            self.vcpus[v as usize].regs.rax = e.code();
        }
        None
    }

    #[inline(never)]
    fn hypercall_slow<P: Platform>(&mut self, p: &mut P, v: VcpuId, number: u64, slot: u64) -> Option<Event> {
        self.stats.hypercalls += 1;
        let r = self.vcpus[v as usize].regs;
        let arg0 = r.rdi;
        let Some(call) = Hypercall::from_number(number) else {
            self.vcpus[v as usize].regs.rax = Error::UnknownHypercall.code();
            return None;
        };
        let mut event = None;
        let done = match call {
            Hypercall::Null => Done::Status(Ok(())),
            Hypercall::Recv => pending(self.recv(p, v, slot)),
            Hypercall::Signal => Done::Status(self.signal(v, slot, arg0)),
            Hypercall::Wait => pending(self.wait(v, slot)),
            Hypercall::SignalWait => pending(self.signal_wait(v, slot, arg0, r.rsi)),
            Hypercall::SignalHalt => {
                let offered = p.virq_offered(v);
                pending(self.signal_halt(v, slot, arg0, offered))
            }
            Hypercall::Poll => Done::Status(self.poll(v, slot).and_then(|bits| self.results(v, &[bits]))),
            Hypercall::Yield => {
                self.vcpus[v as usize].regs.rax = 0;
                self.yield_current();
                Done::Pending
            }
            Hypercall::Clock => {
                let [start, per_ms] = p.clock_rate();
                Done::Status(self.results(v, &[p.now_ns(), start, per_ms]))
            }
            Hypercall::ConsoleWrite => Done::Status(self.hc_console(p, v, arg0, r.rsi)),
            Hypercall::ConsoleRead => Done::Status(self.hc_console_read(p, v, slot, arg0, r.rsi)),
            Hypercall::DomainExit => {
                event = self.domain_exit(p, v, arg0);
                Done::Pending
            }
            Hypercall::Shutdown => match self.lookup_singleton(self.vcpus[v as usize].domain, slot, Object::Machine) {
                Ok(()) => return Some(Event::PowerOff(arg0)),
                Err(e) => Done::Status(Err(e)),
            },
            _ => Done::Status(self.management(p, v, call, &r)),
        };
        if let Done::Status(result) = done {
            self.vcpus[v as usize].regs.rax = status_of(result);
        }
        event
    }

    #[inline(never)]
    fn hc_console<P: Platform>(&mut self, p: &mut P, v: VcpuId, gpa: u64, len: u64) -> Result<(), Error> {
        if len > CONSOLE_WRITE_MAX {
            return Err(Error::InvalidArgument);
        }
        let d = self.vcpus[v as usize].domain;
        let mut buf = [0u8; CONSOLE_WRITE_MAX as usize];
        let buf = &mut buf[..len as usize];
        self.read_ram(p, d, gpa, buf)?;
        self.console_write(p, d, buf);
        Ok(())
    }

    /// Typed console input for the holder of a machine capability with READ; RDI = bytes
    /// copied. The destination is checked before any byte leaves the buffer.
    fn hc_console_read<P: Platform>(
        &mut self,
        p: &mut P,
        v: VcpuId,
        slot: u64,
        gpa: u64,
        len: u64,
    ) -> Result<(), Error> {
        let d = self.vcpus[v as usize].domain;
        self.lookup_as(d, slot, rights::READ, |o| (o == Object::Machine).then_some(()))?;
        let mut buf = [0u8; CONSOLE_INPUT_BUFFER];
        let n = (len.min(CONSOLE_INPUT_BUFFER as u64)) as usize;
        self.read_ram(p, d, gpa, &mut buf[..n])?;
        let got = p.console_read(&mut buf[..n]);
        self.write_ram(p, d, gpa, &buf[..got])?;
        self.results(v, &[got as u64])
    }

    /// The domain of `v` asked to stop. Its exit handler (if any) hears of it.
    fn domain_exit<P: Platform>(&mut self, p: &mut P, v: VcpuId, status: u64) -> Option<Event> {
        let d = self.vcpus[v as usize].domain;
        self.console_flush(p, d);
        let handled = self.exit(p, v, PendingExit::new(ExitKind::Exited, 0, status));
        if !handled {
            self.stop_domain(d);
            self.schedule();
        }
        Some(Event::Exited { domain: d, status, handled })
    }

    /// The object-management hypercalls.
    #[inline(never)]
    fn management<P: Platform>(&mut self, p: &mut P, v: VcpuId, call: Hypercall, r: &super::Regs) -> Result<(), Error> {
        let caller = self.vcpus[v as usize].domain;
        let memory = |k: &Self| k.lookup_singleton(caller, r.rbx, Object::Memory);
        match call {
            Hypercall::DomainCreate => {
                memory(self)?;
                let len = usize::try_from(r.r10).map_err(|_| Error::InvalidArgument)?;
                if len == 0 || len > DOMAIN_NAME_MAX {
                    return Err(Error::InvalidArgument);
                }
                let mut name = [0u8; DOMAIN_NAME_MAX];
                self.read_ram(p, caller, r.rdx, &mut name[..len])?;
                let priority = u8::try_from(r.rsi).map_err(|_| Error::InvalidArgument)?;
                if r.r8 & !domain_flags::ALL != 0 {
                    return Err(Error::InvalidArgument);
                }
                let d = self.domain_create(p, &name[..len], r.rdi, priority)?;
                let vm = r.r8 & domain_flags::VM != 0;
                self.domains[d as usize].vm = vm;
                let g = self.domains[d as usize].generation;
                // A VM's capability can be handed to its VMM.
                let all = if vm { rights::CONTROL | rights::VMM | rights::GRANT } else { rights::CONTROL };
                match self.grant_original(caller, Object::Domain(d, g), all) {
                    Ok(slot) => self.results(v, &[slot]),
                    Err(e) => {
                        self.domain_destroy(p, d);
                        Err(e)
                    }
                }
            }
            Hypercall::DomainWrite => {
                let target = self.lookup_domain(caller, r.rbx)?;
                let (dst, src, len) = (r.rdi, r.rsi, r.rdx);
                let mut buf = [0u8; PAGE as usize];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(PAGE) as usize;
                    let s = src.checked_add(done).ok_or(Error::BadAddress)?;
                    self.read_ram(p, caller, s, &mut buf[..n])?;
                    let t = dst.checked_add(done).ok_or(Error::BadAddress)?;
                    self.write_ram(p, target, t, &buf[..n])?;
                    done += n as u64;
                }
                Ok(())
            }
            Hypercall::DomainDestroy => {
                let target = self.lookup_domain(caller, r.rbx)?;
                if target == caller {
                    return Err(Error::InvalidArgument);
                }
                self.console_flush(p, target);
                self.domain_destroy(p, target);
                // Domains only the destroyed one held (or that hold each other in a
                // cycle) are gone for good: nobody could destroy them any more.
                self.collect_unreachable(p);
                Ok(())
            }
            Hypercall::DomainSetFaultEndpoint => {
                let target = self.lookup_domain(caller, r.rbx)?;
                let e = self.lookup_as(caller, r.rdi, rights::CALL, |o| {
                    if let Object::Endpoint(e) = o {
                        Some(e)
                    } else {
                        None
                    }
                })?;
                let extra = u16::try_from(r.rdx)
                    .ok()
                    .filter(|m| m & !ipc_spec::exit::state::ALL == 0)
                    .ok_or(Error::InvalidArgument)?;
                // The handler holds a reference to the endpoint while it is set.
                self.endpoints[e as usize].refs += 1;
                if let Some((old, _)) = self.domains[target as usize].fault_handler.replace((e, r.rsi)) {
                    self.release(p, Object::Endpoint(old));
                }
                self.domains[target as usize].exit_state = extra;
                Ok(())
            }
            Hypercall::VcpuCreate => {
                let target = self.lookup_domain(caller, r.rbx)?;
                let nv = self.vcpu_create(p, target, r.rdi, r.rsi)?;
                let g = self.vcpus[nv as usize].generation;
                let all =
                    if self.domains[target as usize].vm { rights::CONTROL | rights::GRANT } else { rights::CONTROL };
                match self.grant_original(caller, Object::Vcpu(nv, g), all) {
                    Ok(slot) => self.results(v, &[slot]),
                    Err(e) => {
                        // Nobody could ever name the vCPU: take it back.
                        self.vcpus[nv as usize] = super::Vcpu { generation: g, ..super::Vcpu::FREE };
                        self.domains[target as usize].vcpus -= 1;
                        Err(e)
                    }
                }
            }
            Hypercall::VcpuStart => self.vcpu_start(self.lookup_vcpu(caller, r.rbx)?),
            Hypercall::VcpuSetMessagePage => {
                if r.rdi == 0 {
                    self.vcpus[v as usize].msg_page = None;
                    return Ok(());
                }
                // A whole page of the caller's RAM (RAM is whole 2 MiB chunks: an aligned
                // page in it ends in it).
                let page = Some(r.rdi).filter(|a| a.is_multiple_of(PAGE));
                let hpa = page.and_then(|a| self.domains[caller as usize].ram_hpa(a)).ok_or(Error::BadAddress)?;
                self.vcpus[v as usize].msg_page = Some(hpa);
                Ok(())
            }
            Hypercall::RegionCreate => {
                memory(self)?;
                let reg = self.region_create(p, r.rdi)?;
                let all = rights::READ | rights::WRITE | rights::EXEC | rights::GRANT;
                match self.grant_original(caller, Object::Region(reg), all) {
                    Ok(slot) => self.results(v, &[slot]),
                    Err(e) => {
                        let region = &mut self.regions[reg as usize];
                        p.free_frames(region.hpa, region.frames);
                        region.frames = 0;
                        Err(e)
                    }
                }
            }
            Hypercall::Map | Hypercall::Unmap => {
                let target = self.lookup_domain(caller, r.rbx)?;
                let cap = self.lookup(caller, r.rdi, 0)?;
                let Object::Region(reg) = cap.object else { return Err(Error::WrongType) };
                if call == Hypercall::Unmap {
                    return self.unmap_region(p, target, reg);
                }
                if r.rdx & !cap.rights != 0 {
                    return Err(Error::PermissionDenied);
                }
                self.map_region(p, target, reg, r.rsi, r.rdx)
            }
            Hypercall::EndpointCreate => {
                memory(self)?;
                let e = self.endpoint_create()?;
                let slot =
                    self.grant_original(caller, Object::Endpoint(e), rights::CALL | rights::RECV | rights::GRANT)?;
                self.results(v, &[slot])
            }
            Hypercall::NotificationCreate => {
                memory(self)?;
                let n = self.notification_create()?;
                let all = rights::SIGNAL | rights::WAIT | rights::GRANT;
                let slot = self.grant_original(caller, Object::Notification(n), all)?;
                self.results(v, &[slot])
            }
            Hypercall::CapCopy => {
                let target = self.lookup_domain(caller, r.rdi)?;
                let slot = self.cap_copy(caller, r.rbx, target, r.rsi, r.rdx)?;
                self.results(v, &[slot])
            }
            Hypercall::CapRevoke => {
                let n = self.cap_revoke(p, caller, r.rbx)?;
                self.results(v, &[n as u64])
            }
            Hypercall::CapDelete => self.cap_delete(p, caller, r.rbx),
            Hypercall::NotificationBind => self.bind(v, r.rbx, r.rdi),
            Hypercall::DeviceInfo => {
                let dev = self.devices[self.lookup_device(caller, r.rbx, 0)? as usize];
                let ids = dev.vendor as u64 | (dev.device as u64) << 16;
                self.results(v, &[dev.rid as u64, ids, dev.class as u64, dev.owner.map_or(0, |d| d as u64 + 1)])
            }
            Hypercall::DeviceAssign => {
                let dev = self.lookup_device(caller, r.rbx, rights::CONTROL)?;
                let target = self.lookup_domain(caller, r.rdi)?;
                self.device_assign(p, dev, target)
            }
            Hypercall::PciConfigRead | Hypercall::PciConfigWrite => {
                let dev = self.lookup_owned_device(caller, r.rbx)?;
                if call == Hypercall::PciConfigRead {
                    let value = p.pci_config_read(dev, r.rdi, r.rsi)?;
                    self.results(v, &[value as u64])
                } else {
                    let value = u32::try_from(r.rdx).map_err(|_| Error::InvalidArgument)?;
                    p.pci_config_write(dev, r.rdi, r.rsi, value)
                }
            }
            Hypercall::DeviceIrq => {
                let dev = self.lookup_owned_device(caller, r.rbx)?;
                let n = self.lookup_as(caller, r.rdi, rights::WAIT, |o| {
                    if let Object::Notification(n) = o {
                        Some(n)
                    } else {
                        None
                    }
                })?;
                let (address, data, handle) = self.device_irq(p, dev, n)?;
                self.results(v, &[address, data, handle as u64])
            }
            Hypercall::TimerSet => self.timer_set(v, r.rbx, r.rdi, r.rsi, p.now_ns()),
            Hypercall::DomainMapRam => self.map_vm_ram(p, caller, r.rbx, r.rdi),
            Hypercall::VcpuInject => self.inject(caller, r.rbx, r.rdi),
            Hypercall::DomainPause => self.pause(caller, r.rbx, r.rdi),
            Hypercall::DomainStatus => {
                let d = self.lookup_domain(caller, r.rbx)?;
                let mine = self.vcpus.iter().filter(|x| x.domain == d && x.state != VcpuState::Free);
                let stopped = mine.clone().filter(|x| x.state == VcpuState::Stopped).count() as u64;
                let dom = &self.domains[d as usize];
                let answer = [mine.count() as u64, stopped, dom.ipc_calls, dom.signals, dom.ram_size() >> 20];
                self.results(v, &answer)
            }
            Hypercall::MachineStatus => {
                self.lookup_singleton(caller, r.rbx, Object::Machine)?;
                let (domains, vcpus, regions, endpoints, notifications) = self.object_counts();
                self.results(v, &[p.free_frame_count(), domains, vcpus, regions, endpoints, notifications])
            }
            // Handled in `hypercall`.
            _ => Err(Error::UnknownHypercall),
        }
    }

    /// Check that the caller's `slot` (with CONTROL) names the singleton `object`.
    fn lookup_singleton(&self, caller: super::DomainId, slot: u64, object: Object) -> Result<(), Error> {
        self.lookup_as(caller, slot, rights::CONTROL, |o| (o == object).then_some(()))
    }

    /// The device in the caller's `slot`, which the caller must own.
    fn lookup_owned_device(&self, caller: super::DomainId, slot: u64) -> Result<super::DeviceId, Error> {
        let dev = self.lookup_device(caller, slot, 0)?;
        match self.devices[dev as usize].owner {
            Some(o) if o == caller => Ok(dev),
            _ => Err(Error::DeviceBusy),
        }
    }

    /// Hypercall results, in RDI, RSI, RDX, R10, R8, R9 order.
    fn results(&mut self, v: VcpuId, values: &[u64]) -> Result<(), Error> {
        let r = &mut self.vcpus[v as usize].regs;
        for (reg, &x) in [&mut r.rdi, &mut r.rsi, &mut r.rdx, &mut r.r10, &mut r.r8, &mut r.r9].into_iter().zip(values)
        {
            *reg = x;
        }
        Ok(())
    }
}
