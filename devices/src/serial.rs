//! The 16550 UART on COM1 (vm-superio), with its output sent to the console, a file or nowhere.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial as Uart, Trigger};

/// Where the guest's serial output goes (`--serial stdout|file:PATH|none`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file: created or truncated, or appended to by an incoming guest.
    File(PathBuf),
    /// Discarded.
    None,
}

impl FromStr for SerialOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(SerialOutput::Stdout),
            "none" | "null" => Ok(SerialOutput::None),
            _ => s
                .strip_prefix("file:")
                .filter(|p| !p.is_empty())
                .map(|p| SerialOutput::File(PathBuf::from(p)))
                .ok_or_else(|| format!("'{s}' is not a serial output (stdout, file:PATH or none)")),
        }
    }
}

/// The guest has no interrupt controller wired to the UART: interrupts go nowhere.
#[derive(Debug, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = io::Error;
    fn trigger(&self) -> Result<(), io::Error> {
        Ok(())
    }
}

/// Sink that writes to the chosen output and keeps the last bytes for inspection.
pub struct SerialSink {
    out: Option<Box<dyn Write + Send>>,
    tail: Arc<Mutex<Vec<u8>>>,
}

const TAIL_LIMIT: usize = 64 << 10;

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(out) = self.out.as_mut() {
            // Console output must never stop the guest: ignore write errors (closed stdout, full disk).
            let _ = out.write_all(buf);
            let _ = out.flush();
        }
        if let Ok(mut tail) = self.tail.lock() {
            tail.extend_from_slice(buf);
            if tail.len() > TAIL_LIMIT {
                let cut = tail.len() - TAIL_LIMIT / 2;
                tail.drain(..cut);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Saved UART registers (vm-superio's SerialState in a serde form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegisters {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Pending input bytes.
    pub in_buffer: Vec<u8>,
}

/// COM1.
pub struct Serial {
    uart: Uart<NoInterrupt, NoEvents, SerialSink>,
    tail: Arc<Mutex<Vec<u8>>>,
}

impl Serial {
    /// A UART writing to `output` (a file is created or truncated).
    pub fn new(output: &SerialOutput) -> io::Result<Self> {
        Self::open(output, false)
    }

    /// A UART writing to `output`; with `append` a file keeps what it holds and output
    /// goes at its end (an incoming guest continues the console its source wrote).
    pub fn open(output: &SerialOutput, append: bool) -> io::Result<Self> {
        let out: Option<Box<dyn Write + Send>> = match output {
            SerialOutput::Stdout => Some(Box::new(io::stdout())),
            SerialOutput::File(p) if append => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
            SerialOutput::File(p) => Some(Box::new(File::create(p)?)),
            SerialOutput::None => None,
        };
        let tail = Arc::new(Mutex::new(Vec::new()));
        let sink = SerialSink {
            out,
            tail: tail.clone(),
        };
        Ok(Serial {
            uart: Uart::new(NoInterrupt, sink),
            tail,
        })
    }

    /// Handles a guest write of `value` to register `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        // The only error is a failed interrupt trigger, which cannot happen with NoInterrupt.
        let _ = self.uart.write(offset, value);
    }

    /// Handles a guest read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// The most recent output (up to 64 KiB).
    pub fn output_tail(&self) -> Vec<u8> {
        self.tail.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// The registers, for a migration stream.
    pub fn save(&self) -> SerialRegisters {
        let s = self.uart.state();
        SerialRegisters {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Restores registers saved by [`Serial::save`], keeping this UART's output.
    pub fn restore(&mut self, regs: &SerialRegisters) -> io::Result<()> {
        let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = regs.regs;
        let state = SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlm,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: regs.in_buffer.clone(),
        };
        let placeholder = Uart::new(
            NoInterrupt,
            SerialSink {
                out: None,
                tail: self.tail.clone(),
            },
        );
        let old = std::mem::replace(&mut self.uart, placeholder);
        let sink = old.into_writer();
        self.uart = Uart::from_state(&state, NoInterrupt, NoEvents, sink)
            .map_err(|e| io::Error::other(format!("bad serial state: {e:?}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_outputs() {
        assert_eq!("stdout".parse::<SerialOutput>(), Ok(SerialOutput::Stdout));
        assert_eq!("none".parse::<SerialOutput>(), Ok(SerialOutput::None));
        assert_eq!(
            "file:/tmp/x".parse::<SerialOutput>(),
            Ok(SerialOutput::File("/tmp/x".into()))
        );
        assert!("file:".parse::<SerialOutput>().is_err());
        assert!("tty".parse::<SerialOutput>().is_err());
    }

    #[test]
    fn bytes_reach_the_tail_and_state_round_trips() {
        let mut s = Serial::new(&SerialOutput::None).unwrap();
        for b in b"hi\n" {
            s.write(0, *b);
        }
        assert_eq!(s.output_tail(), b"hi\n");
        s.write(7, 0x5a); // scratch register
        let saved = s.save();
        let mut t = Serial::new(&SerialOutput::None).unwrap();
        t.restore(&saved).unwrap();
        assert_eq!(t.read(7), 0x5a);
        assert_eq!(t.save(), saved);
    }
}
