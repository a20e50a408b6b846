//! QMP: QEMU Machine Protocol server and client.
