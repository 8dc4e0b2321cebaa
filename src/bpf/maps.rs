//! Typed access to BPF maps for `Plain` keys and values.

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags};
use plain::Plain;

pub fn update<K: Plain, V: Plain>(map: &dyn MapCore, key: &K, value: &V) -> Result<()> {
    // SAFETY: Plain types are plain old data with no padding surprises.
    let (key, value) = unsafe { (plain::as_bytes(key), plain::as_bytes(value)) };
    map.update(key, value, MapFlags::ANY)
        .with_context(|| format!("updating map {}", map.name().to_string_lossy()))
}

/// The built-in proxy's listening sockets, IPv4 then IPv6, into the
/// `proxy_listeners` sockmap of bpf/lib/proxy_listeners.h.
pub fn put_proxy_listeners(map: &dyn MapCore, listeners: &[std::os::fd::RawFd]) -> Result<()> {
    for (index, &listener) in (0u32..).zip(listeners) {
        update(map, &index, &(listener as u64))?;
    }
    Ok(())
}

/// Every entry of a hash map (a snapshot; entries may change meanwhile).
pub fn entries<K: Plain + Copy, V: Plain + Copy>(map: &dyn MapCore) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for key_bytes in map.keys() {
        let Some(value_bytes) = map.lookup(&key_bytes, MapFlags::ANY)? else {
            continue; // deleted since the key was listed
        };
        let key = *plain::from_bytes::<K>(&key_bytes)
            .ok()
            .context("key size")?;
        let value = *plain::from_bytes::<V>(&value_bytes)
            .ok()
            .context("value size")?;
        out.push((key, value));
    }
    Ok(out)
}

/// How many entries a hash map holds now.
pub fn count(map: &dyn MapCore) -> Result<usize> {
    Ok(map.keys().count())
}

/// Sums a per-CPU array of u64 counters across CPUs, one sum per index.
pub fn percpu_sums(map: &dyn MapCore, count: u32) -> Result<Vec<u64>> {
    (0..count)
        .map(|index| {
            let per_cpu = map
                .lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY)?
                .unwrap_or_default();
            Ok(per_cpu
                .iter()
                .filter_map(|bytes| bytes.get(..8))
                .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
                .sum())
        })
        .collect()
}

/// Makes a flag array (value `1u8` at each index set, `0u8` elsewhere) hold
/// 1 at exactly `wanted`, where `before` was: the new flags are set before
/// the old ones are cleared, so a flag kept in both never drops.
pub fn sync_flags(map: &dyn MapCore, before: &[u32], wanted: &[u32]) -> Result<()> {
    for index in wanted {
        update(map, index, &1u8)?;
    }
    for index in before.iter().filter(|index| !wanted.contains(index)) {
        update(map, index, &0u8)?;
    }
    Ok(())
}

/// Makes a set map (value `1u8`) hold exactly `keys`: the new keys are
/// added before the old ones go, so a key kept in both never disappears.
pub fn sync_set<K: Plain>(map: &dyn MapCore, keys: &[K]) -> Result<()> {
    for key in keys {
        update(map, key, &1u8)?;
    }
    // SAFETY: as in update().
    let wanted: Vec<&[u8]> = keys.iter().map(|k| unsafe { plain::as_bytes(k) }).collect();
    let stale: Vec<Vec<u8>> = map
        .keys()
        .filter(|key| !wanted.contains(&key.as_slice()))
        .collect();
    for key in stale {
        map.delete(&key)
            .with_context(|| format!("updating map {}", map.name().to_string_lossy()))?;
    }
    Ok(())
}

/// Copies every entry of `from` that `to` lacks (maps of one layout);
/// returns how many it copied.
pub fn copy_new_entries(from: &dyn MapCore, to: &dyn MapCore) -> Result<usize> {
    let mut copied = 0;
    for key in from.keys() {
        let Some(value) = from.lookup(&key, MapFlags::ANY)? else {
            continue;
        };
        if to.update(&key, &value, MapFlags::NO_EXIST).is_ok() {
            copied += 1;
        }
    }
    Ok(copied)
}
