//! A local APIC in x2APIC mode: registers as MSRs 0x800-0x8FF, interrupt acceptance, the timer.
//!
//! Section numbers are those of the Intel SDM vol. 3A, chapter 11 "Advanced Programmable
//! Interrupt Controller (APIC)". The model serves one vCPU. The xAPIC MMIO page is not
//! emulated: the VMM starts the vCPU with the APIC already in x2APIC mode (as firmware does on
//! large machines; Linux then keeps x2APIC, `check_x2apic()`), and the CPUID policy advertises
//! x2APIC, so every register access is an MSR exit and no MMIO decoding is needed.
//!
//! Time is the guest TSC. The VMM passes `now` (guest TSC) to every call that needs it and arms
//! a host timer for [`X2Apic::next_deadline`]; when it fires it calls [`X2Apic::tick`].

use core::fmt;

/// `IA32_APIC_BASE`.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// `IA32_TSC_DEADLINE`.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First MSR of the x2APIC register range.
pub const X2APIC_MSR_FIRST: u32 = 0x800;
/// Last MSR of the x2APIC register range.
pub const X2APIC_MSR_LAST: u32 = 0x8ff;
/// The default APIC base address (§11.4.4).
pub const APIC_DEFAULT_BASE: u64 = 0xfee0_0000;

// IA32_APIC_BASE bits (§11.4.4, Figure 11-5; §11.12.1, Table 11-5).
const BASE_BSP: u64 = 1 << 8;
const BASE_EXTD: u64 = 1 << 10;
const BASE_EN: u64 = 1 << 11;
/// Address bits 12..MAXPHYADDR; 52 bits of physical address at most.
const BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

// Register MSRs (§11.12.1.2, Table 11-6 "Local APIC Register Address Map Supported by x2APIC").
const REG_ID: u32 = 0x802;
const REG_VERSION: u32 = 0x803;
const REG_TPR: u32 = 0x808;
const REG_PPR: u32 = 0x80a;
const REG_EOI: u32 = 0x80b;
const REG_LDR: u32 = 0x80d;
const REG_SVR: u32 = 0x80f;
const REG_ISR0: u32 = 0x810;
const REG_TMR0: u32 = 0x818;
const REG_IRR0: u32 = 0x820;
const REG_ESR: u32 = 0x828;
const REG_ICR: u32 = 0x830;
const REG_LVT_TIMER: u32 = 0x832;
const REG_LVT_THERMAL: u32 = 0x833;
const REG_LVT_PMC: u32 = 0x834;
const REG_LVT_LINT0: u32 = 0x835;
const REG_LVT_LINT1: u32 = 0x836;
const REG_LVT_ERROR: u32 = 0x837;
const REG_TIMER_INITIAL: u32 = 0x838;
const REG_TIMER_CURRENT: u32 = 0x839;
const REG_TIMER_DIVIDE: u32 = 0x83e;
const REG_SELF_IPI: u32 = 0x83f;

/// Version register: version 0x14 (integrated APIC), 6 LVT entries (Max LVT Entry = 5, bits
/// 23:16), no directed-EOI support (bit 24 clear), §11.4.8 Figure 11-7.
pub const APIC_VERSION: u32 = 0x0005_0014;

const LVT_MASKED: u32 = 1 << 16;
const SVR_ENABLE: u32 = 1 << 8;

// ESR bits (§11.5.3, Figure 11-9).
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

/// Why an x2APIC MSR access faults; the VMM injects #GP(0) for every one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicError {
    /// An x2APIC register MSR was accessed while the APIC is not in x2APIC mode (§11.12.1.2:
    /// "RDMSR/WRMSR to these MSRs when x2APIC mode is not enabled causes #GP").
    NotX2ApicMode {
        /// The MSR.
        msr: u32,
    },
    /// The MSR is in 0x800-0x8FF but names no register in Table 11-6.
    NoSuchRegister {
        /// The MSR.
        msr: u32,
    },
    /// A write to a read-only register (Table 11-6).
    ReadOnly {
        /// The MSR.
        msr: u32,
    },
    /// A read of a write-only register (EOI, SELF IPI; Table 11-6).
    WriteOnly {
        /// The MSR.
        msr: u32,
    },
    /// A non-zero write to reserved bits (§11.12.1.3 "Reserved Bit Checking").
    ReservedBits {
        /// The MSR.
        msr: u32,
        /// The value written.
        value: u64,
    },
    /// An `IA32_APIC_BASE` write that is an invalid state or transition (§11.12.5, Figure
    /// 11-27: EN=0 with EXTD=1, x2APIC to xAPIC, disabled to x2APIC), or sets reserved bits.
    InvalidApicBase {
        /// The value written.
        value: u64,
    },
}

impl fmt::Display for ApicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ApicError::NotX2ApicMode { msr } => write!(f, "x2APIC MSR {msr:#x} accessed outside x2APIC mode"),
            ApicError::NoSuchRegister { msr } => write!(f, "MSR {msr:#x} is not an x2APIC register"),
            ApicError::ReadOnly { msr } => write!(f, "x2APIC register {msr:#x} is read-only"),
            ApicError::WriteOnly { msr } => write!(f, "x2APIC register {msr:#x} is write-only"),
            ApicError::ReservedBits { msr, value } => {
                write!(f, "write of {value:#x} to x2APIC register {msr:#x} sets reserved bits")
            }
            ApicError::InvalidApicBase { value } => {
                write!(f, "IA32_APIC_BASE write {value:#x} is an invalid state or transition")
            }
        }
    }
}

impl core::error::Error for ApicError {}

/// A 256-bit vector bitmap (IRR, ISR, TMR; §11.8.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VectorSet([u64; 4]);

impl VectorSet {
    /// Whether `v` is set.
    pub fn contains(&self, v: u8) -> bool {
        self.0[usize::from(v >> 6)] & (1u64 << (v & 63)) != 0
    }
    fn set(&mut self, v: u8) {
        self.0[usize::from(v >> 6)] |= 1u64 << (v & 63);
    }
    fn clear(&mut self, v: u8) {
        self.0[usize::from(v >> 6)] &= !(1u64 << (v & 63));
    }
    /// The highest set vector.
    pub fn highest(&self) -> Option<u8> {
        (0..4).rev().find_map(|i| {
            let w = self.0[i];
            // `i < 4` and `leading_zeros < 64`, so the result is below 256.
            (w != 0).then(|| (i as u32 * 64 + 63 - w.leading_zeros()) as u8)
        })
    }
    /// The 32-bit word `i` (0..8) as the register MSRs present it (§11.8.4, Figure 11-20).
    fn word(&self, i: u32) -> u32 {
        let w = self.0[(i / 2) as usize & 3];
        (if i.is_multiple_of(2) { w } else { w >> 32 }) as u32
    }
}

/// LVT timer modes (§11.5.1, Figure 11-8: bits 18:17).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    /// 00b.
    OneShot,
    /// 01b.
    Periodic,
    /// 10b (needs CPUID.01H:ECX.TSC_Deadline, §11.5.4.1).
    TscDeadline,
    /// 11b: reserved; the timer does not run.
    Reserved,
}

/// Fixed configuration of the APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicConfig {
    /// The x2APIC ID (also CPUID.0BH:EDX).
    pub id: u32,
    /// Guest TSC frequency in Hz.
    pub tsc_hz: u64,
    /// Frequency of the APIC timer's input clock (the "bus clock", §11.5.4) in Hz.
    pub bus_hz: u64,
    /// Start with `IA32_APIC_BASE.EXTD` set (x2APIC mode) rather than in xAPIC mode.
    pub start_in_x2apic: bool,
}

/// What a register write asks of the VMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteEffect {
    /// An EOI completed a level-triggered interrupt with this vector: broadcast it to the I/O
    /// APIC (§11.8.5: "for level-triggered interrupts ... the local APIC broadcasts an EOI
    /// message to all I/O APICs").
    pub eoi_broadcast: Option<u8>,
    /// A self-directed NMI was sent through ICR.
    pub nmi: bool,
    /// An INIT or SIPI was sent (to this or another CPU); the single-vCPU VMM may reset or
    /// ignore it.
    pub init_or_sipi: bool,
}

/// The local x2APIC of one vCPU.
#[derive(Clone, Debug)]
pub struct X2Apic {
    config: ApicConfig,
    apic_base: u64,
    tpr: u32,
    svr: u32,
    isr: VectorSet,
    irr: VectorSet,
    tmr: VectorSet,
    icr: u64,
    esr: u32,
    esr_pending: u32,
    lvt_timer: u32,
    lvt_thermal: u32,
    lvt_pmc: u32,
    lvt_lint0: u32,
    lvt_lint1: u32,
    lvt_error: u32,
    divide_config: u32,
    initial_count: u32,
    /// One-shot/periodic: TSC at which the current count was last loaded.
    count_start: u64,
    /// One-shot/periodic: TSC at which the count reaches zero, if running.
    count_deadline: Option<u64>,
    /// `IA32_TSC_DEADLINE` (0 = disarmed).
    tsc_deadline: u64,
}

impl X2Apic {
    /// The APIC after power-up (§11.4.7.1): masked LVTs, SVR 0xFF (software-disabled).
    pub fn new(config: ApicConfig) -> Self {
        let mode = if config.start_in_x2apic { BASE_EN | BASE_EXTD } else { BASE_EN };
        Self {
            config,
            apic_base: APIC_DEFAULT_BASE | BASE_BSP | mode,
            tpr: 0,
            svr: 0xff,
            isr: VectorSet::default(),
            irr: VectorSet::default(),
            tmr: VectorSet::default(),
            icr: 0,
            esr: 0,
            esr_pending: 0,
            lvt_timer: LVT_MASKED,
            lvt_thermal: LVT_MASKED,
            lvt_pmc: LVT_MASKED,
            lvt_lint0: LVT_MASKED,
            lvt_lint1: LVT_MASKED,
            lvt_error: LVT_MASKED,
            divide_config: 0,
            initial_count: 0,
            count_start: 0,
            count_deadline: None,
            tsc_deadline: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ApicConfig {
        &self.config
    }

    /// `IA32_APIC_BASE`.
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// Whether the APIC is hardware-enabled and in x2APIC mode.
    pub fn x2apic_mode(&self) -> bool {
        self.apic_base & (BASE_EN | BASE_EXTD) == BASE_EN | BASE_EXTD
    }

    fn hw_enabled(&self) -> bool {
        self.apic_base & BASE_EN != 0
    }

    /// Software-enabled (SVR bit 8, §11.4.7.2).
    pub fn sw_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// The interrupt request register.
    pub fn irr(&self) -> &VectorSet {
        &self.irr
    }

    /// The in-service register.
    pub fn isr(&self) -> &VectorSet {
        &self.isr
    }

    /// The trigger mode register.
    pub fn tmr(&self) -> &VectorSet {
        &self.tmr
    }

    /// Writes `IA32_APIC_BASE` (§11.4.4; transitions per §11.12.5, Figure 11-27).
    pub fn write_apic_base(&mut self, value: u64) -> Result<(), ApicError> {
        let err = ApicError::InvalidApicBase { value };
        let allowed = BASE_BSP | BASE_EXTD | BASE_EN | BASE_ADDR_MASK;
        if value & !allowed != 0 {
            return Err(err);
        }
        // The BSP flag is read-only; a write that changes it is ignored (as KVM does) rather
        // than faulted, since firmware-style code writes back what it read.
        let value = (value & !BASE_BSP) | (self.apic_base & BASE_BSP);
        let old_en = self.apic_base & BASE_EN != 0;
        let old_x2 = self.x2apic_mode();
        let new_en = value & BASE_EN != 0;
        let new_extd = value & BASE_EXTD != 0;
        if !new_en && new_extd {
            return Err(err); // EN=0, EXTD=1 is an invalid state.
        }
        if old_x2 && new_en && !new_extd {
            return Err(err); // x2APIC -> xAPIC directly is illegal.
        }
        if !old_en && new_en && new_extd {
            return Err(err); // disabled -> x2APIC directly is illegal.
        }
        if old_en && !new_en {
            // Clearing EN resets the APIC state (§11.4.3: "the local APIC ... is in a state
            // equivalent to power-up reset" when hardware-disabled and re-enabled).
            let config = self.config;
            *self = Self::new(config);
        }
        self.apic_base = value;
        Ok(())
    }

    /// Logical destination: read-only in x2APIC mode, derived from the ID (§11.12.10.2:
    /// "LDR = ((ID[31:4] << 16) | (1 << ID[3:0]))").
    pub fn ldr(&self) -> u32 {
        ((self.config.id >> 4) << 16) | (1 << (self.config.id & 0xf))
    }

    /// The processor-priority register (§11.8.3.1: PPR[7:4] = max(TPR[7:4], ISRV[7:4]), where
    /// ISRV is the highest in-service vector; PPR[3:0] = TPR[3:0] if TPR wins, else 0).
    pub fn ppr(&self) -> u32 {
        let isrv = u32::from(self.isr.highest().unwrap_or(0));
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.lvt_timer >> 17) & 3 {
            0 => TimerMode::OneShot,
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::Reserved,
        }
    }

    /// The current LVT timer mode.
    pub fn timer(&self) -> TimerMode {
        self.timer_mode()
    }

    /// The timer divisor from the divide configuration register (§11.5.4, Figure 11-10: bits
    /// 3,1,0; 111b divides by 1, otherwise by 2^(value+1)).
    fn divisor(&self) -> u64 {
        let v = ((self.divide_config >> 1) & 4) | (self.divide_config & 3);
        if v == 7 {
            1
        } else {
            2u64 << v
        }
    }

    /// TSC ticks for `count` timer ticks at the current divisor, at least 1.
    fn count_to_tsc(&self, count: u64) -> u64 {
        let bus = u128::from(self.config.bus_hz.max(1));
        let t = u128::from(count) * u128::from(self.divisor()) * u128::from(self.config.tsc_hz) / bus;
        u64::try_from(t).unwrap_or(u64::MAX).max(1)
    }

    /// Timer ticks for `tsc` TSC ticks at the current divisor.
    fn tsc_to_count(&self, tsc: u64) -> u64 {
        let denom = u128::from(self.config.tsc_hz.max(1)) * u128::from(self.divisor());
        u64::try_from(u128::from(tsc) * u128::from(self.config.bus_hz) / denom).unwrap_or(u64::MAX)
    }

    /// (Re)loads the count from the initial-count register at `now` (§11.5.4: "the initial
    /// count is copied into the current-count register and count-down begins").
    fn start_count(&mut self, now: u64) {
        self.count_start = now;
        self.count_deadline = match self.timer_mode() {
            TimerMode::OneShot | TimerMode::Periodic if self.initial_count != 0 => {
                Some(now.saturating_add(self.count_to_tsc(u64::from(self.initial_count))))
            }
            _ => None,
        };
    }

    /// The current-count register (§11.5.4; reads 0 in TSC-deadline mode, §11.5.4.1).
    pub fn current_count(&self, now: u64) -> u32 {
        match self.count_deadline {
            Some(deadline) if deadline > now => {
                let remaining = self.tsc_to_count(deadline - now);
                u32::try_from(remaining).unwrap_or(u32::MAX).min(self.initial_count)
            }
            _ => 0,
        }
    }

    /// The guest TSC value at which the timer next needs attention, if armed. The VMM arms a
    /// host timer for it and calls [`X2Apic::tick`] when it passes.
    pub fn next_deadline(&self) -> Option<u64> {
        match self.timer_mode() {
            TimerMode::TscDeadline => (self.tsc_deadline != 0).then_some(self.tsc_deadline),
            TimerMode::OneShot | TimerMode::Periodic => self.count_deadline,
            TimerMode::Reserved => None,
        }
    }

    /// Fires the timer if its deadline has passed at `now`: the LVT timer vector goes into IRR
    /// unless masked. Returns whether the timer expired.
    pub fn tick(&mut self, now: u64) -> bool {
        let expired = match self.timer_mode() {
            TimerMode::TscDeadline => {
                if self.tsc_deadline != 0 && now >= self.tsc_deadline {
                    // §11.5.4.1: "the timer fires ... and the IA32_TSC_DEADLINE MSR is cleared".
                    self.tsc_deadline = 0;
                    true
                } else {
                    false
                }
            }
            TimerMode::OneShot => match self.count_deadline {
                Some(d) if now >= d => {
                    self.count_deadline = None;
                    true
                }
                _ => false,
            },
            TimerMode::Periodic => match self.count_deadline {
                Some(d) if now >= d => {
                    // Reload; periods missed while the VMM was late collapse into one
                    // interrupt (the IRR bit holds one anyway).
                    let period = d.saturating_sub(self.count_start).max(1);
                    let missed = (now - d) / period;
                    let start = d.saturating_add(missed.saturating_mul(period));
                    self.count_start = start;
                    self.count_deadline = Some(start.saturating_add(period));
                    true
                }
                _ => false,
            },
            TimerMode::Reserved => false,
        };
        if expired && self.lvt_timer & LVT_MASKED == 0 {
            let vector = (self.lvt_timer & 0xff) as u8;
            self.accept(vector, false);
        }
        expired
    }

    /// Records an APIC error (§11.5.3) and signals it through the LVT error entry.
    fn error(&mut self, bit: u32) {
        self.esr_pending |= bit;
        if self.lvt_error & LVT_MASKED == 0 {
            let vector = (self.lvt_error & 0xff) as u8;
            if vector >= 16 {
                self.accept(vector, false);
            }
        }
    }

    /// Accepts a fixed interrupt into IRR (§11.8.4). Vectors 0-15 are illegal and set the ESR
    /// "Received Illegal Vector" bit instead (§11.5.2). A software-disabled APIC accepts no
    /// fixed interrupts (§11.4.7.2), nor does a hardware-disabled one.
    fn accept(&mut self, vector: u8, level: bool) -> bool {
        if !self.hw_enabled() || !self.sw_enabled() {
            return false;
        }
        if vector < 16 {
            self.error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return false;
        }
        self.irr.set(vector);
        // §11.8.4: the TMR bit is set for level-triggered interrupts, cleared for edge.
        if level {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
        true
    }

    /// An interrupt from a device (via the I/O APIC) or the VMM: sets the IRR bit. Returns
    /// whether it was accepted.
    pub fn request(&mut self, vector: u8, level_triggered: bool) -> bool {
        self.accept(vector, level_triggered)
    }

    /// The vector to inject now, if any: the highest IRR vector whose priority class is above
    /// PPR's (§11.8.3.1: "the processor will service only those interrupts whose priority class
    /// is higher than the processor-priority class in PPR"). The VMM must also check the vCPU's
    /// RFLAGS.IF and interrupt shadow before injecting.
    pub fn highest_deliverable(&self) -> Option<u8> {
        if !self.hw_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// The VMM injected `vector`: move it from IRR to ISR (§11.8.4: on acceptance by the
    /// processor core, "the IRR bit is cleared and the corresponding ISR bit set"). Returns
    /// false if `vector` was not pending.
    pub fn ack(&mut self, vector: u8) -> bool {
        if !self.irr.contains(vector) {
            return false;
        }
        self.irr.clear(vector);
        self.isr.set(vector);
        true
    }

    /// EOI (§11.8.5): clears the highest ISR bit; a level-triggered vector is broadcast.
    fn eoi(&mut self) -> Option<u8> {
        let v = self.isr.highest()?;
        self.isr.clear(v);
        self.tmr.contains(v).then_some(v)
    }

    /// Writes an LVT entry, keeping the mask set while software-disabled (§11.4.7.2: "the mask
    /// bits for all the LVT entries are set ... attempts to reset these bits will be ignored").
    fn lvt_value(&self, value: u32) -> u32 {
        if self.sw_enabled() {
            value
        } else {
            value | LVT_MASKED
        }
    }

    /// RDMSR of `msr`, one of 0x800-0x8FF, `IA32_APIC_BASE` or `IA32_TSC_DEADLINE`.
    pub fn read_msr(&self, msr: u32, now: u64) -> Result<u64, ApicError> {
        match msr {
            MSR_APIC_BASE => return Ok(self.apic_base),
            // §11.5.4.1: reads return 0 when not in TSC-deadline mode.
            MSR_TSC_DEADLINE => {
                return Ok(if self.timer_mode() == TimerMode::TscDeadline { self.tsc_deadline } else { 0 })
            }
            _ => {}
        }
        if !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(ApicError::NoSuchRegister { msr });
        }
        if !self.x2apic_mode() {
            return Err(ApicError::NotX2ApicMode { msr });
        }
        let v = match msr {
            REG_ID => self.config.id,
            REG_VERSION => APIC_VERSION,
            REG_TPR => self.tpr,
            REG_PPR => self.ppr(),
            REG_LDR => self.ldr(),
            REG_SVR => self.svr,
            REG_ISR0..=0x817 => self.isr.word(msr - REG_ISR0),
            REG_TMR0..=0x81f => self.tmr.word(msr - REG_TMR0),
            REG_IRR0..=0x827 => self.irr.word(msr - REG_IRR0),
            REG_ESR => self.esr,
            REG_ICR => return Ok(self.icr),
            REG_LVT_TIMER => self.lvt_timer,
            REG_LVT_THERMAL => self.lvt_thermal,
            REG_LVT_PMC => self.lvt_pmc,
            REG_LVT_LINT0 => self.lvt_lint0,
            REG_LVT_LINT1 => self.lvt_lint1,
            REG_LVT_ERROR => self.lvt_error,
            REG_TIMER_INITIAL => self.initial_count,
            REG_TIMER_CURRENT => self.current_count(now),
            REG_TIMER_DIVIDE => self.divide_config,
            REG_EOI | REG_SELF_IPI => return Err(ApicError::WriteOnly { msr }),
            _ => return Err(ApicError::NoSuchRegister { msr }),
        };
        Ok(u64::from(v))
    }

    /// WRMSR of `msr`, one of 0x800-0x8FF, `IA32_APIC_BASE` or `IA32_TSC_DEADLINE`.
    pub fn write_msr(&mut self, msr: u32, value: u64, now: u64) -> Result<WriteEffect, ApicError> {
        let mut effect = WriteEffect::default();
        match msr {
            MSR_APIC_BASE => {
                self.write_apic_base(value)?;
                return Ok(effect);
            }
            MSR_TSC_DEADLINE => {
                // §11.5.4.1: writes are ignored unless in TSC-deadline mode; writing 0 disarms.
                if self.timer_mode() == TimerMode::TscDeadline {
                    self.tsc_deadline = value;
                }
                return Ok(effect);
            }
            _ => {}
        }
        if !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(ApicError::NoSuchRegister { msr });
        }
        if !self.x2apic_mode() {
            return Err(ApicError::NotX2ApicMode { msr });
        }
        // All registers except ICR are 32 bits; bits 63:32 are reserved (Table 11-6).
        let reserved = |mask: u64| -> Result<u32, ApicError> {
            if value & !mask != 0 {
                Err(ApicError::ReservedBits { msr, value })
            } else {
                Ok(value as u32)
            }
        };
        match msr {
            REG_TPR => self.tpr = reserved(0xff)?,
            REG_EOI => {
                // Table 11-6 note: "WRMSR to EOI with a non-zero value causes #GP(0)".
                reserved(0)?;
                effect.eoi_broadcast = self.eoi();
            }
            REG_SVR => {
                // Vector, APIC software enable, focus processor checking (bit 9, stored as
                // KVM does); EOI-broadcast suppression (bit 12) is not offered (version bit
                // 24 clear), so it is reserved.
                let v = reserved(0x3ff)?;
                self.svr = v;
                if v & SVR_ENABLE == 0 {
                    for lvt in [
                        &mut self.lvt_timer,
                        &mut self.lvt_thermal,
                        &mut self.lvt_pmc,
                        &mut self.lvt_lint0,
                        &mut self.lvt_lint1,
                        &mut self.lvt_error,
                    ] {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                // Table 11-6: "WRMSR of a non-zero value causes #GP(0)". A write latches the
                // errors seen since the previous write (§11.5.3).
                reserved(0)?;
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            REG_ICR => self.write_icr(value, &mut effect)?,
            REG_LVT_TIMER => {
                // Vector, delivery status (RO), mask, mode (Figure 11-8).
                let v = reserved(0x0007_10ff)? & !(1 << 12);
                let old_mode = self.timer_mode();
                self.lvt_timer = self.lvt_value(v);
                let new_mode = self.timer_mode();
                if old_mode != new_mode {
                    // §11.5.4.1: switching between TSC-deadline and the other modes disarms
                    // the timer; one-shot <-> periodic keeps counting from the same start.
                    if old_mode == TimerMode::TscDeadline || new_mode == TimerMode::TscDeadline {
                        self.tsc_deadline = 0;
                        self.initial_count = 0;
                        self.count_deadline = None;
                    }
                }
            }
            REG_LVT_THERMAL | REG_LVT_PMC => {
                // Vector, delivery mode, status (RO), mask.
                let v = reserved(0x0001_17ff)? & !(1 << 12);
                let v = self.lvt_value(v);
                if msr == REG_LVT_THERMAL {
                    self.lvt_thermal = v;
                } else {
                    self.lvt_pmc = v;
                }
            }
            REG_LVT_LINT0 | REG_LVT_LINT1 => {
                // Vector, delivery mode, status (RO), polarity, remote IRR (RO), trigger, mask.
                let v = reserved(0x0001_f7ff)? & !((1 << 12) | (1 << 14));
                let v = self.lvt_value(v);
                if msr == REG_LVT_LINT0 {
                    self.lvt_lint0 = v;
                } else {
                    self.lvt_lint1 = v;
                }
            }
            REG_LVT_ERROR => {
                let v = reserved(0x0001_10ff)? & !(1 << 12);
                self.lvt_error = self.lvt_value(v);
            }
            REG_TIMER_INITIAL => {
                let v = reserved(0xffff_ffff)?;
                // §11.5.4.1: "In TSC-deadline mode, writes to the initial-count register are
                // ignored". Elsewhere a write (re)starts the count; 0 stops it (§11.5.4).
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.initial_count = v;
                    self.start_count(now);
                }
            }
            REG_TIMER_DIVIDE => {
                let v = reserved(0xb)?;
                // Keep the remaining count in timer ticks across the divisor change.
                let remaining = self.current_count(now);
                self.divide_config = v;
                if let Some(d) = self.count_deadline {
                    if d > now {
                        let elapsed_ticks = u64::from(self.initial_count.saturating_sub(remaining));
                        self.count_start = now.saturating_sub(self.count_to_tsc(elapsed_ticks));
                        self.count_deadline = Some(now.saturating_add(self.count_to_tsc(u64::from(remaining))));
                    }
                }
            }
            REG_SELF_IPI => {
                // §11.12.11: bits 7:0 vector, the rest reserved; an edge-triggered fixed
                // interrupt to self.
                let v = reserved(0xff)? as u8;
                if v < 16 {
                    self.error(ESR_SEND_ILLEGAL_VECTOR);
                } else {
                    self.accept(v, false);
                }
            }
            REG_ID | REG_VERSION | REG_PPR | REG_LDR | REG_TIMER_CURRENT => return Err(ApicError::ReadOnly { msr }),
            REG_ISR0..=0x827 => return Err(ApicError::ReadOnly { msr }),
            _ => return Err(ApicError::NoSuchRegister { msr }),
        }
        Ok(effect)
    }

    /// ICR write (§11.12.9, Figure 11-28): bits 7:0 vector, 10:8 delivery mode, 11 destination
    /// mode, 14 level, 15 trigger mode, 19:18 shorthand, 63:32 destination; 12, 13, 16, 17 and
    /// 31:20 reserved. With one CPU only interrupts that reach this APIC matter: shorthand
    /// self, all-including-self, or a physical destination equal to our ID (or broadcast).
    fn write_icr(&mut self, value: u64, effect: &mut WriteEffect) -> Result<(), ApicError> {
        let msr = REG_ICR;
        if value & 0x0000_0000_fff3_3000 != 0 {
            return Err(ApicError::ReservedBits { msr, value });
        }
        self.icr = value;
        let vector = (value & 0xff) as u8;
        let delivery = (value >> 8) & 7;
        let logical = value & (1 << 11) != 0;
        let shorthand = (value >> 18) & 3;
        let dest = (value >> 32) as u32;
        let to_self = match shorthand {
            1 | 2 => true, // self, all including self
            3 => false,    // all excluding self: no other CPUs
            _ if logical => dest & self.ldr() != 0 || dest == u32::MAX,
            _ => dest == self.config.id || dest == u32::MAX,
        };
        match delivery {
            // Fixed, or lowest priority (which with one CPU can only pick this one).
            0 | 1 if to_self => {
                if vector < 16 {
                    self.error(ESR_SEND_ILLEGAL_VECTOR);
                } else {
                    self.accept(vector, false);
                }
            }
            4 if to_self => effect.nmi = true,
            5 | 6 => effect.init_or_sipi = true,
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TSC_HZ: u64 = 2_000_000_000;
    const BUS_HZ: u64 = 1_000_000_000;

    fn apic() -> X2Apic {
        let mut a = X2Apic::new(ApicConfig { id: 0, tsc_hz: TSC_HZ, bus_hz: BUS_HZ, start_in_x2apic: true });
        a.write_msr(REG_SVR, 0x1ff, 0).unwrap();
        a
    }

    #[test]
    fn identity_registers() {
        let a = apic();
        assert_eq!(a.read_msr(REG_ID, 0), Ok(0));
        assert_eq!(a.read_msr(REG_VERSION, 0), Ok(0x50014));
        assert_eq!(a.read_msr(REG_LDR, 0), Ok(1));
        assert_eq!(a.read_msr(MSR_APIC_BASE, 0), Ok(0xfee0_0d00));
        let b = X2Apic::new(ApicConfig { id: 0x23, tsc_hz: 1, bus_hz: 1, start_in_x2apic: true });
        assert_eq!(b.ldr(), (2 << 16) | (1 << 3));
        assert_eq!(b.read_msr(REG_SVR, 0), Ok(0xff));
        assert_eq!(b.read_msr(REG_LVT_TIMER, 0), Ok(u64::from(LVT_MASKED)));
    }

    #[test]
    fn access_rules() {
        let mut a = apic();
        assert_eq!(a.write_msr(REG_ID, 1, 0), Err(ApicError::ReadOnly { msr: REG_ID }));
        assert_eq!(a.write_msr(0x812, 0, 0), Err(ApicError::ReadOnly { msr: 0x812 }));
        assert_eq!(a.read_msr(REG_EOI, 0), Err(ApicError::WriteOnly { msr: REG_EOI }));
        assert_eq!(a.read_msr(REG_SELF_IPI, 0), Err(ApicError::WriteOnly { msr: REG_SELF_IPI }));
        assert_eq!(a.write_msr(REG_EOI, 1, 0), Err(ApicError::ReservedBits { msr: REG_EOI, value: 1 }));
        assert_eq!(a.write_msr(REG_ESR, 1, 0), Err(ApicError::ReservedBits { msr: REG_ESR, value: 1 }));
        assert_eq!(a.write_msr(REG_TPR, 0x100, 0), Err(ApicError::ReservedBits { msr: REG_TPR, value: 0x100 }));
        assert!(a.write_msr(REG_TPR, 1 << 32, 0).is_err());
        assert_eq!(a.read_msr(0x831, 0), Err(ApicError::NoSuchRegister { msr: 0x831 }));
        assert_eq!(a.read_msr(0x809, 0), Err(ApicError::NoSuchRegister { msr: 0x809 }));
        assert_eq!(a.read_msr(0x82f, 0), Err(ApicError::NoSuchRegister { msr: 0x82f }), "no CMCI LVT");
        assert_eq!(a.read_msr(0x10, 0), Err(ApicError::NoSuchRegister { msr: 0x10 }));
        assert!(a.write_msr(REG_ICR, 1 << 12, 0).is_err());
        assert!(a.write_msr(REG_SVR, 1 << 12, 0).is_err());
        assert!(a.write_msr(REG_TIMER_DIVIDE, 4, 0).is_err());
        // Not in x2APIC mode: every register MSR faults.
        let b = X2Apic::new(ApicConfig { id: 0, tsc_hz: 1, bus_hz: 1, start_in_x2apic: false });
        assert_eq!(b.read_msr(REG_ID, 0), Err(ApicError::NotX2ApicMode { msr: REG_ID }));
        for e in [
            ApicError::NotX2ApicMode { msr: 1 },
            ApicError::NoSuchRegister { msr: 1 },
            ApicError::ReadOnly { msr: 1 },
            ApicError::WriteOnly { msr: 1 },
            ApicError::ReservedBits { msr: 1, value: 2 },
            ApicError::InvalidApicBase { value: 3 },
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn apic_base_transitions() {
        let cfg = ApicConfig { id: 0, tsc_hz: 1, bus_hz: 1, start_in_x2apic: false };
        let mut a = X2Apic::new(cfg);
        assert_eq!(a.apic_base(), 0xfee0_0900);
        // EN=0, EXTD=1 invalid.
        assert!(a.write_apic_base(0xfee0_0400).is_err());
        // xAPIC -> x2APIC fine.
        a.write_apic_base(0xfee0_0c00).unwrap();
        assert!(a.x2apic_mode());
        assert_eq!(a.apic_base() & BASE_BSP, BASE_BSP, "BSP is read-only");
        // x2APIC -> xAPIC illegal.
        assert!(a.write_apic_base(0xfee0_0800).is_err());
        // x2APIC -> disabled fine, resets state.
        a.write_msr(REG_TPR, 0x20, 0).unwrap();
        a.write_apic_base(0xfee0_0000).unwrap();
        assert!(!a.x2apic_mode());
        // disabled -> x2APIC illegal; disabled -> xAPIC fine.
        assert!(a.write_apic_base(0xfee0_0c00).is_err());
        a.write_apic_base(0xfee0_0800).unwrap();
        a.write_apic_base(0xfee0_0c00).unwrap();
        assert_eq!(a.read_msr(REG_TPR, 0), Ok(0));
        // Reserved bits.
        assert!(a.write_apic_base(0xfee0_0c01).is_err());
        assert!(a.write_apic_base(1 << 63).is_err());
    }

    #[test]
    fn acceptance_priority_and_eoi() {
        let mut a = apic();
        assert!(a.request(0x31, false));
        assert!(a.request(0x52, true));
        assert_eq!(a.highest_deliverable(), Some(0x52));
        // TPR masks class 5 and below.
        a.write_msr(REG_TPR, 0x50, 0).unwrap();
        assert_eq!(a.highest_deliverable(), None);
        assert_eq!(a.read_msr(REG_PPR, 0), Ok(0x50));
        a.write_msr(REG_TPR, 0x4f, 0).unwrap();
        assert_eq!(a.highest_deliverable(), Some(0x52));
        a.write_msr(REG_TPR, 0, 0).unwrap();
        assert!(a.ack(0x52));
        assert!(!a.ack(0x52), "no longer pending");
        assert_eq!(a.read_msr(REG_ISR0 + 2, 0), Ok(1 << (0x52 - 64)));
        assert_eq!(a.read_msr(REG_TMR0 + 2, 0), Ok(1 << (0x52 - 64)));
        assert_eq!(a.read_msr(REG_PPR, 0), Ok(0x50));
        // 0x31 is a lower class than the in-service 0x52: held.
        assert_eq!(a.highest_deliverable(), None);
        // A higher class nests.
        a.request(0x61, false);
        assert_eq!(a.highest_deliverable(), Some(0x61));
        // Same class as in service does not nest.
        a.request(0x5f, false);
        assert_eq!(a.highest_deliverable(), Some(0x61));
        a.ack(0x61);
        assert_eq!(a.write_msr(REG_EOI, 0, 0).unwrap().eoi_broadcast, None, "edge: no broadcast");
        assert_eq!(a.write_msr(REG_EOI, 0, 0).unwrap().eoi_broadcast, Some(0x52), "level: broadcast");
        assert_eq!(a.highest_deliverable(), Some(0x5f));
        a.ack(0x5f);
        a.write_msr(REG_EOI, 0, 0).unwrap();
        assert_eq!(a.highest_deliverable(), Some(0x31));
        // EOI with nothing in service is harmless.
        a.ack(0x31);
        a.write_msr(REG_EOI, 0, 0).unwrap();
        assert_eq!(a.write_msr(REG_EOI, 0, 0), Ok(WriteEffect::default()));
        assert_eq!(a.highest_deliverable(), None);
    }

    #[test]
    fn illegal_vectors_and_esr() {
        let mut a = apic();
        a.write_msr(REG_LVT_ERROR, 0xfe, 0).unwrap();
        assert!(!a.request(3, false));
        a.write_msr(REG_SELF_IPI, 5, 0).unwrap();
        assert_eq!(a.read_msr(REG_ESR, 0), Ok(0), "ESR updates only on write");
        a.write_msr(REG_ESR, 0, 0).unwrap();
        assert_eq!(a.read_msr(REG_ESR, 0), Ok(u64::from(ESR_RECEIVE_ILLEGAL_VECTOR | ESR_SEND_ILLEGAL_VECTOR)));
        a.write_msr(REG_ESR, 0, 0).unwrap();
        assert_eq!(a.read_msr(REG_ESR, 0), Ok(0));
        assert_eq!(a.highest_deliverable(), Some(0xfe), "error LVT fired");
    }

    #[test]
    fn software_disable_masks_and_drops() {
        let mut a = apic();
        a.write_msr(REG_LVT_TIMER, 0x40, 0).unwrap();
        a.write_msr(REG_SVR, 0xff, 0).unwrap();
        assert_eq!(a.read_msr(REG_LVT_TIMER, 0), Ok(0x40 | u64::from(LVT_MASKED)));
        a.write_msr(REG_LVT_TIMER, 0x40, 0).unwrap();
        assert_eq!(a.read_msr(REG_LVT_TIMER, 0), Ok(0x40 | u64::from(LVT_MASKED)), "mask sticks");
        assert!(!a.request(0x40, false));
        a.write_msr(REG_SVR, 0x1ff, 0).unwrap();
        a.write_msr(REG_LVT_TIMER, 0x40, 0).unwrap();
        assert_eq!(a.read_msr(REG_LVT_TIMER, 0), Ok(0x40));
    }

    #[test]
    fn self_ipi_and_icr() {
        let mut a = apic();
        a.write_msr(REG_SELF_IPI, 0xf3, 0).unwrap();
        assert_eq!(a.highest_deliverable(), Some(0xf3));
        a.ack(0xf3);
        a.write_msr(REG_EOI, 0, 0).unwrap();
        assert!(a.write_msr(REG_SELF_IPI, 0x100, 0).is_err());
        // Fixed, shorthand self.
        a.write_msr(REG_ICR, (1 << 18) | 0x44, 0).unwrap();
        assert_eq!(a.read_msr(REG_ICR, 0), Ok((1 << 18) | 0x44));
        // Fixed, physical destination 0 (us).
        a.write_msr(REG_ICR, 0x45, 0).unwrap();
        // Fixed to APIC 7: nobody.
        a.write_msr(REG_ICR, (7 << 32) | 0x46, 0).unwrap();
        // All excluding self: nobody.
        a.write_msr(REG_ICR, (3 << 18) | 0x47, 0).unwrap();
        assert_eq!(a.irr().highest(), Some(0x45));
        assert!(!a.irr().contains(0x46) && !a.irr().contains(0x47) && a.irr().contains(0x44));
        // NMI to self, INIT to all.
        assert!(a.write_msr(REG_ICR, (1 << 18) | (4 << 8), 0).unwrap().nmi);
        assert!(a.write_msr(REG_ICR, (3 << 18) | (5 << 8), 0).unwrap().init_or_sipi);
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut a = apic();
        a.write_msr(MSR_TSC_DEADLINE, 1000, 0).unwrap();
        assert_eq!(a.read_msr(MSR_TSC_DEADLINE, 0), Ok(0), "ignored outside deadline mode");
        assert_eq!(a.next_deadline(), None);
        a.write_msr(REG_LVT_TIMER, (2 << 17) | 0xec, 0).unwrap();
        assert_eq!(a.timer(), TimerMode::TscDeadline);
        a.write_msr(MSR_TSC_DEADLINE, 5000, 0).unwrap();
        assert_eq!(a.next_deadline(), Some(5000));
        a.write_msr(REG_TIMER_INITIAL, 100, 0).unwrap();
        assert_eq!(a.read_msr(REG_TIMER_INITIAL, 0), Ok(0), "initial count ignored");
        assert_eq!(a.read_msr(REG_TIMER_CURRENT, 10), Ok(0));
        assert!(!a.tick(4999));
        assert!(a.tick(5000));
        assert_eq!(a.highest_deliverable(), Some(0xec));
        assert_eq!(a.read_msr(MSR_TSC_DEADLINE, 0), Ok(0), "cleared on expiry");
        assert_eq!(a.next_deadline(), None);
        assert!(!a.tick(6000));
        // Disarm with 0; switching modes disarms.
        a.write_msr(MSR_TSC_DEADLINE, 7000, 0).unwrap();
        a.write_msr(MSR_TSC_DEADLINE, 0, 0).unwrap();
        assert_eq!(a.next_deadline(), None);
        a.write_msr(MSR_TSC_DEADLINE, 7000, 0).unwrap();
        a.write_msr(REG_LVT_TIMER, 0xec, 0).unwrap();
        assert_eq!(a.next_deadline(), None);
        // Masked: expires without an interrupt.
        let mut b = apic();
        b.write_msr(REG_LVT_TIMER, (2 << 17) | LVT_MASKED as u64 | 0xec, 0).unwrap();
        b.write_msr(MSR_TSC_DEADLINE, 10, 0).unwrap();
        assert!(b.tick(10));
        assert_eq!(b.highest_deliverable(), None);
    }

    #[test]
    fn one_shot_and_periodic_timer() {
        let mut a = apic();
        // Divide by 1 (0b1011): one timer tick = 2 TSC ticks at 2 GHz TSC / 1 GHz bus.
        a.write_msr(REG_TIMER_DIVIDE, 0xb, 0).unwrap();
        a.write_msr(REG_LVT_TIMER, 0x30, 0).unwrap();
        a.write_msr(REG_TIMER_INITIAL, 1000, 100).unwrap();
        assert_eq!(a.next_deadline(), Some(2100));
        assert_eq!(a.read_msr(REG_TIMER_CURRENT, 100), Ok(1000));
        assert_eq!(a.read_msr(REG_TIMER_CURRENT, 1100), Ok(500));
        assert!(!a.tick(2099));
        assert!(a.tick(2100));
        assert_eq!(a.read_msr(REG_TIMER_CURRENT, 2100), Ok(0));
        assert_eq!(a.next_deadline(), None, "one-shot stops");
        assert_eq!(a.highest_deliverable(), Some(0x30));
        // Divide by 2 (0b0000) doubles the period.
        a.write_msr(REG_TIMER_DIVIDE, 0, 0).unwrap();
        a.write_msr(REG_TIMER_INITIAL, 1000, 0).unwrap();
        assert_eq!(a.next_deadline(), Some(4000));
        // Writing 0 stops it.
        a.write_msr(REG_TIMER_INITIAL, 0, 10).unwrap();
        assert_eq!(a.next_deadline(), None);
        // Periodic reloads; a late tick collapses missed periods.
        a.write_msr(REG_LVT_TIMER, (1 << 17) | 0x31, 0).unwrap();
        a.write_msr(REG_TIMER_INITIAL, 1000, 0).unwrap();
        assert!(a.tick(4000));
        assert_eq!(a.next_deadline(), Some(8000));
        assert!(a.tick(20_500));
        assert_eq!(a.next_deadline(), Some(24_000));
        assert_eq!(a.read_msr(REG_TIMER_CURRENT, 22_000), Ok(500));
        // Divisor change mid-count keeps the remaining ticks.
        a.write_msr(REG_TIMER_DIVIDE, 0xb, 22_000).unwrap();
        assert_eq!(a.next_deadline(), Some(23_000));
    }

    proptest! {
        /// Arbitrary MSR traffic never panics, IRR/ISR bits below 16 never get set, and a
        /// deliverable vector is always in IRR.
        #[test]
        fn prop_hostile_msrs(ops in proptest::collection::vec((0x7f0u32..0x910, any::<u64>(), any::<u64>(), 0u8..5), 0..200)) {
            let mut a = apic();
            for (msr, value, now, kind) in ops {
                let small = value & 0x3_ffff;
                match kind {
                    0 => { let _ = a.read_msr(msr, now); }
                    1 => { let _ = a.write_msr(msr, value, now); }
                    2 => { let _ = a.write_msr(msr, small, now); }
                    3 => { a.tick(now); }
                    _ => {
                        if let Some(v) = a.highest_deliverable() {
                            prop_assert!(a.irr().contains(v));
                            prop_assert!(a.ack(v));
                        }
                    }
                }
                let _ = a.write_msr(MSR_TSC_DEADLINE, value, now);
                let _ = a.write_msr(MSR_APIC_BASE, value, now);
                prop_assert_eq!(a.irr().0[0] & 0xffff, 0);
                prop_assert_eq!(a.isr().0[0] & 0xffff, 0);
                let _ = a.next_deadline();
                let _ = a.current_count(now);
            }
        }
    }
}
