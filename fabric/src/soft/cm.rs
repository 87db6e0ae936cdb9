//! What the software backends' connection managers share: the 96-byte CM
//! message's common header (magic, version, kind, private data), described
//! per backend by a [`Layout`] so each keeps its own wire format, and the
//! lookups of their connection tables.
//!
//! ```text
//!  tcp  0 magic "rctp"  4 version  6 kind  7 pdata len   8.. kind's fields   40 pdata (56)
//!  shm  0 kind  1 pdata len  2 version  4.. kind's fields                    32 pdata (56)
//! ```

use crate::{CmEvent, ConnId, FabricError, PrivateData, Result, MAX_PRIVATE_DATA};
use std::collections::BTreeMap;

/// Bytes of every CM message.
pub(crate) const MSG_LEN: usize = 96;

/// Where a backend's CM message keeps the common fields, and what its
/// refusals say.
#[derive(Debug)]
pub(crate) struct Layout {
    /// A magic number at byte 0 (little-endian), if the format has one.
    pub magic: Option<u32>,
    pub version: u16,
    pub version_at: usize,
    pub kind_at: usize,
    /// Kinds are 1..=`kinds`.
    pub kinds: u8,
    pub plen_at: usize,
    pub pdata_at: usize,
    /// The refusals: wrong length, bad magic, other version, unknown kind.
    pub errors: [&'static str; 4],
}

/// A little-endian u32 at `o` (the caller checked the length).
pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// A little-endian u64 at `o`.
pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | u64::from(u32_at(b, o + 4)) << 32
}

impl Layout {
    /// A message of `kind` with the common header written.
    pub(crate) fn header(&self, kind: u8) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        if let Some(m) = self.magic {
            b[0..4].copy_from_slice(&m.to_le_bytes());
        }
        b[self.version_at..self.version_at + 2].copy_from_slice(&self.version.to_le_bytes());
        b[self.kind_at] = kind;
        b
    }

    /// Writes the private data and its length.
    pub(crate) fn put_pdata(&self, b: &mut [u8; MSG_LEN], pdata: &PrivateData) {
        let p = pdata.as_bytes();
        b[self.plen_at] = p.len() as u8;
        b[self.pdata_at..self.pdata_at + p.len()].copy_from_slice(p);
    }

    /// Checks the common header; returns the kind (in 1..=`kinds`).
    pub(crate) fn check(&self, b: &[u8]) -> Result<u8> {
        if b.len() != MSG_LEN {
            return Err(FabricError::Protocol(self.errors[0]));
        }
        if self.magic.is_some_and(|m| u32_at(b, 0) != m) {
            return Err(FabricError::Protocol(self.errors[1]));
        }
        let at = self.version_at;
        if u16::from_le_bytes([b[at], b[at + 1]]) != self.version {
            return Err(FabricError::Protocol(self.errors[2]));
        }
        match b[self.kind_at] {
            k @ 1.. if k <= self.kinds => Ok(k),
            _ => Err(FabricError::Protocol(self.errors[3])),
        }
    }

    /// The private data (its length checked).
    pub(crate) fn pdata(&self, b: &[u8]) -> Result<PrivateData> {
        let plen = usize::from(b[self.plen_at]);
        if plen > MAX_PRIVATE_DATA {
            return Err(FabricError::Protocol("private data too long"));
        }
        PrivateData::new(&b[self.pdata_at..self.pdata_at + plen])
    }
}

/// Connection `id` of a CM's table when `ok` says it is in the state the
/// call needs, else `Unknown { what, id }`.
pub(crate) fn conn_in<'a, C>(
    conns: &'a mut BTreeMap<ConnId, C>,
    id: ConnId,
    what: &'static str,
    ok: impl Fn(&C) -> bool,
) -> Result<&'a mut C> {
    conns
        .get_mut(&id)
        .filter(|c| ok(c))
        .ok_or(FabricError::Unknown { what, id: id.0 })
}

/// The event a CM reports when `disconnect` closes a connection that was up.
pub(crate) fn disconnected(id: ConnId, up: bool) -> Option<CmEvent> {
    up.then_some(CmEvent::Disconnected { id })
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Layout = Layout {
        magic: Some(0x1234_5678),
        version: 3,
        version_at: 4,
        kind_at: 6,
        kinds: 4,
        plen_at: 7,
        pdata_at: 40,
        errors: ["size", "magic", "version", "kind"],
    };

    fn why(r: Result<u8>) -> &'static str {
        match r {
            Err(FabricError::Protocol(w)) => w,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn header_round_trips_and_refusals_name_the_field() {
        let mut b = L.header(2);
        L.put_pdata(&mut b, &PrivateData::new(b"hello").unwrap());
        assert_eq!(L.check(&b).unwrap(), 2);
        assert_eq!(L.pdata(&b).unwrap().as_bytes(), b"hello");
        assert_eq!(why(L.check(&b[..95])), "size");
        let mut m = b;
        m[0] ^= 1;
        assert_eq!(why(L.check(&m)), "magic");
        let mut m = b;
        m[4] = 9;
        assert_eq!(why(L.check(&m)), "version");
        for k in [0, 5, 255] {
            let mut m = b;
            m[6] = k;
            assert_eq!(why(L.check(&m)), "kind");
        }
        let mut m = b;
        m[7] = 57;
        assert!(L.pdata(&m).is_err());
    }
}
