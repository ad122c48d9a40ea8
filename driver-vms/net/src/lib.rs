//! The net driver VM's portable logic, built and tested on the host as well as bare metal:
//! the Ethernet switch between guests and the device, the start-up ARP probe, how drops are
//! counted, how long to poll before sleeping, and the crash injection for restart tests. The driver itself (device
//! bring-up, interrupts, the serve loop) is the `net-driver` binary.
#![cfg_attr(not(test), no_std)]

pub mod arp;
pub mod crash;
pub mod drops;
pub mod idle_poll;
pub mod switch;
