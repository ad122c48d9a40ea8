//! The kernel's scheduling operations: ready, preempt, switch, block, tick, halt, yield.
//! (The queues are in `sched.rs`.)

use super::*;

impl<F: Stage2Format> Kernel<F> {
    /// Put a vCPU in the run queue.
    pub fn make_ready(&mut self, v: VcpuId) {
        let vcpu = &mut self.vcpus[v as usize];
        // (Only a VM can be paused: ordinary domains pay one test of a flag at hand.)
        if vcpu.vm && self.domains[vcpu.domain as usize].paused {
            vcpu.state = VcpuState::Paused;
            return;
        }
        vcpu.state = VcpuState::Ready;
        let prio = vcpu.priority;
        self.runq.push(v, prio, &mut self.next);
        // A higher-priority vCPU takes the CPU at once.
        self.preempt_for(Some(prio));
    }

    /// The running vCPU goes back to the run queue; the best ready one runs.
    pub fn preempt(&mut self) {
        if let Some(c) = self.current.take() {
            let vcpu = &mut self.vcpus[c as usize];
            vcpu.state = VcpuState::Ready;
            let prio = vcpu.priority;
            self.runq.push(c, prio, &mut self.next);
        }
        self.schedule();
    }

    /// If nothing runs, run the highest-priority ready vCPU.
    pub fn schedule(&mut self) {
        if self.current.is_some() {
            return;
        }
        if let Some(v) = self.runq.pop_highest(&mut self.next) {
            self.switch_to(v);
        }
    }

    /// Make `v` the running vCPU (it must be out of every queue).
    /// (A vCPU keeps what is left of its time slice; one that has used it up is rotated at
    /// the next tick.)
    pub fn switch_to(&mut self, v: VcpuId) {
        self.vcpus[v as usize].state = VcpuState::Running;
        self.current = Some(v);
    }

    /// The running vCPU stops running with `state` (a blocked or stopped state).
    pub fn block_current(&mut self, state: VcpuState) {
        if let Some(c) = self.current.take() {
            self.vcpus[c as usize].state = state;
        }
    }

    /// Timer tick: fire due virtual timers and rotate equal-priority vCPUs.
    pub fn tick(&mut self, now_ns: u64) {
        self.stats.ticks += 1;
        self.fire_timers(now_ns);
        if let Some(c) = self.current {
            let vcpu = &mut self.vcpus[c as usize];
            vcpu.slice_left = vcpu.slice_left.saturating_sub(1);
            if vcpu.slice_left == 0 {
                // Slice used up: a fresh one, and equal or higher priorities go first.
                vcpu.slice_left = TIME_SLICE_TICKS;
                let prio = vcpu.priority;
                if self.runq.highest().is_some_and(|h| h >= prio) {
                    self.preempt();
                }
            }
        } else {
            self.schedule();
        }
    }

    /// The running vCPU executed HLT.
    pub fn halt(&mut self, v: VcpuId) {
        if self.vcpus[v as usize].has_irq() {
            return;
        }
        if self.current == Some(v) {
            self.block_current(VcpuState::Halted);
            self.schedule();
        }
    }

    /// Give up the CPU to an equal- or higher-priority ready vCPU.
    pub fn yield_current(&mut self) {
        if let Some(c) = self.current {
            if self.runq.highest().is_some_and(|h| h >= self.vcpus[c as usize].priority) {
                self.preempt();
            }
        }
    }
}
