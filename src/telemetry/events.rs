//! Event helpers shared by the datapaths: process names. The ring buffers
//! are polled by `service`.

use crate::telemetry::output::escape_bytes;

/// A NUL-padded `comm` from the kernel as a string, escaped: the process
/// chose its name (`prctl(PR_SET_NAME)`), newlines and escape sequences
/// included.
pub fn comm_to_string(comm: &[i8]) -> String {
    let bytes: Vec<u8> = comm
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    escape_bytes(&bytes)
}
