//! Event helpers shared by the datapaths: process names. The ring buffers
//! are polled by `service`.

/// A NUL-padded `comm` from the kernel as a string.
pub fn comm_to_string(comm: &[i8]) -> String {
    let bytes: Vec<u8> = comm
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
