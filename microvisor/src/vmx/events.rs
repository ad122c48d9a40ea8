//! Events into the guest: the offered virtual interrupt (SVM's V_IRQ, kept in software
//! here), interrupt-window exiting, injection, and the re-injection of an event an exit
//! cut short. Through the [`Vmcs`] accessor, so host-tested.

use ipc_spec::exit::Event;

use super::controls::proc1;
use super::vmcs::{self as f, Vmcs};

/// Interruption-information valid bit (tables 24-15, 24-16).
const VALID: u64 = 1 << 31;
const RFLAGS_IF: u64 = 1 << 9;

/// A vCPU's virtual interrupt state besides the VMCS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interrupts {
    /// The vector offered to the guest, taken when it can: VMX has no V_IRQ without APIC
    /// virtualization, so an entry injects it when the guest is interruptible and
    /// interrupt-window exiting waits for that moment otherwise.
    pub offered: Option<u8>,
    /// The kernel asked for an exit when the guest can take an interrupt.
    pub window: bool,
    /// Interrupt-window exiting is set in the VMCS now.
    pub armed: bool,
}

impl Interrupts {
    pub const NONE: Self = Self { offered: None, window: false, armed: false };

    /// Whether the entry has interrupt work to do ([`Self::prepare`]).
    #[inline(always)]
    pub fn pending(&self) -> bool {
        self.offered.is_some() || self.window || self.armed
    }

    /// Before an entry: inject the offered vector if the guest can take it now, and arm
    /// interrupt-window exiting (table 24-6: an exit at the start of any instruction with
    /// RFLAGS.IF set and no blocking by STI or MOV SS) while something still waits.
    /// `proc1` is the vCPU's primary controls without the window bit.
    pub fn prepare(&mut self, v: &mut impl Vmcs, proc1: u32) {
        if let Some(vector) = self.offered {
            if interruptible(v) {
                v.write(f::ENTRY_INTERRUPTION_INFO, VALID | vector as u64);
                self.offered = None;
            }
        }
        let arm = self.offered.is_some() || self.window;
        if arm != self.armed {
            let window = if arm { proc1::INTERRUPT_WINDOW_EXITING } else { 0 };
            v.write(f::PROC_CONTROLS, (proc1 | window) as u64);
            self.armed = arm;
        }
    }
}

/// The guest would take an external interrupt at its next instruction (SDM 26.3.1.5 and
/// 26.6.5): RFLAGS.IF set, no blocking by STI or MOV SS, no event waiting for injection.
pub fn interruptible(v: &impl Vmcs) -> bool {
    v.read(f::GUEST_RFLAGS) & RFLAGS_IF != 0
        && v.read(f::GUEST_INTERRUPTIBILITY) & 3 == 0
        && v.read(f::ENTRY_INTERRUPTION_INFO) & VALID == 0
}

/// Deliver `event` at the next entry. The VM-entry interruption information (table 24-16)
/// has the layout of the low half of the ABI's event word (vector, type, error-code flag,
/// valid); the error code has its own field.
pub fn inject(v: &mut impl Vmcs, event: Event) {
    let e = event.encode();
    v.write(f::ENTRY_INTERRUPTION_INFO, e & 0x8000_0fff);
    v.write(f::ENTRY_EXCEPTION_ERROR, e >> 32);
}

/// After an exit: an exit during event delivery (an interrupt the entry injected, an
/// exception, a software interrupt) records the event in the IDT-vectoring information
/// and it is not delivered (SDM 27.2.4); it is re-injected with the same information (bit
/// 12 is undefined there and reserved on entry), error code and, for software events, the
/// exit's instruction length `len`. Left there, an injected interrupt would be lost.
pub fn reinject(v: &mut impl Vmcs, len: u64) {
    let vectoring = v.read(f::IDT_VECTORING_INFO);
    if vectoring & VALID != 0 {
        v.write(f::ENTRY_INTERRUPTION_INFO, vectoring & !(1 << 12));
        if vectoring & (1 << 11) != 0 {
            v.write(f::ENTRY_EXCEPTION_ERROR, v.read(f::IDT_VECTORING_ERROR));
        }
        v.write(f::ENTRY_INSTRUCTION_LENGTH, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::vmcs::FakeVmcs;

    const PROC1: u32 = 0x8400_0000;

    fn guest(rflags: u64, blocking: u64) -> FakeVmcs {
        let mut v = FakeVmcs::default();
        v.write(f::GUEST_RFLAGS, rflags);
        v.write(f::GUEST_INTERRUPTIBILITY, blocking);
        v
    }

    #[test]
    fn an_offered_vector_is_injected_when_the_guest_can_take_it() {
        let mut v = guest(0x202, 0);
        let mut i = Interrupts { offered: Some(0x40), ..Interrupts::NONE };
        assert!(i.pending());
        i.prepare(&mut v, PROC1);
        assert_eq!(v.read(f::ENTRY_INTERRUPTION_INFO), VALID | 0x40);
        assert_eq!(i, Interrupts::NONE, "taken, no window needed");
        assert!(!i.pending());
        assert!(!interruptible(&v), "the entry slot is taken");
    }

    #[test]
    fn otherwise_the_window_exit_waits_for_the_guest() {
        for (rflags, blocking) in [(0x2, 0), (0x202, 1), (0x202, 2)] {
            let mut v = guest(rflags, blocking);
            let mut i = Interrupts { offered: Some(0x41), ..Interrupts::NONE };
            i.prepare(&mut v, PROC1);
            assert_eq!(v.read(f::ENTRY_INTERRUPTION_INFO), 0, "IF clear or a shadow: not injected");
            assert_eq!(v.read(f::PROC_CONTROLS), (PROC1 | proc1::INTERRUPT_WINDOW_EXITING) as u64);
            assert!(i.armed && i.offered == Some(0x41));
            // The window exit came: the guest is interruptible; the next entry injects it
            // and disarms the window.
            v.write(f::GUEST_RFLAGS, 0x202);
            v.write(f::GUEST_INTERRUPTIBILITY, 0);
            i.prepare(&mut v, PROC1);
            assert_eq!(v.read(f::ENTRY_INTERRUPTION_INFO), VALID | 0x41);
            assert_eq!(v.read(f::PROC_CONTROLS), PROC1 as u64);
            assert_eq!(i, Interrupts::NONE);
        }
    }

    #[test]
    fn an_injected_event_goes_first_and_the_offered_one_waits() {
        let mut v = guest(0x202, 0);
        inject(&mut v, Event::Interrupt(0x42));
        let mut i = Interrupts { offered: Some(0x40), window: true, armed: false };
        i.prepare(&mut v, PROC1);
        assert_eq!(v.read(f::ENTRY_INTERRUPTION_INFO), VALID | 0x42);
        assert!(i.armed && i.offered == Some(0x40));
    }

    #[test]
    fn events_are_encoded_and_reinjected() {
        let mut v = FakeVmcs::default();
        inject(&mut v, Event::Exception(13, Some(0x18)));
        assert_eq!(v.read(f::ENTRY_INTERRUPTION_INFO), VALID | 1 << 11 | 3 << 8 | 13);
        assert_eq!(v.read(f::ENTRY_EXCEPTION_ERROR), 0x18);
        // A #PF cut short by an EPT violation, with its error code; bit 12 dropped.
        let mut v = FakeVmcs::default();
        v.write(f::IDT_VECTORING_INFO, VALID | 1 << 12 | 1 << 11 | 3 << 8 | 14);
        v.write(f::IDT_VECTORING_ERROR, 2);
        reinject(&mut v, 0);
        assert_eq!(v.read(f::ENTRY_INTERRUPTION_INFO), VALID | 1 << 11 | 3 << 8 | 14);
        assert_eq!(v.read(f::ENTRY_EXCEPTION_ERROR), 2);
        // Nothing under way: nothing changes.
        let mut v = FakeVmcs::default();
        reinject(&mut v, 3);
        assert!(!v.0.contains_key(&f::ENTRY_INTERRUPTION_INFO));
    }
}
