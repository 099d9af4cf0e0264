//! The live-migration wire protocol, shaped like Cloud Hypervisor's: every request is a 16-byte
//! header (`command` u16, 6 bytes padding, `length` u64, little-endian) followed by `length`
//! bytes; every response likewise (`status` u16, padding, `length` u64).
//!
//! Sender: `Start` → `Config` (VM config) → `Memory` (a [`MemoryRangeTable`] then the bytes of
//! its ranges) → `State` (the snapshot tree) → `Complete`; `Abandon` at any point gives up.
//! Headers are read field by field: an unknown command or status becomes `Invalid`, never UB.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::MigratableError;

/// Size of a request or response header, bytes.
pub const HEADER_SIZE: usize = 16;
/// Size of one encoded [`MemoryRange`], bytes.
pub const MEMORY_RANGE_SIZE: usize = 16;
/// The largest memory range table a receiver accepts, bytes (65536 ranges).
pub const MAX_MEMORY_RANGE_TABLE_LEN: u64 = 1 << 20;

/// A request's command.
#[repr(u16)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Command {
    /// Not a known command.
    #[default]
    Invalid,
    /// Begin a migration.
    Start,
    /// The VM configuration follows.
    Config,
    /// The snapshot tree follows.
    State,
    /// A memory range table and its bytes follow.
    Memory,
    /// The migration is complete: the receiver resumes the VM.
    Complete,
    /// The sender gives up.
    Abandon,
    /// Memory is shared through file descriptors (local migration).
    MemoryFd,
}

impl From<u16> for Command {
    fn from(v: u16) -> Self {
        match v {
            1 => Command::Start,
            2 => Command::Config,
            3 => Command::State,
            4 => Command::Memory,
            5 => Command::Complete,
            6 => Command::Abandon,
            7 => Command::MemoryFd,
            _ => Command::Invalid,
        }
    }
}

fn read_header(fd: &mut dyn Read) -> Result<(u16, u64), MigratableError> {
    let mut b = [0u8; HEADER_SIZE];
    fd.read_exact(&mut b)
        .map_err(MigratableError::MigrateSocket)?;
    let code = u16::from_le_bytes([b[0], b[1]]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&b[8..16]);
    Ok((code, u64::from_le_bytes(len)))
}

fn write_header(fd: &mut dyn Write, code: u16, length: u64) -> Result<(), MigratableError> {
    let mut b = [0u8; HEADER_SIZE];
    b[0..2].copy_from_slice(&code.to_le_bytes());
    b[8..16].copy_from_slice(&length.to_le_bytes());
    fd.write_all(&b).map_err(MigratableError::MigrateSocket)
}

/// A request header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    command: Command,
    length: u64,
}

impl Request {
    /// A request for `command` with `length` payload bytes.
    pub fn new(command: Command, length: u64) -> Self {
        Request { command, length }
    }
    /// `Start`.
    pub fn start() -> Self {
        Self::new(Command::Start, 0)
    }
    /// `State` with `length` bytes of snapshot.
    pub fn state(length: u64) -> Self {
        Self::new(Command::State, length)
    }
    /// `Config` with `length` bytes of config.
    pub fn config(length: u64) -> Self {
        Self::new(Command::Config, length)
    }
    /// `Memory` with a `length`-byte range table.
    pub fn memory(length: u64) -> Self {
        Self::new(Command::Memory, length)
    }
    /// `MemoryFd`.
    pub fn memory_fd(length: u64) -> Self {
        Self::new(Command::MemoryFd, length)
    }
    /// `Complete`.
    pub fn complete() -> Self {
        Self::new(Command::Complete, 0)
    }
    /// `Abandon`.
    pub fn abandon() -> Self {
        Self::new(Command::Abandon, 0)
    }
    /// The command.
    pub fn command(&self) -> Command {
        self.command
    }
    /// The payload length.
    pub fn length(&self) -> u64 {
        self.length
    }
    /// Read a header; an unknown command reads as [`Command::Invalid`].
    pub fn read_from(fd: &mut dyn Read) -> Result<Request, MigratableError> {
        let (code, length) = read_header(fd)?;
        Ok(Request {
            command: Command::from(code),
            length,
        })
    }
    /// Write the header.
    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        write_header(fd, self.command as u16, self.length)
    }
}

/// A response's status.
#[repr(u16)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Status {
    /// Not a known status.
    #[default]
    Invalid,
    /// The request succeeded.
    Ok,
    /// The request failed; `length` bytes of UTF-8 reason may follow (guest-clock extension,
    /// CH sends 0).
    Error,
}

impl From<u16> for Status {
    fn from(v: u16) -> Self {
        match v {
            1 => Status::Ok,
            2 => Status::Error,
            _ => Status::Invalid,
        }
    }
}

/// A response header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Response {
    status: Status,
    length: u64,
}

impl Response {
    /// A response with `status` and `length` payload bytes.
    pub fn new(status: Status, length: u64) -> Self {
        Response { status, length }
    }
    /// `Ok`, no payload.
    pub fn ok() -> Self {
        Self::new(Status::Ok, 0)
    }
    /// `Error`, no payload.
    pub fn error() -> Self {
        Self::new(Status::Error, 0)
    }
    /// The status.
    pub fn status(&self) -> Status {
        self.status
    }
    /// The payload length.
    pub fn length(&self) -> u64 {
        self.length
    }
    /// Read a header; an unknown status reads as [`Status::Invalid`].
    pub fn read_from(fd: &mut dyn Read) -> Result<Response, MigratableError> {
        let (code, length) = read_header(fd)?;
        Ok(Response {
            status: Status::from(code),
            length,
        })
    }
    /// Write the header.
    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        write_header(fd, self.status as u16, self.length)
    }
}

/// A guest-physical memory range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    /// Start, guest-physical address.
    pub gpa: u64,
    /// Length, bytes.
    pub length: u64,
}

/// A list of memory ranges (CH sends it before the bytes of a `Memory` request).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRangeTable {
    data: Vec<MemoryRange>,
}

impl MemoryRangeTable {
    /// The ranges.
    pub fn regions(&self) -> &[MemoryRange] {
        &self.data
    }
    /// Add a range.
    pub fn push(&mut self, range: MemoryRange) {
        self.data.push(range)
    }
    /// Encoded length, bytes.
    pub fn length(&self) -> u64 {
        (self.data.len() * MEMORY_RANGE_SIZE) as u64
    }
    /// No ranges.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Read a `length`-byte table. The length must be a multiple of [`MEMORY_RANGE_SIZE`] and at
    /// most [`MAX_MEMORY_RANGE_TABLE_LEN`]; nothing is allocated before that is checked.
    pub fn read_from(fd: &mut dyn Read, length: u64) -> Result<MemoryRangeTable, MigratableError> {
        if length % MEMORY_RANGE_SIZE as u64 != 0 || length > MAX_MEMORY_RANGE_TABLE_LEN {
            return Err(MigratableError::MigrateReceive(
                format!("bad memory range table length {length}").into(),
            ));
        }
        let n = (length as usize) / MEMORY_RANGE_SIZE;
        let mut data = Vec::with_capacity(n);
        let mut b = [0u8; MEMORY_RANGE_SIZE];
        for _ in 0..n {
            fd.read_exact(&mut b)
                .map_err(MigratableError::MigrateSocket)?;
            let mut g = [0u8; 8];
            let mut l = [0u8; 8];
            g.copy_from_slice(&b[0..8]);
            l.copy_from_slice(&b[8..16]);
            data.push(MemoryRange {
                gpa: u64::from_le_bytes(g),
                length: u64::from_le_bytes(l),
            });
        }
        Ok(MemoryRangeTable { data })
    }
    /// Write the table.
    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        for r in &self.data {
            let mut b = [0u8; MEMORY_RANGE_SIZE];
            b[0..8].copy_from_slice(&r.gpa.to_le_bytes());
            b[8..16].copy_from_slice(&r.length.to_le_bytes());
            fd.write_all(&b).map_err(MigratableError::MigrateSocket)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_layout() {
        let mut v = Vec::new();
        Request::state(0x0102_0304_0506_0708)
            .write_to(&mut v)
            .unwrap();
        assert_eq!(v.len(), HEADER_SIZE);
        assert_eq!(&v[0..2], &3u16.to_le_bytes());
        assert_eq!(&v[2..8], &[0; 6]);
        assert_eq!(&v[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        let r = Request::read_from(&mut v.as_slice()).unwrap();
        assert_eq!(r.command(), Command::State);
        assert_eq!(r.length(), 0x0102_0304_0506_0708);
    }

    #[test]
    fn unknown_values_are_invalid_and_truncation_errors() {
        let mut b = [0u8; 16];
        b[0] = 0xff;
        assert_eq!(
            Request::read_from(&mut &b[..]).unwrap().command(),
            Command::Invalid
        );
        assert_eq!(
            Response::read_from(&mut &b[..]).unwrap().status(),
            Status::Invalid
        );
        assert!(Request::read_from(&mut &b[..15]).is_err());
        let mut v = Vec::new();
        Response::error().write_to(&mut v).unwrap();
        assert_eq!(
            Response::read_from(&mut v.as_slice()).unwrap().status(),
            Status::Error
        );
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
        assert_eq!(
            MemoryRangeTable::read_from(&mut v.as_slice(), t.length()).unwrap(),
            t
        );
        assert!(MemoryRangeTable::read_from(&mut v.as_slice(), 17).is_err());
        assert!(MemoryRangeTable::read_from(&mut v.as_slice(), u64::MAX - 15).is_err());
        assert!(
            MemoryRangeTable::read_from(&mut v.as_slice(), 48).is_err(),
            "short read"
        );
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
