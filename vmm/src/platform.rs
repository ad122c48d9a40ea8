//! The devices of one Linux VM wired together, and the answers the VMM glue needs for each
//! kind of exit. Independent of how exits arrive: the glue passes in what the exit says (port,
//! MSR, guest-physical address, instruction bytes, guest TSC) and acts on what comes back
//! (a value, a fault to inject, a vector to inject, a timer deadline, console bytes, a power
//! event).
//!
//! Wiring: the UART's interrupt output drives I/O APIC pin 4 (ISA IRQ 4, edge, as the MADT
//! and DSDT say); I/O APIC deliveries go into the local x2APIC's IRR; the local APIC's EOI of a
//! level-triggered vector is broadcast back to the I/O APIC. Typed input waits in a backlog
//! until the UART's receive FIFO has room.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;

use crate::acpi::SLEEP_CONTROL_PORT;
use crate::bus::{Access, Bus, BusDevice};
use crate::cpuid::{CpuidPolicy, CpuidResult, HostCpuid};
use crate::ioapic::{IoApic, IOAPIC_BASE, IOAPIC_SIZE};
use crate::kvmclock::{KvmClock, KvmClockError};
use crate::memory::GuestMemory;
use crate::mmio::{decode, CpuMode, DecodeError};
use crate::msr::{route, MsrFault, MsrRoute, MsrState};
use crate::power::{I8042Reset, PowerDevice, PowerEvent, I8042_COMMAND_PORT, POWER_PORTS};
use crate::uart::{Uart, COM1_BASE, COM1_IRQ, UART_PORTS};
use crate::x2apic::{ApicConfig, ApicError, X2Apic};

/// Devices on the port-I/O bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PioDevice {
    /// COM1.
    Uart,
    /// ACPI sleep/reset registers.
    Power,
    /// The 8042's reset line.
    I8042,
}

/// Devices on the MMIO bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioDevice {
    /// The I/O APIC.
    IoApic,
}

/// Fixed parameters of the VM's platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlatformConfig {
    /// Guest TSC frequency in Hz (kvmclock and the APIC timer derive from it).
    pub tsc_hz: u64,
    /// APIC timer input clock in Hz.
    pub apic_bus_hz: u64,
    /// Guest TSC at which the VM starts (kvmclock system time 0).
    pub boot_tsc: u64,
    /// Wall-clock time at VM start: seconds since the Unix epoch.
    pub wall_clock_sec: u64,
    /// Wall-clock time at VM start: nanoseconds.
    pub wall_clock_nsec: u32,
}

/// Why the platform cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformError {
    /// A TSC frequency of 0.
    ZeroTscFrequency,
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformError::ZeroTscFrequency => f.write_str("the guest TSC frequency must not be 0"),
        }
    }
}

impl core::error::Error for PlatformError {}

/// An MSR access the guest must see fault (#GP(0)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrError {
    /// No model answers this MSR.
    Unknown {
        /// The MSR.
        msr: u32,
    },
    /// The x2APIC refused it.
    Apic(ApicError),
    /// The stored-MSR model refused it.
    Local(MsrFault),
    /// A write to the TSC (the VMM does not let the guest move its TSC).
    TscWrite,
}

impl fmt::Display for MsrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MsrError::Unknown { msr } => write!(f, "MSR {msr:#x} is not emulated"),
            MsrError::Apic(e) => write!(f, "{e}"),
            MsrError::Local(e) => write!(f, "{e}"),
            MsrError::TscWrite => f.write_str("writes to IA32_TIME_STAMP_COUNTER are refused"),
        }
    }
}

impl core::error::Error for MsrError {}

/// Why an MMIO exit could not be completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioError {
    /// The instruction could not be decoded or is not a supported form.
    Decode(DecodeError),
}

impl fmt::Display for MmioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmioError::Decode(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for MmioError {}

/// The result of an emulated MMIO instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioCompletion {
    /// Advance RIP by this much.
    pub len: usize,
    /// Whether a device claimed the address (an unclaimed read returned all-ones).
    pub claimed: bool,
}

/// One VM's devices.
pub struct Platform {
    pio: Bus<PioDevice>,
    mmio: Bus<MmioDevice>,
    uart: Uart,
    power: PowerDevice,
    i8042: I8042Reset,
    ioapic: IoApic,
    apic: X2Apic,
    kvmclock: KvmClock,
    msrs: MsrState,
    cpuid: CpuidPolicy,
    input: VecDeque<u8>,
    unclaimed_pio: u64,
    unclaimed_mmio: u64,
    kvmclock_errors: u64,
}

/// Kernel command-line words the VMM adds to the manifest's, because this platform implies
/// them: `pci=off`, as it has no PCI host bridge (Linux's early quirk scan would otherwise
/// probe 256 buses × 32 slots through ports 0xCF8/0xCFC: about 33 000 exits for nothing);
/// `reboot=acpi`, as it resets through the FADT's reset register (Debian's kernel booted by
/// PVH otherwise went the BIOS way, `machine_real_restart`: it wrote the CMOS shutdown byte
/// and jumped to the reset vector at 0xffff0, which is zeroed RAM here, and ran on there
/// without another exit).
pub const PLATFORM_CMDLINE: &str = "pci=off reboot=acpi";

/// What replaces [`PLATFORM_CMDLINE`] when the VMM puts virtio functions on its PCI bus
/// (`virtio::pci_bus`): `pci=lastbus=1`. The DSDT has no `PNP0A03` root bridge, so the ACPI
/// scan finds nothing; `pcibios_fixup_peer_bridges` (arch/x86/pci/legacy.c) then scans buses
/// 0 to `lastbus` through ports 0xCF8/0xCFC (it returns at once for `lastbus=0`; bus 1 costs
/// 32 reads). `noearly` skips the early quirk scan (`early_quirks`), which otherwise probes
/// through ports 0xCF8/0xCFC about 34 000 times before init. Not `pci=noacpi`: that also
/// sets `acpi_noirq`, so the UART's GSI 4 is never
/// mapped, ttyS0 cannot take IRQ 4, and the first MSI-X vector Linux numbers 4 takes it.
/// `reboot=acpi` for the same reason as in [`PLATFORM_CMDLINE`].
pub const PCI_CMDLINE: &str = "pci=lastbus=1,noearly reboot=acpi";

/// Largest typed-input backlog kept; older input beyond it is dropped.
pub const INPUT_BACKLOG: usize = 4096;

impl Platform {
    /// The platform at power-on: x2APIC mode, everything else at reset.
    pub fn new(cfg: PlatformConfig) -> Result<Self, PlatformError> {
        let kvmclock = KvmClock::new(cfg.tsc_hz, cfg.boot_tsc, cfg.wall_clock_sec, cfg.wall_clock_nsec)
            .ok_or(PlatformError::ZeroTscFrequency)?;
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        // Fixed, disjoint ranges: these registrations cannot fail; errors are still not
        // unwrapped, an unregistered device would show up as unclaimed accesses.
        let _ = pio.insert(u64::from(COM1_BASE), UART_PORTS, PioDevice::Uart);
        let _ = pio.insert(u64::from(SLEEP_CONTROL_PORT), POWER_PORTS, PioDevice::Power);
        let _ = pio.insert(u64::from(I8042_COMMAND_PORT), 1, PioDevice::I8042);
        let _ = mmio.insert(IOAPIC_BASE, IOAPIC_SIZE, MmioDevice::IoApic);
        Ok(Self {
            pio,
            mmio,
            uart: Uart::new(),
            power: PowerDevice::new(),
            i8042: I8042Reset::new(),
            ioapic: IoApic::new(1),
            apic: X2Apic::new(ApicConfig { id: 0, tsc_hz: cfg.tsc_hz, bus_hz: cfg.apic_bus_hz, start_in_x2apic: true }),
            kvmclock,
            msrs: MsrState::new(),
            cpuid: CpuidPolicy,
            input: VecDeque::new(),
            unclaimed_pio: 0,
            unclaimed_mmio: 0,
            kvmclock_errors: 0,
        })
    }

    /// The local APIC (for inspection).
    pub fn apic(&self) -> &X2Apic {
        &self.apic
    }

    /// The UART (for inspection).
    pub fn uart(&self) -> &Uart {
        &self.uart
    }

    /// Counts of accesses nobody claimed: (port I/O, MMIO).
    pub fn unclaimed(&self) -> (u64, u64) {
        (self.unclaimed_pio, self.unclaimed_mmio)
    }

    /// kvmclock MSR writes whose structure could not be written (bad guest address).
    pub fn kvmclock_errors(&self) -> u64 {
        self.kvmclock_errors
    }

    /// Moves typed input into the UART as its FIFO allows and propagates interrupt lines.
    fn sync(&mut self) {
        while self.uart.rx_space() > 0 {
            let Some(b) = self.input.pop_front() else { break };
            self.uart.receive(b);
        }
        self.ioapic.set_irq(usize::from(COM1_IRQ), self.uart.irq_pending());
        for d in self.ioapic.take_deliveries() {
            self.apic.request(d.vector, d.level);
        }
    }

    /// CPUID exit.
    pub fn cpuid(&self, host: &dyn HostCpuid, leaf: u32, subleaf: u32) -> CpuidResult {
        self.cpuid.query(host, leaf, subleaf)
    }

    /// IN of `size` (1, 2 or 4) bytes from `port`; unclaimed ports read all-ones.
    pub fn io_in(&mut self, port: u16, size: u8) -> u32 {
        let mut buf = [0u8; 4];
        let data = &mut buf[..usize::from(size.clamp(1, 4))];
        let (uart, power, i8042) = (&mut self.uart, &mut self.power, &mut self.i8042);
        let access = self.pio.read(u64::from(port), data, |dev, off, d| match dev {
            PioDevice::Uart => uart.read(off, d),
            PioDevice::Power => power.read(off, d),
            PioDevice::I8042 => i8042.read(off, d),
        });
        if access == Access::Unclaimed {
            self.unclaimed_pio += 1;
        }
        self.sync();
        u32::from_le_bytes(buf) & (u32::MAX >> (32 - 8 * u32::from(size.clamp(1, 4))))
    }

    /// OUT of the low `size` bytes of `value` to `port`.
    pub fn io_out(&mut self, port: u16, size: u8, value: u32) {
        let bytes = value.to_le_bytes();
        let data = &bytes[..usize::from(size.clamp(1, 4))];
        let (uart, power, i8042) = (&mut self.uart, &mut self.power, &mut self.i8042);
        let access = self.pio.write(u64::from(port), data, |dev, off, d| match dev {
            PioDevice::Uart => uart.write(off, d),
            PioDevice::Power => power.write(off, d),
            PioDevice::I8042 => i8042.write(off, d),
        });
        if access == Access::Unclaimed {
            self.unclaimed_pio += 1;
        }
        self.sync();
    }

    /// An MMIO read of `size` bytes at `gpa`; `None` if nobody claims it (the value is then
    /// all-ones, as returned).
    pub fn mmio_read(&mut self, gpa: u64, size: u8) -> (u64, bool) {
        let mut buf = [0u8; 8];
        let n = usize::from(size.clamp(1, 8));
        let ioapic = &mut self.ioapic;
        let access = self.mmio.read(gpa, &mut buf[..n], |dev, off, d| match dev {
            MmioDevice::IoApic => ioapic.read(off, d),
        });
        let claimed = access != Access::Unclaimed;
        if !claimed {
            self.unclaimed_mmio += 1;
        }
        self.sync();
        (u64::from_le_bytes(buf), claimed)
    }

    /// An MMIO write of the low `size` bytes of `value` at `gpa`; returns whether claimed.
    pub fn mmio_write(&mut self, gpa: u64, size: u8, value: u64) -> bool {
        let bytes = value.to_le_bytes();
        let n = usize::from(size.clamp(1, 8));
        let ioapic = &mut self.ioapic;
        let access = self.mmio.write(gpa, &bytes[..n], |dev, off, d| match dev {
            MmioDevice::IoApic => ioapic.write(off, d),
        });
        let claimed = access != Access::Unclaimed;
        if !claimed {
            self.unclaimed_mmio += 1;
        }
        self.sync();
        claimed
    }

    /// Emulates the MMIO instruction `insn` (bytes at RIP) that faulted on `gpa`, updating
    /// `regs` (RAX..R15) for loads. The caller advances RIP by the returned length.
    pub fn complete_mmio(
        &mut self,
        gpa: u64,
        insn: &[u8],
        mode: CpuMode,
        regs: &mut [u64; 16],
    ) -> Result<MmioCompletion, MmioError> {
        let i = decode(insn, mode).map_err(MmioError::Decode)?;
        let claimed = match i.write_value(regs) {
            Some(v) => self.mmio_write(gpa, i.size, v),
            None => {
                let (v, claimed) = self.mmio_read(gpa, i.size);
                i.complete_read(regs, v);
                claimed
            }
        };
        Ok(MmioCompletion { len: i.len, claimed })
    }

    /// RDMSR at guest TSC `now`.
    pub fn rdmsr(&mut self, msr: u32, now: u64) -> Result<u64, MsrError> {
        match route(msr) {
            Some(MsrRoute::Apic) => self.apic.read_msr(msr, now).map_err(MsrError::Apic),
            Some(MsrRoute::KvmClock) => self.kvmclock.read_msr(msr).map_err(|_| MsrError::Unknown { msr }),
            Some(MsrRoute::Tsc) => Ok(now),
            Some(MsrRoute::Local) => self.msrs.read(msr).map_err(MsrError::Local),
            None => Err(MsrError::Unknown { msr }),
        }
    }

    /// WRMSR at guest TSC `now`; kvmclock writes go into `mem`.
    pub fn wrmsr(&mut self, msr: u32, value: u64, now: u64, mem: &mut dyn GuestMemory) -> Result<(), MsrError> {
        match route(msr) {
            Some(MsrRoute::Apic) => {
                let effect = self.apic.write_msr(msr, value, now).map_err(MsrError::Apic)?;
                if let Some(v) = effect.eoi_broadcast {
                    self.ioapic.eoi(v);
                }
                self.sync();
                Ok(())
            }
            Some(MsrRoute::KvmClock) => match self.kvmclock.write_msr(msr, value, now, mem) {
                Ok(()) => Ok(()),
                // The guest's write stands (as on KVM); the structure could not be written.
                Err(KvmClockError::Memory(_)) => {
                    self.kvmclock_errors += 1;
                    Ok(())
                }
                Err(KvmClockError::NotKvmClockMsr(_)) => Err(MsrError::Unknown { msr }),
            },
            Some(MsrRoute::Tsc) => Err(MsrError::TscWrite),
            Some(MsrRoute::Local) => self.msrs.write(msr, value).map_err(MsrError::Local),
            None => Err(MsrError::Unknown { msr }),
        }
    }

    /// The guest TSC at which the VMM must call [`Platform::timer`] next, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        self.apic.next_deadline()
    }

    /// Processes timer expiry at guest TSC `now`; returns whether the timer fired.
    pub fn timer(&mut self, now: u64) -> bool {
        self.apic.tick(now)
    }

    /// The vector to inject when the guest can take an interrupt.
    pub fn pending_interrupt(&self) -> Option<u8> {
        self.apic.highest_deliverable()
    }

    /// The glue injected `vector`.
    pub fn acknowledge(&mut self, vector: u8) -> bool {
        self.apic.ack(vector)
    }

    /// An MSI a PCI function wrote (virtio-pci's MSI-X): requests its vector at the local
    /// APIC, edge-triggered, if it is an ordinary interrupt for this CPU (APIC id 0); NMI, SMI,
    /// INIT and other destinations are refused. Returns whether the vector was requested.
    pub fn deliver_msi(&mut self, msg: crate::virtio::pci::MsiMessage) -> bool {
        match msg.fixed_vector() {
            Some(vector) if msg.destination() == self.apic.config().id => self.apic.request(vector, false),
            _ => false,
        }
    }

    /// Bytes of typed input [`Self::input`] can still keep: a caller that takes no more than
    /// this from its source loses nothing (the rest waits there).
    pub fn input_room(&self) -> usize {
        INPUT_BACKLOG.saturating_sub(self.input.len())
    }

    /// Typed console input for the UART. Input beyond [`INPUT_BACKLOG`] bytes is dropped;
    /// returns how many bytes were kept.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        let room = INPUT_BACKLOG.saturating_sub(self.input.len());
        let n = room.min(bytes.len());
        self.input.extend(&bytes[..n]);
        self.sync();
        n
    }

    /// Console output written since the last call.
    pub fn take_console(&mut self) -> Vec<u8> {
        self.uart.take_output()
    }

    /// Complete console lines written since the last call (a partial line stays buffered).
    pub fn take_console_lines(&mut self) -> Vec<u8> {
        self.uart.take_lines()
    }

    /// A power-off or reset the guest asked for.
    pub fn take_power_event(&mut self) -> Option<PowerEvent> {
        self.power.take_event().or_else(|| self.i8042.take_event())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::{RESET_PORT, SLEEP_CONTROL_S5};
    use crate::memory::VecMemory;
    use proptest::prelude::*;

    const TSC_HZ: u64 = 1_000_000_000;

    fn platform() -> Platform {
        Platform::new(PlatformConfig {
            tsc_hz: TSC_HZ,
            apic_bus_hz: TSC_HZ,
            boot_tsc: 0,
            wall_clock_sec: 1_700_000_000,
            wall_clock_nsec: 0,
        })
        .unwrap()
    }

    /// What Linux does to get COM1 interrupts: enable the APIC, route pin 4, enable the UART's
    /// receive interrupt with OUT2.
    fn linux_setup(p: &mut Platform, mem: &mut VecMemory) {
        p.wrmsr(0x80f, 0x1ff, 0, mem).unwrap();
        p.mmio_write(IOAPIC_BASE, 4, 0x18);
        p.mmio_write(IOAPIC_BASE + 0x10, 4, 0x24);
        p.io_out(COM1_BASE + 4, 1, 0x0b); // DTR | RTS | OUT2
        p.io_out(COM1_BASE + 2, 1, 0x01); // FIFO on
        p.io_out(COM1_BASE + 1, 1, 0x01); // ERBFI
    }

    #[test]
    fn serial_input_interrupt_round_trip() {
        let mut p = platform();
        let mut mem = VecMemory::new(0, 0x10000);
        linux_setup(&mut p, &mut mem);
        assert_eq!(p.pending_interrupt(), None);
        let typed = [b'u'; 20];
        assert_eq!(p.input(&typed), 20);
        assert_eq!(p.pending_interrupt(), Some(0x24));
        assert!(p.acknowledge(0x24));
        // The handler drains the FIFO; the backlog refills it.
        let mut got = Vec::new();
        while p.io_in(COM1_BASE + 5, 1) & 1 != 0 {
            got.push(p.io_in(COM1_BASE, 1) as u8);
        }
        assert_eq!(got.len(), 20, "16 from the FIFO, then 4 more from the backlog");
        p.wrmsr(0x80b, 0, 0, &mut mem).unwrap();
        assert_eq!(p.pending_interrupt(), None);
        // New input: a new edge.
        p.input(b"x");
        assert_eq!(p.pending_interrupt(), Some(0x24));
    }

    #[test]
    fn input_room_says_what_input_keeps() {
        let mut p = platform();
        let mut mem = VecMemory::new(0, 0x10000);
        linux_setup(&mut p, &mut mem);
        let room = p.input_room();
        assert_eq!(room, INPUT_BACKLOG);
        let typed = vec![b'k'; room + 100];
        // What fits is kept (the FIFO takes its 16 first, so a little more than the room).
        let kept = p.input(&typed[..room]);
        assert_eq!(kept, room);
        // The UART's FIFO took the first 16 bytes out of the backlog.
        assert_eq!(p.input_room(), crate::uart::RX_FIFO_DEPTH);
        assert_eq!(p.input(&typed[room..]), crate::uart::RX_FIFO_DEPTH, "only what the room said is kept");
        assert_eq!(p.input_room(), 0);
        // The guest reads: room again, and exactly what was kept comes out.
        let mut got = 0;
        while p.io_in(COM1_BASE + 5, 1) & 1 != 0 {
            p.io_in(COM1_BASE, 1);
            got += 1;
        }
        assert_eq!(got, room + crate::uart::RX_FIFO_DEPTH, "every byte kept comes out");
        assert_eq!(p.input_room(), INPUT_BACKLOG);
    }

    #[test]
    fn console_output_and_thre() {
        let mut p = platform();
        let mut mem = VecMemory::new(0, 0x10000);
        linux_setup(&mut p, &mut mem);
        for &b in b"Linux version 6.1\nhalf" {
            p.io_out(COM1_BASE, 1, u32::from(b));
        }
        assert_eq!(p.take_console_lines(), b"Linux version 6.1\n");
        assert_eq!(p.take_console(), b"half");
        // THRE interrupt when enabled.
        p.io_out(COM1_BASE + 1, 1, 0x02);
        assert_eq!(p.pending_interrupt(), Some(0x24));
    }

    /// Linux's interrupt-driven transmit (8250 `serial8250_handle_irq` + `serial8250_tx_chars`):
    /// start_tx enables ETBEI, each interrupt refills the FIFO while IIR reports THRE, stop_tx
    /// clears ETBEI when the buffer is empty. Every byte must come out and every start_tx must
    /// raise a fresh edge on the edge-triggered pin.
    #[test]
    fn interrupt_driven_transmit_never_stalls() {
        let mut p = platform();
        let mut mem = VecMemory::new(0, 0x10000);
        linux_setup(&mut p, &mut mem);
        let mut out = Vec::new();
        for round in 0..3u8 {
            let mut xmit: VecDeque<u8> = (0..100u8).map(|i| i.wrapping_add(round)).collect();
            let expected: Vec<u8> = xmit.iter().copied().collect();
            // start_tx
            p.io_out(COM1_BASE + 1, 1, 0x03);
            let mut interrupts = 0;
            while let Some(v) = p.pending_interrupt() {
                assert_eq!(v, 0x24);
                p.acknowledge(v);
                interrupts += 1;
                loop {
                    let iir = p.io_in(COM1_BASE + 2, 1);
                    if iir & 1 != 0 {
                        break;
                    }
                    if iir & 0x0f == 0x02 {
                        if xmit.is_empty() {
                            p.io_out(COM1_BASE + 1, 1, 0x01); // stop_tx
                        }
                        for _ in 0..16 {
                            let Some(b) = xmit.pop_front() else { break };
                            p.io_out(COM1_BASE, 1, u32::from(b));
                        }
                    }
                }
                p.wrmsr(0x80b, 0, 0, &mut mem).unwrap();
                assert!(interrupts < 50, "interrupt storm");
            }
            assert!(xmit.is_empty(), "round {round}: transmit stalled with {} bytes left", xmit.len());
            out.extend(p.take_console());
            assert_eq!(&out[out.len() - 100..], &expected[..]);
        }
    }

    #[test]
    fn tsc_deadline_timer_through_msrs() {
        let mut p = platform();
        let mut mem = VecMemory::new(0, 0x10000);
        p.wrmsr(0x80f, 0x1ff, 0, &mut mem).unwrap();
        p.wrmsr(0x832, (2 << 17) | 0xec, 0, &mut mem).unwrap();
        p.wrmsr(0x6e0, 5_000, 100, &mut mem).unwrap();
        assert_eq!(p.next_deadline(), Some(5_000));
        assert!(!p.timer(4_999));
        assert!(p.timer(5_000));
        assert_eq!(p.pending_interrupt(), Some(0xec));
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn msrs_and_kvmclock() {
        let mut p = platform();
        let mut mem = VecMemory::new(0, 0x10000);
        assert_eq!(p.rdmsr(0x1b, 0), Ok(0xfee0_0d00));
        assert_eq!(p.rdmsr(0x10, 1234), Ok(1234));
        assert_eq!(p.wrmsr(0x10, 0, 0, &mut mem), Err(MsrError::TscWrite));
        assert_eq!(p.rdmsr(0x179, 0), Err(MsrError::Unknown { msr: 0x179 }));
        assert_eq!(p.wrmsr(0xc000_0080, 0, 0, &mut mem), Err(MsrError::Unknown { msr: 0xc000_0080 }));
        assert!(matches!(p.wrmsr(0x80b, 1, 0, &mut mem), Err(MsrError::Apic(_))));
        assert!(matches!(p.wrmsr(0x277, 2, 0, &mut mem), Err(MsrError::Local(_))));
        p.wrmsr(0x4b56_4d01, 0x2001, 500_000_000, &mut mem).unwrap();
        assert_eq!(mem.bytes()[0x2000 + 29], 1, "TSC_STABLE flag");
        assert_eq!(u64::from_le_bytes(mem.bytes()[0x2010..0x2018].try_into().unwrap()), 500_000_000);
        // A bad kvmclock address is counted, not faulted.
        p.wrmsr(0x4b56_4d01, 0xffff_0001, 0, &mut mem).unwrap();
        assert_eq!(p.kvmclock_errors(), 1);
        assert_eq!(p.rdmsr(0x4b56_4d01, 0), Ok(0xffff_0001));
        for e in [
            MsrError::Unknown { msr: 1 },
            MsrError::Apic(ApicError::ReadOnly { msr: 0x802 }),
            MsrError::Local(MsrFault::Unknown { msr: 1 }),
            MsrError::TscWrite,
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn ioapic_through_mmio_instructions() {
        let mut p = platform();
        let mut regs = [0u64; 16];
        // mov [rdi], esi ; IOREGSEL = 1 (version)
        regs[6] = 1;
        let c = p.complete_mmio(IOAPIC_BASE, &[0x89, 0x37], CpuMode::Bits64, &mut regs).unwrap();
        assert_eq!(c, MmioCompletion { len: 2, claimed: true });
        // mov eax, [rdi+0x10] ; IOWIN
        regs[0] = u64::MAX;
        p.complete_mmio(IOAPIC_BASE + 0x10, &[0x8b, 0x47, 0x10], CpuMode::Bits64, &mut regs).unwrap();
        assert_eq!(regs[0], 0x0017_0011);
        // Unclaimed: all-ones, counted.
        let c = p.complete_mmio(0xd000_0000, &[0x8b, 0x07], CpuMode::Bits64, &mut regs).unwrap();
        assert!(!c.claimed);
        assert_eq!(regs[0], 0xffff_ffff);
        assert_eq!(p.unclaimed(), (0, 1));
        assert!(matches!(
            p.complete_mmio(IOAPIC_BASE, &[0x01, 0x07], CpuMode::Bits64, &mut regs),
            Err(MmioError::Decode(_))
        ));
        assert!(!MmioError::Decode(DecodeError::Invalid).to_string().is_empty());
    }

    #[test]
    fn power_and_unclaimed_ports() {
        let mut p = platform();
        assert_eq!(p.io_in(0x61, 1), 0xff, "no PIT/speaker port");
        assert_eq!(p.io_in(0x40, 4), 0xffff_ffff);
        p.io_out(0x80, 1, 0);
        assert_eq!(p.unclaimed(), (3, 0));
        p.io_out(RESET_PORT, 1, 1);
        assert_eq!(p.take_power_event(), Some(PowerEvent::Reset));
        p.io_out(SLEEP_CONTROL_PORT, 1, u32::from(SLEEP_CONTROL_S5));
        assert_eq!(p.take_power_event(), Some(PowerEvent::PowerOff));
        assert_eq!(p.io_in(I8042_COMMAND_PORT, 1), 0, "8042 input buffer empty");
        p.io_out(I8042_COMMAND_PORT, 1, 0xfe);
        assert_eq!(p.take_power_event(), Some(PowerEvent::Reset));
        assert!(Platform::new(PlatformConfig {
            tsc_hz: 0,
            apic_bus_hz: 1,
            boot_tsc: 0,
            wall_clock_sec: 0,
            wall_clock_nsec: 0
        })
        .is_err());
        assert!(!PlatformError::ZeroTscFrequency.to_string().is_empty());
    }

    #[test]
    fn msi_delivery() {
        use crate::virtio::pci::MsiMessage;
        let mut p = platform();
        let mut mem = VecMemory::new(0, 0x10000);
        p.wrmsr(0x80f, 0x1ff, 0, &mut mem).unwrap();
        assert!(p.deliver_msi(MsiMessage { address: 0xfee0_0000, data: 0x51 }));
        assert_eq!(p.pending_interrupt(), Some(0x51));
        assert!(!p.deliver_msi(MsiMessage { address: 0xfee0_1000, data: 0x52 }), "APIC id 1");
        assert!(!p.deliver_msi(MsiMessage { address: 0xfee0_0000, data: 0x452 }), "NMI");
    }

    #[test]
    fn cpuid_passes_through_policy() {
        let p = platform();
        let host = |_: u32, _: u32| CpuidResult { eax: !0, ebx: !0, ecx: !0, edx: !0 };
        assert_eq!(p.cpuid(&host, 0x4000_0000, 0).eax, 0x4000_0001);
        assert_eq!(p.cpuid(&host, 6, 0).eax, 4);
    }

    proptest! {
        /// A hostile guest hammering every exit kind: nothing panics and the input backlog
        /// stays bounded.
        #[test]
        fn prop_hostile_exits(ops in proptest::collection::vec((0u8..8, any::<u32>(), any::<u64>()), 0..200)) {
            let mut p = platform();
            let mut mem = VecMemory::new(0, 0x4000);
            let mut regs = [0u64; 16];
            for (kind, a, b) in ops {
                match kind {
                    0 => { p.io_in((a as u16 & 0x7ff) | 0x3f8 & a as u16, (b % 5) as u8); }
                    1 => p.io_out(a as u16, (b % 5) as u8, b as u32),
                    2 => { let _ = p.rdmsr(a, b); }
                    3 => { let _ = p.wrmsr(a & 0x8ff, b, b, &mut mem); }
                    4 => { p.mmio_read(IOAPIC_BASE + u64::from(a & 0x1f), (b % 9) as u8); }
                    5 => { p.mmio_write(IOAPIC_BASE + u64::from(a & 0x1f), (b % 9) as u8, b); }
                    6 => { let _ = p.complete_mmio(IOAPIC_BASE + u64::from(a & 0x1f), &b.to_le_bytes(), CpuMode::Bits64, &mut regs); }
                    _ => {
                        p.timer(b);
                        p.input(&a.to_le_bytes());
                        if let Some(v) = p.pending_interrupt() { p.acknowledge(v); }
                    }
                }
                prop_assert!(p.input.len() <= INPUT_BACKLOG);
            }
        }
    }
}
