//! QEMU migration capabilities and parameters.
