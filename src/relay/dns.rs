//! The question of a DNS query, for the events of the UDP relay.

/// The first question of a DNS message: its name and record type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
}

/// What an event shows for a name longer than DNS allows (RFC 1035: 255
/// octets on the wire), with type 0.
pub const MALFORMED_NAME: &str = "<malformed: over 255 octets or 127 labels>";
const MAX_NAME_OCTETS: usize = 255;
const MAX_LABELS: usize = 127;

/// Parses the first question of `message`; `None` when it has none or is
/// malformed. Query names are never compressed, so pointers are refused.
/// A name beyond DNS's limits is `MALFORMED_NAME`, never printed whole.
pub fn question(message: &[u8]) -> Option<Question> {
    let count = u16::from_be_bytes(message.get(4..6)?.try_into().ok()?);
    if count == 0 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*message.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        // The wire name so far: a length octet and the label for each, and
        // the root's zero octet still to come.
        if at + len - 12 + 1 > MAX_NAME_OCTETS || labels.len() == MAX_LABELS {
            return Some(Question {
                name: MALFORMED_NAME.to_owned(),
                qtype: 0,
            });
        }
        let label = message.get(at..at + len)?;
        labels.push(
            label
                .iter()
                .map(|&b| {
                    if b.is_ascii_graphic() && b != b'.' {
                        char::from(b)
                    } else {
                        '?'
                    }
                })
                .collect::<String>(),
        );
        at += len;
    }
    let qtype = u16::from_be_bytes(message.get(at..at + 2)?.try_into().ok()?);
    let name = if labels.is_empty() {
        ".".to_owned()
    } else {
        labels.join(".")
    };
    Some(Question { name, qtype })
}

/// The mnemonic of a record type, or `TYPEnnn` (RFC 3597).
pub fn type_name(qtype: u16) -> String {
    let name = match qtype {
        0 => "?",
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        41 => "OPT",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        _ => return format!("TYPE{qtype}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    #[test]
    fn reads_the_question() {
        let q = question(&query("www.example.test", 28)).unwrap();
        assert_eq!(q.name, "www.example.test");
        assert_eq!(type_name(q.qtype), "AAAA");
        assert_eq!(type_name(999), "TYPE999");
    }

    #[test]
    fn names_beyond_dns_limits_are_shown_as_malformed() {
        let longest = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(question(&query(&longest, 1)).unwrap().name, longest);
        let too_long = format!("{longest}e");
        let q = question(&query(&too_long, 1)).unwrap();
        assert_eq!(
            (q.name.as_str(), type_name(q.qtype).as_str()),
            (MALFORMED_NAME, "?")
        );
        let most_labels = vec!["a"; 127].join(".");
        assert_eq!(question(&query(&most_labels, 1)).unwrap().name, most_labels);
        let labels = vec!["a"; 1000].join(".");
        assert_eq!(question(&query(&labels, 1)).unwrap().name, MALFORMED_NAME);
    }

    #[test]
    fn refuses_truncated_and_compressed() {
        let m = query("example.test", 1);
        for len in 0..m.len() - 2 {
            assert_eq!(question(&m[..len]), None, "length {len}");
        }
        let mut pointer = m.clone();
        pointer[12] = 0xc0;
        assert_eq!(question(&pointer), None);
        let mut no_question = m;
        no_question[5] = 0;
        assert_eq!(question(&no_question), None);
    }
}
