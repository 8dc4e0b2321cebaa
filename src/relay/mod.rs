//! The built-in relays behind `redirect`, `tproxy` and `proxy`: TCP over
//! splice, UDP from one polling thread; DNS names for the UDP events.

pub mod dns;
pub mod tcp;
pub mod udp;
