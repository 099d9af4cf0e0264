//! The live-migration wire protocol, as Cloud Hypervisor's: every request is a 16-byte header
//! (`command` u16, 6 bytes — padding in v38, command headers in v53 — and `length` u64, in the
//! host's byte order, little-endian on x86_64) followed by `length` bytes; every response
//! likewise (`status` u16, padding, `length` u64).
//!
//! Sender: `Start` → `Config` → `Memory` (a [`MemoryRangeTable`], then the bytes of its ranges)
//! … → `State` (the snapshot tree) → `Complete`; `Abandon` at any point gives up; the receiver
//! may answer `Error` to any request.
//!
//! CH reads headers by reinterpreting the bytes as `repr(C)` structs; this stand-in decodes them
//! field by field, so a header with an unknown command or status is never undefined behaviour:
//! v38's shape reads it as `Invalid`, v53's returns an error as CH v53 does.

use std::io::{Read, Write};

use anyhow::anyhow;
use serde::{Deserialize, Serialize};
#[cfg(not(ch_current))]
use versionize::{VersionMap, Versionize, VersionizeResult};
#[cfg(not(ch_current))]
use versionize_derive::Versionize;

use crate::MigratableError;
#[cfg(not(ch_current))]
use crate::VersionMapped;

/// Size of a request or response header, and of one encoded [`MemoryRange`], bytes.
const HEADER_SIZE: usize = 16;
const RANGE_SIZE: usize = 16;
/// The largest range table this stand-in reads, bytes (1 Mi ranges; CH has no bound).
const MAX_TABLE_BYTES: u64 = 16 << 20;

/// A request's command (CH v38.0).
#[cfg(not(ch_current))]
#[repr(u16)]
#[derive(Copy, Clone, Default)]
#[allow(missing_docs)]
pub enum Command {
    #[default]
    Invalid,
    Start,
    Config,
    State,
    Memory,
    Complete,
    Abandon,
    MemoryFd,
}

/// A request's command (CH v53.0).
#[cfg(ch_current)]
#[repr(u16)]
#[derive(Debug, Copy, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Command {
    #[default]
    Invalid = 0,
    Start = 1,
    Config = 2,
    State = 3,
    Memory = 4,
    Complete = 5,
    Abandon = 6,
    MemoryFd = 7,
    CompletePaused = 8,
    PageFault = 9,
}

fn command_from_wire(code: u16) -> Option<Command> {
    Some(match code {
        0 => Command::Invalid,
        1 => Command::Start,
        2 => Command::Config,
        3 => Command::State,
        4 => Command::Memory,
        5 => Command::Complete,
        6 => Command::Abandon,
        7 => Command::MemoryFd,
        #[cfg(ch_current)]
        8 => Command::CompletePaused,
        #[cfg(ch_current)]
        9 => Command::PageFault,
        _ => return None,
    })
}

fn read_header(fd: &mut dyn Read) -> Result<(u16, [u8; 6], u64), MigratableError> {
    let mut b = [0u8; HEADER_SIZE];
    fd.read_exact(&mut b)
        .map_err(MigratableError::MigrateSocket)?;
    let mut middle = [0u8; 6];
    middle.copy_from_slice(&b[2..8]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&b[8..16]);
    Ok((
        u16::from_ne_bytes([b[0], b[1]]),
        middle,
        u64::from_ne_bytes(len),
    ))
}

fn write_header(
    fd: &mut dyn Write,
    code: u16,
    middle: &[u8; 6],
    length: u64,
) -> Result<(), MigratableError> {
    let mut b = [0u8; HEADER_SIZE];
    b[0..2].copy_from_slice(&code.to_ne_bytes());
    b[2..8].copy_from_slice(middle);
    b[8..16].copy_from_slice(&length.to_ne_bytes());
    fd.write_all(&b).map_err(MigratableError::MigrateSocket)
}

/// The migration protocol version this side speaks (CH v53).
#[cfg(ch_current)]
pub const CURRENT_PROTOCOL_VERSION: u16 = 0;

/// The protocol versions a receiver accepts: the current one and the one before (CH v53).
#[cfg(ch_current)]
pub fn supported_protocol_versions() -> std::ops::RangeInclusive<u16> {
    CURRENT_PROTOCOL_VERSION.saturating_sub(1)..=CURRENT_PROTOCOL_VERSION
}

/// What a connection of a migration carries (CH v53): sent as a u16 when it opens.
#[cfg(ch_current)]
#[repr(u16)]
#[derive(Debug, Copy, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ConnectionRole {
    #[default]
    Invalid = 0,
    PrecopyMemory = 1,
    Fault = 2,
}

#[cfg(ch_current)]
impl ConnectionRole {
    /// Send the role.
    pub fn write_to(self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        fd.write_all(&(self as u16).to_le_bytes())
            .map_err(MigratableError::MigrateSocket)
    }

    /// Read a role; an unknown value is an error.
    pub fn read_from(fd: &mut dyn Read) -> Result<ConnectionRole, MigratableError> {
        let mut b = [0u8; 2];
        fd.read_exact(&mut b)
            .map_err(MigratableError::MigrateSocket)?;
        ConnectionRole::try_from(u16::from_le_bytes(b))
    }
}

#[cfg(ch_current)]
impl TryFrom<u16> for ConnectionRole {
    type Error = MigratableError;

    fn try_from(value: u16) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(ConnectionRole::Invalid),
            1 => Ok(ConnectionRole::PrecopyMemory),
            2 => Ok(ConnectionRole::Fault),
            _ => Err(MigratableError::MigrateReceive(anyhow!(
                "unknown connection role: {value}"
            ))),
        }
    }
}

/// A request header.
#[repr(C)]
#[derive(Default, Copy, Clone)]
pub struct Request {
    command: Command,
    /// v38: padding; v53: command headers (the sender's protocol version in `Start`).
    padding: [u8; 6],
    length: u64,
}

#[allow(missing_docs)]
impl Request {
    /// A request for `command` with `length` payload bytes.
    pub fn new(command: Command, length: u64) -> Self {
        Request {
            command,
            padding: [0; 6],
            length,
        }
    }

    /// `Start` (v53: carrying [`CURRENT_PROTOCOL_VERSION`]).
    pub fn start() -> Self {
        #[allow(unused_mut)]
        let mut r = Self::new(Command::Start, 0);
        #[cfg(ch_current)]
        r.padding[0..2].copy_from_slice(&CURRENT_PROTOCOL_VERSION.to_le_bytes());
        r
    }

    pub fn state(length: u64) -> Self {
        Self::new(Command::State, length)
    }

    pub fn config(length: u64) -> Self {
        Self::new(Command::Config, length)
    }

    pub fn memory(length: u64) -> Self {
        Self::new(Command::Memory, length)
    }

    pub fn memory_fd(length: u64) -> Self {
        Self::new(Command::MemoryFd, length)
    }

    pub fn complete() -> Self {
        Self::new(Command::Complete, 0)
    }

    #[cfg(ch_current)]
    pub fn complete_paused() -> Self {
        Self::new(Command::CompletePaused, 0)
    }

    pub fn abandon() -> Self {
        Self::new(Command::Abandon, 0)
    }

    /// `PageFault`, followed by one [`MemoryRange`].
    #[cfg(ch_current)]
    pub fn page_fault() -> Self {
        Self::new(Command::PageFault, RANGE_SIZE as u64)
    }

    pub fn command(&self) -> Command {
        self.command
    }

    pub fn length(&self) -> u64 {
        self.length
    }

    #[cfg(ch_current)]
    pub fn command_headers(&self) -> &[u8; 6] {
        &self.padding
    }

    /// The protocol version a `Start` request carries, if this side supports it. (CH asserts
    /// that the request is a `Start`; the stand-in returns an error instead.)
    #[cfg(ch_current)]
    pub fn sender_protocol_version(&self) -> Result<u16, MigratableError> {
        if self.command != Command::Start {
            return Err(MigratableError::MigrateReceive(anyhow!(
                "sender_protocol_version() of a {:?} request",
                self.command
            )));
        }
        let v = u16::from_le_bytes([self.padding[0], self.padding[1]]);
        if !supported_protocol_versions().contains(&v) {
            return Err(MigratableError::MigrateReceive(anyhow!(
                "Migration protocol version {v} doesn't match supported versions: {:?}",
                supported_protocol_versions()
            )));
        }
        Ok(v)
    }

    /// Read a header. An unknown command reads as `Invalid` (v38) or is an error (v53).
    pub fn read_from(fd: &mut dyn Read) -> Result<Request, MigratableError> {
        let (code, padding, length) = read_header(fd)?;
        let command = match command_from_wire(code) {
            Some(c) => c,
            #[cfg(not(ch_current))]
            None => Command::Invalid,
            #[cfg(ch_current)]
            None => {
                return Err(MigratableError::MigrateReceive(anyhow!(
                    "received request with unknown command"
                )))
            }
        };
        Ok(Request {
            command,
            padding,
            length,
        })
    }

    /// Write the header.
    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        write_header(fd, self.command as u16, &self.padding, self.length)
    }
}

/// A response's status.
#[repr(u16)]
#[cfg_attr(not(ch_current), derive(Copy, Clone, PartialEq, Eq, Default))]
#[cfg_attr(ch_current, derive(Copy, Clone, Debug, PartialEq, Eq, Default))]
#[allow(missing_docs)]
pub enum Status {
    #[default]
    Invalid,
    Ok,
    Error,
}

fn status_from_wire(code: u16) -> Option<Status> {
    match code {
        0 => Some(Status::Invalid),
        1 => Some(Status::Ok),
        2 => Some(Status::Error),
        _ => None,
    }
}

/// A response header.
#[repr(C)]
#[derive(Default, Copy, Clone)]
pub struct Response {
    status: Status,
    padding: [u8; 6],
    length: u64,
}

#[allow(missing_docs)]
impl Response {
    /// A response with `status` and `length` payload bytes.
    pub fn new(status: Status, length: u64) -> Self {
        Response {
            status,
            padding: [0; 6],
            length,
        }
    }

    pub fn ok() -> Self {
        Self::new(Status::Ok, 0)
    }

    pub fn error() -> Self {
        Self::new(Status::Error, 0)
    }

    pub fn status(&self) -> Status {
        self.status
    }

    #[cfg(ch_current)]
    pub fn length(&self) -> u64 {
        self.length
    }

    /// `self` when the status is `Ok`, else `Err(sender_error)`.
    #[cfg(ch_current)]
    pub fn ok_or_fatal_error(
        self,
        sender_error: MigratableError,
    ) -> Result<Response, MigratableError> {
        if self.status != Status::Ok {
            return Err(sender_error);
        }
        Ok(self)
    }

    /// Read a header. An unknown status reads as `Invalid` (v38) or is an error (v53).
    pub fn read_from(fd: &mut dyn Read) -> Result<Response, MigratableError> {
        let (code, padding, length) = read_header(fd)?;
        let status = match status_from_wire(code) {
            Some(s) => s,
            #[cfg(not(ch_current))]
            None => Status::Invalid,
            #[cfg(ch_current)]
            None => {
                return Err(MigratableError::MigrateReceive(anyhow!(
                    "received response with unknown status"
                )))
            }
        };
        Ok(Response {
            status,
            padding,
            length,
        })
    }

    /// Write the header.
    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        write_header(fd, self.status as u16, &self.padding, self.length)
    }
}

/// A guest-physical memory range.
#[repr(C)]
#[cfg_attr(
    not(ch_current),
    derive(Clone, Default, Serialize, Deserialize, Versionize)
)]
#[cfg_attr(
    ch_current,
    derive(Copy, Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)
)]
pub struct MemoryRange {
    /// Start, guest-physical address.
    pub gpa: u64,
    /// Length, bytes.
    pub length: u64,
}

fn range_from_bytes(b: &[u8; RANGE_SIZE]) -> MemoryRange {
    let mut g = [0u8; 8];
    let mut l = [0u8; 8];
    g.copy_from_slice(&b[0..8]);
    l.copy_from_slice(&b[8..16]);
    MemoryRange {
        gpa: u64::from_ne_bytes(g),
        length: u64::from_ne_bytes(l),
    }
}

fn range_to_bytes(r: &MemoryRange) -> [u8; RANGE_SIZE] {
    let mut b = [0u8; RANGE_SIZE];
    b[0..8].copy_from_slice(&r.gpa.to_ne_bytes());
    b[8..16].copy_from_slice(&r.length.to_ne_bytes());
    b
}

#[cfg(ch_current)]
impl MemoryRange {
    /// Read one range (16 bytes).
    pub fn read_from(fd: &mut dyn Read) -> Result<MemoryRange, MigratableError> {
        let mut b = [0u8; RANGE_SIZE];
        fd.read_exact(&mut b)
            .map_err(MigratableError::MigrateSocket)?;
        Ok(range_from_bytes(&b))
    }

    /// Write the range.
    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        fd.write_all(&range_to_bytes(self))
            .map_err(MigratableError::MigrateSocket)
    }
}

/// A list of memory ranges (sent before the bytes of a `Memory` request).
#[cfg_attr(
    not(ch_current),
    derive(Clone, Default, Serialize, Deserialize, Versionize)
)]
#[cfg_attr(ch_current, derive(Clone, Default, Debug, Serialize, Deserialize))]
pub struct MemoryRangeTable {
    data: Vec<MemoryRange>,
}

#[cfg(not(ch_current))]
impl VersionMapped for MemoryRangeTable {}

/// Coalesce the set bits of a dirty bitmap (bit j of word i = page `64 i + j`) into ranges.
fn dirty_ranges(
    bitmap: impl IntoIterator<Item = u64>,
    start_addr: u64,
    page_size: u64,
) -> Vec<MemoryRange> {
    let mut out: Vec<MemoryRange> = Vec::new();
    let mut run: Option<(u64, u64)> = None; // (first page, pages)
    for (i, word) in bitmap.into_iter().enumerate() {
        for j in 0..64u64 {
            let page = (i as u64).wrapping_mul(64).wrapping_add(j);
            if (word >> j) & 1 == 1 {
                run = Some(match run {
                    Some((first, n)) => (first, n + 1),
                    None => (page, 1),
                });
            } else if let Some((first, n)) = run.take() {
                out.push(MemoryRange {
                    gpa: start_addr.wrapping_add(first.wrapping_mul(page_size)),
                    length: n.wrapping_mul(page_size),
                });
            }
        }
    }
    if let Some((first, n)) = run {
        out.push(MemoryRange {
            gpa: start_addr.wrapping_add(first.wrapping_mul(page_size)),
            length: n.wrapping_mul(page_size),
        });
    }
    out
}

#[allow(missing_docs)]
impl MemoryRangeTable {
    /// The ranges of the dirty pages of `bitmap`, from `start_addr` (CH v38).
    #[cfg(not(ch_current))]
    pub fn from_bitmap(bitmap: Vec<u64>, start_addr: u64, page_size: u64) -> Self {
        MemoryRangeTable {
            data: dirty_ranges(bitmap, start_addr, page_size),
        }
    }

    /// The ranges of the dirty pages of `bitmap`, from `start_addr` (CH v53).
    #[cfg(ch_current)]
    pub fn from_dirty_bitmap(
        bitmap: impl IntoIterator<Item = u64>,
        start_addr: u64,
        page_size: u64,
    ) -> Self {
        MemoryRangeTable {
            data: dirty_ranges(bitmap, start_addr, page_size),
        }
    }

    #[cfg(ch_current)]
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.data
    }

    pub fn regions(&self) -> &[MemoryRange] {
        &self.data
    }

    pub fn push(&mut self, range: MemoryRange) {
        self.data.push(range)
    }

    /// Read a `length`-byte table. CH asserts that `length` is a multiple of 16; the stand-in
    /// returns an error for that, and for a table over 16 MiB, before allocating anything.
    pub fn read_from(fd: &mut dyn Read, length: u64) -> Result<MemoryRangeTable, MigratableError> {
        if !length.is_multiple_of(RANGE_SIZE as u64) || length > MAX_TABLE_BYTES {
            return Err(MigratableError::MigrateReceive(anyhow!(
                "bad memory range table length {length}"
            )));
        }
        let n = (length / RANGE_SIZE as u64) as usize;
        let mut data = Vec::with_capacity(n);
        let mut b = [0u8; RANGE_SIZE];
        for _ in 0..n {
            fd.read_exact(&mut b)
                .map_err(MigratableError::MigrateSocket)?;
            data.push(range_from_bytes(&b));
        }
        Ok(MemoryRangeTable { data })
    }

    /// Encoded length, bytes.
    pub fn length(&self) -> u64 {
        (RANGE_SIZE * self.data.len()) as u64
    }

    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        let mut bytes = Vec::with_capacity(RANGE_SIZE * self.data.len());
        for r in &self.data {
            bytes.extend_from_slice(&range_to_bytes(r));
        }
        fd.write_all(&bytes).map_err(MigratableError::MigrateSocket)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Append `table`'s ranges.
    pub fn extend(&mut self, table: Self) {
        self.data.extend(table.data)
    }

    /// One table of all `tables`' ranges, in order.
    pub fn new_from_tables(tables: Vec<Self>) -> Self {
        MemoryRangeTable {
            data: tables.into_iter().flat_map(|t| t.data).collect(),
        }
    }

    /// The bytes the ranges cover.
    #[cfg(ch_current)]
    pub fn effective_size(&self) -> u64 {
        self.data.iter().map(|r| r.length).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gpas(t: &MemoryRangeTable) -> Vec<(u64, u64)> {
        t.regions().iter().map(|r| (r.gpa, r.length)).collect()
    }

    #[test]
    fn request_layout() {
        let mut v = Vec::new();
        Request::state(0x0102_0304_0506_0708)
            .write_to(&mut v)
            .unwrap();
        assert_eq!(v.len(), HEADER_SIZE);
        assert_eq!(&v[0..2], &3u16.to_ne_bytes());
        assert_eq!(&v[2..8], &[0; 6]);
        assert_eq!(&v[8..16], &0x0102_0304_0506_0708u64.to_ne_bytes());
        let r = Request::read_from(&mut v.as_slice()).unwrap();
        assert_eq!(r.command() as u16, Command::State as u16);
        assert_eq!(r.length(), 0x0102_0304_0506_0708);
    }

    #[test]
    fn unknown_values_and_truncation() {
        let mut b = [0u8; 16];
        b[0] = 0xff;
        let req = Request::read_from(&mut &b[..]);
        let resp = Response::read_from(&mut &b[..]);
        #[cfg(not(ch_current))]
        {
            assert_eq!(req.unwrap().command() as u16, 0, "reads as Invalid");
            assert!(resp.unwrap().status() == Status::Invalid);
        }
        #[cfg(ch_current)]
        {
            assert!(req.is_err());
            assert!(resp.is_err());
        }
        assert!(Request::read_from(&mut &b[..15]).is_err());
        let mut v = Vec::new();
        Response::error().write_to(&mut v).unwrap();
        assert!(Response::read_from(&mut v.as_slice()).unwrap().status() == Status::Error);
    }

    #[test]
    fn dirty_bitmap_coalesces_runs() {
        // Pages 0-1, 63-64 (across a word), 130.
        let bitmap = vec![0b11 | (1 << 63), 1, 1 << 2];
        #[cfg(not(ch_current))]
        let t = MemoryRangeTable::from_bitmap(bitmap, 0x1000, 0x1000);
        #[cfg(ch_current)]
        let t = MemoryRangeTable::from_dirty_bitmap(bitmap, 0x1000, 0x1000);
        assert_eq!(
            gpas(&t),
            vec![
                (0x1000, 0x2000),
                (0x1000 + 63 * 0x1000, 0x2000),
                (0x1000 + 130 * 0x1000, 0x1000)
            ]
        );
        let mut a = MemoryRangeTable::default();
        a.extend(t.clone());
        let all = MemoryRangeTable::new_from_tables(vec![a, t]);
        assert_eq!(all.regions().len(), 6);
    }

    #[test]
    fn range_table_round_trip_and_bounds() {
        let mut t = MemoryRangeTable::default();
        t.push(MemoryRange {
            gpa: 0x1000,
            length: 0x2000,
        });
        t.push(MemoryRange {
            gpa: 0x10_0000,
            length: 4096,
        });
        let mut v = Vec::new();
        t.write_to(&mut v).unwrap();
        assert_eq!(v.len() as u64, t.length());
        let back = MemoryRangeTable::read_from(&mut v.as_slice(), t.length()).unwrap();
        assert_eq!(gpas(&back), gpas(&t));
        assert!(MemoryRangeTable::read_from(&mut v.as_slice(), 17).is_err());
        assert!(MemoryRangeTable::read_from(&mut v.as_slice(), u64::MAX - 15).is_err());
        assert!(
            MemoryRangeTable::read_from(&mut v.as_slice(), 48).is_err(),
            "short read"
        );
    }

    #[cfg(ch_current)]
    #[test]
    fn start_carries_the_protocol_version() {
        let mut v = Vec::new();
        Request::start().write_to(&mut v).unwrap();
        let r = Request::read_from(&mut v.as_slice()).unwrap();
        assert_eq!(
            r.sender_protocol_version().unwrap(),
            CURRENT_PROTOCOL_VERSION
        );
        assert!(Request::complete().sender_protocol_version().is_err());
        assert_eq!(Request::page_fault().length(), 16);
        assert!(Response::error()
            .ok_or_fatal_error(MigratableError::MigrateSend(anyhow!("x")))
            .is_err());
        let mut w = Vec::new();
        ConnectionRole::Fault.write_to(&mut w).unwrap();
        assert_eq!(
            ConnectionRole::read_from(&mut w.as_slice()).unwrap(),
            ConnectionRole::Fault
        );
        assert!(ConnectionRole::try_from(3).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), len in any::<u64>()) {
            let _ = Request::read_from(&mut bytes.as_slice());
            let _ = Response::read_from(&mut bytes.as_slice());
            let _ = MemoryRangeTable::read_from(&mut bytes.as_slice(), len);
        }
    }
}
