//! Ring-buffer events: decoding, timestamps, and the poll loop shared by the
//! subcommands.

use std::time::Duration;

use anyhow::Result;
use libbpf_rs::{MapCore, RingBuffer, RingBufferBuilder};
use plain::Plain;

use crate::cli::EventFormat;
use crate::shutdown;

/// Builds a ring buffer whose records are `T`s passed to `handle`.
pub fn ring_buffer<'a, T: Plain + 'a>(
    map: &'a dyn MapCore,
    mut handle: impl FnMut(&T) + 'a,
) -> Result<RingBuffer<'a>> {
    let mut builder = RingBufferBuilder::new();
    builder.add(map, move |bytes: &[u8]| {
        if let Ok(event) = plain::from_bytes::<T>(bytes) {
            handle(event);
        }
        0
    })?;
    Ok(builder.build()?)
}

/// The event stream of a subcommand: `None` when events are off; for text,
/// the column header is printed first.
pub fn stream<'a, T: Plain + 'a>(
    map: &'a dyn MapCore,
    format: EventFormat,
    text_header: &str,
    print: impl FnMut(&T) + 'a,
) -> Result<Option<RingBuffer<'a>>> {
    match format {
        EventFormat::Off => Ok(None),
        EventFormat::Text | EventFormat::Json => {
            if format == EventFormat::Text {
                println!("{text_header}");
            }
            ring_buffer(map, print).map(Some)
        }
    }
}

/// Polls `ring` (when there is one) until SIGINT/SIGTERM, calling `tick`
/// about every 100 ms.
pub fn run_until_shutdown(ring: Option<&RingBuffer<'_>>, mut tick: impl FnMut()) -> Result<()> {
    let interval = Duration::from_millis(100);
    while !shutdown::requested() {
        match ring {
            Some(ring) => {
                if let Err(err) = ring.poll(interval) {
                    // The signal that asks us to stop interrupts the poll.
                    if err.kind() != libbpf_rs::ErrorKind::Interrupted {
                        return Err(err.into());
                    }
                }
            }
            None => std::thread::sleep(interval),
        }
        tick();
    }
    if let Some(ring) = ring {
        ring.consume()?;
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// A NUL-padded `comm` from the kernel as a string.
pub fn comm_to_string(comm: &[i8]) -> String {
    let bytes: Vec<u8> = comm
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
