//! The demo guest's portable logic, tested on the host: the HTTP server's request handling.
#![cfg_attr(not(test), no_std)]

pub mod http;
