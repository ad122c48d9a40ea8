//! Host tests of the kernel core (see the module docs of `kernel`).
