//! `guest-clock-format`: the versioned clock section of a VMM's migration stream and snapshot.
//!
//! The section is a [`ClockState`] encoded with `versionize` (the payload) inside a frame:
//!
//! ```text
//! magic "GCLKSECT" (8) | format version u16 | reserved u16 = 0 | payload length u32 |
//! payload (versionize) | CRC-64/XZ u64 of everything before it
//! ```
//!
//! All integers little-endian. `versionize` alone would accept a v2 payload as v1 and treat an
//! unknown future version as the latest; the frame refuses unknown versions, bad CRCs, truncated
//! buffers, trailing bytes and absurd counts with a typed [`FormatError`], never a panic and never
//! an allocation sized by an unchecked length. Byte layouts: `SPEC.md`.
//!
//! The format knows nothing of KVM: plain Rust types only.

mod state;
pub use state::*;

use std::io::Cursor;

use versionize::{VersionMap, Versionize, VersionizeError, VersionizeResult};

/// The largest vCPU count a section may carry.
pub const MAX_VCPUS: usize = 4096;
/// The frame magic.
pub const MAGIC: [u8; 8] = *b"GCLKSECT";
/// The newest format version this code reads and writes.
pub const CURRENT_VERSION: u16 = 3;
/// The oldest format version this code reads and writes.
pub const OLDEST_VERSION: u16 = 1;
/// Frame header size: magic, version, reserved, payload length.
pub const HEADER_LEN: usize = 16;
/// Frame trailer size: CRC-64.
pub const TRAILER_LEN: usize = 8;
/// The largest payload a frame may declare (4096 vCPUs and strings fit well within it).
pub const MAX_PAYLOAD_LEN: usize = 1 << 20;
/// Offset of the vCPU count (u64) inside the payload, for every version: after capture_kind
/// (u32), clock (28 bytes) and tsc (17 bytes). Checked before versionize allocates.
pub const PAYLOAD_VCPU_COUNT_OFFSET: usize = 4 + 28 + 17;
/// Encoded size of one [`VcpuClockState`] (u32 + 3 × u64).
pub const VCPU_ENCODED_LEN: usize = 28;
/// Offset of the clocksource length (u64) inside the encoded [`HostIdentity`]: after
/// machine_id_hash (u64), boot_id (16 × u8) and host_tsc_khz (u32). The host identity itself
/// starts at `PAYLOAD_VCPU_COUNT_OFFSET + 8 + n × VCPU_ENCODED_LEN`. Checked before versionize
/// allocates the string.
pub const HOST_CLOCKSOURCE_LEN_OFFSET: usize = 8 + 16 + 4;
/// The CRC used by the frame: CRC-64/XZ (ECMA-182 polynomial, reflected, init/xorout all ones).
pub const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
/// The longest clocksource name a section may carry, bytes.
pub const MAX_CLOCKSOURCE_LEN: usize = 32;
/// The fastest guest TSC a section may claim, kHz (10 GHz).
pub const MAX_TSC_KHZ: u32 = 10_000_000;

/// Why a section could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The buffer does not start with [`MAGIC`].
    #[error("not a clock section: bad magic")]
    BadMagic,
    /// A format version this code does not know.
    #[error(
        "unsupported clock section version {found} (this code reads {OLDEST_VERSION}..={newest})"
    )]
    UnsupportedVersion {
        /// The version in the frame.
        found: u16,
        /// The newest version supported.
        newest: u16,
    },
    /// The reserved header field is not zero.
    #[error("reserved header field is {0:#x}, must be 0")]
    ReservedNotZero(u16),
    /// The buffer ends before the frame does.
    #[error("truncated clock section: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// The declared payload length is absurd.
    #[error("payload length {0} exceeds the {MAX_PAYLOAD_LEN}-byte bound")]
    PayloadTooLarge(usize),
    /// Bytes follow the frame (or the payload is shorter than declared).
    #[error("{0} trailing bytes after the clock section")]
    TrailingBytes(usize),
    /// The CRC does not match.
    #[error("clock section CRC mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    BadCrc {
        /// CRC in the frame.
        stored: u64,
        /// CRC of the bytes.
        computed: u64,
    },
    /// More vCPUs than [`MAX_VCPUS`] (or than the payload can hold).
    #[error("section claims {count} vCPUs (at most {max})")]
    TooManyVcpus {
        /// Claimed count.
        count: u64,
        /// The bound.
        max: u64,
    },
    /// versionize could not encode or decode the payload.
    #[error("payload: {0}")]
    Payload(String),
    /// A field holds a value no sender could have produced.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field's path, e.g. `tsc.guest_tsc_khz`.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl FormatError {
    /// The section field (or frame part) the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            FormatError::BadMagic => "frame.magic",
            FormatError::UnsupportedVersion { .. } => "frame.version",
            FormatError::ReservedNotZero(_) => "frame.reserved",
            FormatError::Truncated { .. } | FormatError::TrailingBytes(_) => "frame.length",
            FormatError::PayloadTooLarge(_) => "frame.payload_length",
            FormatError::BadCrc { .. } => "frame.crc64",
            FormatError::TooManyVcpus { .. } => "vcpus",
            FormatError::Payload(_) => "payload",
            FormatError::Invalid { field, .. } => field,
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The version map: format version 1 = every type at version 1; format version 2 =
/// [`ClockState`] at version 2 (adds `capture_uncertainty_ns`); format version 3 = [`ClockState`]
/// at version 3 (adds `vm_id`).
pub fn version_map() -> VersionMap {
    let mut vm = VersionMap::new();
    vm.new_version().set_type_version(ClockState::type_id(), 2);
    vm.new_version().set_type_version(ClockState::type_id(), 3);
    vm
}

/// The section version used for a versionize application version (a VMM's version map may be
/// ahead of ours: anything ≥ 3 means v3).
pub fn version_for_app_version(app_version: u16) -> u16 {
    app_version.clamp(OLDEST_VERSION, CURRENT_VERSION)
}

impl ClockState {
    /// Check every field a receiver relies on. Errors name the field.
    pub fn validate(&self) -> Result<(), FormatError> {
        let n = self.vcpus.len();
        if n == 0 {
            return Err(invalid("vcpus", "no vCPUs"));
        }
        if n > MAX_VCPUS {
            return Err(FormatError::TooManyVcpus {
                count: n as u64,
                max: MAX_VCPUS as u64,
            });
        }
        let mut seen = vec![false; n];
        for v in &self.vcpus {
            match seen.get_mut(v.id as usize) {
                Some(s) if !*s => *s = true,
                Some(_) => return Err(invalid("vcpus.id", format!("vCPU {} appears twice", v.id))),
                None => {
                    return Err(invalid(
                        "vcpus.id",
                        format!("vCPU id {} out of range for {n} vCPUs", v.id),
                    ))
                }
            }
        }
        if self.tsc.guest_tsc_khz == 0 || self.tsc.guest_tsc_khz > MAX_TSC_KHZ {
            return Err(invalid(
                "tsc.guest_tsc_khz",
                format!("{} kHz is not in 1..={MAX_TSC_KHZ}", self.tsc.guest_tsc_khz),
            ));
        }
        if self.tsc.host_tsc_khz > MAX_TSC_KHZ {
            return Err(invalid(
                "tsc.host_tsc_khz",
                format!("{} kHz exceeds {MAX_TSC_KHZ}", self.tsc.host_tsc_khz),
            ));
        }
        if self.host.host_tsc_khz == 0 || self.host.host_tsc_khz > MAX_TSC_KHZ {
            return Err(invalid(
                "host.host_tsc_khz",
                format!("{} kHz is not in 1..={MAX_TSC_KHZ}", self.host.host_tsc_khz),
            ));
        }
        if !matches!(self.tsc.frac_bits, 0 | 32 | 48) {
            return Err(invalid(
                "tsc.frac_bits",
                format!("{} (must be 0, 32 or 48)", self.tsc.frac_bits),
            ));
        }
        let flags = self.clock.flags;
        if flags & !KVM_CLOCK_VALID_FLAGS != 0 {
            return Err(invalid("clock.flags", format!("unknown flags {flags:#x}")));
        }
        if flags & KVM_CLOCK_REALTIME != 0 && self.clock.realtime_ns == 0 {
            return Err(invalid(
                "clock.realtime_ns",
                "KVM_CLOCK_REALTIME is set but realtime is 0",
            ));
        }
        if self.clock.realtime_ns == 0 {
            return Err(invalid("clock.realtime_ns", "no wallclock W recorded"));
        }
        let both = KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
        if self.capture_kind == CaptureKind::KvmClockData && flags & both != both {
            return Err(invalid(
                "clock.flags",
                format!("a KvmClockData capture needs REALTIME|HOST_TSC, flags are {flags:#x}"),
            ));
        }
        if self.host.clocksource.len() > MAX_CLOCKSOURCE_LEN {
            return Err(invalid(
                "host.clocksource",
                format!(
                    "{} bytes (at most {MAX_CLOCKSOURCE_LEN})",
                    self.host.clocksource.len()
                ),
            ));
        }
        Ok(())
    }
}

/// A decoded section and the format version it was written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The state (fields newer than `version` hold their documented defaults).
    pub state: ClockState,
    /// The frame's format version.
    pub version: u16,
}

/// Encode `state` as a framed section of format `version`. Validates first. Encoding at
/// version 1 drops `capture_uncertainty_ns` (a v1 receiver decodes it as unknown, `u64::MAX`);
/// encoding at version 1 or 2 drops `vm_id` (decoded as unknown, all zeros).
///
/// The output is `decode`'s exact inverse: `encode(&decode(b)?.state, decode(b)?.version) == b`
/// for every `b` that decodes.
///
/// # Errors
/// [`FormatError::UnsupportedVersion`] for a version outside
/// [`OLDEST_VERSION`]`..=`[`CURRENT_VERSION`]; [`FormatError::Invalid`] or
/// [`FormatError::TooManyVcpus`] when [`ClockState::validate`] refuses the state;
/// [`FormatError::Payload`] if versionize fails (not expected for a valid state).
pub fn encode(state: &ClockState, version: u16) -> Result<Vec<u8>, FormatError> {
    if !(OLDEST_VERSION..=CURRENT_VERSION).contains(&version) {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            newest: CURRENT_VERSION,
        });
    }
    state.validate()?;
    let mut payload = Vec::with_capacity(128 + state.vcpus.len() * VCPU_ENCODED_LEN);
    state
        .serialize(&mut payload, &version_map(), version)
        .map_err(|e| FormatError::Payload(e.to_string()))?;
    let len = payload.len();
    if len > MAX_PAYLOAD_LEN {
        return Err(FormatError::PayloadTooLarge(len));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + len + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = CRC.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Minimum encoded size of what follows the vCPUs: host identity with an empty clocksource
/// (8 + 16 + 4 + 8), NTP state (4 + 8 + 8), the vmclock marker (8), from v2 the uncertainty (8),
/// from v3 the VM id (16).
fn payload_min_tail_len(version: u16) -> usize {
    let v1 = 36 + 20 + 8;
    match version {
        0 | 1 => v1,
        2 => v1 + 8,
        _ => v1 + 8 + 16,
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decode and validate a framed section. Every length is checked against the buffer before
/// use; the vCPU count and the clocksource length are bounded from the raw bytes before
/// versionize reads them. Fields newer than the frame's version get their documented defaults.
/// Never panics.
///
/// # Errors
/// Frame errors (`BadMagic`, `Truncated`,
/// `UnsupportedVersion`, `ReservedNotZero`, `PayloadTooLarge`, `TrailingBytes`, `BadCrc`), count
/// bounds (`TooManyVcpus`, `Invalid { field: "host.clocksource" }`), versionize failures
/// (`Payload`), and validation (`Invalid`). The check order is in `SPEC.md`.
pub fn decode(bytes: &[u8]) -> Result<Decoded, FormatError> {
    if bytes.len() < MAGIC.len() {
        return Err(FormatError::Truncated {
            needed: HEADER_LEN,
            have: bytes.len(),
        });
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            needed: HEADER_LEN,
            have: bytes.len(),
        });
    }
    let version = le_u16(bytes, 8);
    if !(OLDEST_VERSION..=CURRENT_VERSION).contains(&version) {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            newest: CURRENT_VERSION,
        });
    }
    let reserved = le_u16(bytes, 10);
    if reserved != 0 {
        return Err(FormatError::ReservedNotZero(reserved));
    }
    let len = le_u32(bytes, 12) as usize;
    if len > MAX_PAYLOAD_LEN {
        return Err(FormatError::PayloadTooLarge(len));
    }
    let total = HEADER_LEN + len + TRAILER_LEN;
    if bytes.len() < total {
        return Err(FormatError::Truncated {
            needed: total,
            have: bytes.len(),
        });
    }
    if bytes.len() > total {
        return Err(FormatError::TrailingBytes(bytes.len() - total));
    }
    let stored = le_u64(bytes, HEADER_LEN + len);
    let computed = CRC.checksum(&bytes[..HEADER_LEN + len]);
    if stored != computed {
        return Err(FormatError::BadCrc { stored, computed });
    }
    let payload = &bytes[HEADER_LEN..HEADER_LEN + len];
    if payload.len() >= PAYLOAD_VCPU_COUNT_OFFSET + 8 {
        let count = le_u64(payload, PAYLOAD_VCPU_COUNT_OFFSET);
        let tail = payload_min_tail_len(version);
        let fits = payload
            .len()
            .saturating_sub(PAYLOAD_VCPU_COUNT_OFFSET + 8 + tail)
            / VCPU_ENCODED_LEN;
        if count > MAX_VCPUS as u64 || count > fits as u64 {
            return Err(FormatError::TooManyVcpus {
                count,
                max: (MAX_VCPUS.min(fits)) as u64,
            });
        }
    }
    check_clocksource_len(payload)?;
    let mut cursor = Cursor::new(payload);
    let state = ClockState::deserialize(&mut cursor, &version_map(), version)
        .map_err(|e| FormatError::Payload(e.to_string()))?;
    let used = cursor.position() as usize;
    if used != payload.len() {
        return Err(FormatError::TrailingBytes(payload.len() - used));
    }
    state.validate()?;
    Ok(Decoded { state, version })
}

/// Bound the clocksource string length from the raw payload bytes (the vCPU count has already
/// been checked against the payload size, so the offsets cannot overflow). versionize would
/// accept up to 16 KiB; the section allows [`MAX_CLOCKSOURCE_LEN`]. A payload too short to hold
/// the length is left to versionize, which reports it as a payload error.
fn check_clocksource_len(payload: &[u8]) -> Result<(), FormatError> {
    let Some(count_bytes) = payload.get(PAYLOAD_VCPU_COUNT_OFFSET..PAYLOAD_VCPU_COUNT_OFFSET + 8)
    else {
        return Ok(());
    };
    let count = le_u64(count_bytes, 0);
    let Some(at) = usize::try_from(count)
        .ok()
        .and_then(|n| n.checked_mul(VCPU_ENCODED_LEN))
        .and_then(|v| v.checked_add(PAYLOAD_VCPU_COUNT_OFFSET + 8 + HOST_CLOCKSOURCE_LEN_OFFSET))
    else {
        return Ok(());
    };
    if let Some(len_bytes) = at.checked_add(8).and_then(|end| payload.get(at..end)) {
        let len = le_u64(len_bytes, 0);
        if len > MAX_CLOCKSOURCE_LEN as u64 {
            return Err(invalid(
                "host.clocksource",
                format!("declared length {len} bytes (at most {MAX_CLOCKSOURCE_LEN})"),
            ));
        }
    }
    Ok(())
}

/// The framed section as a versionize type, so a VMM can store it with
/// `SnapshotData::new_from_versioned_state`: serialize writes the frame (at the section version
/// that corresponds to `app_version`, see [`version_for_app_version`]) as a length-prefixed byte
/// vector; deserialize decodes and validates it. The frame's CRC and bounds protect the section
/// inside a snapshot too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramedClockState(pub ClockState);

impl Versionize for FramedClockState {
    fn serialize<W: std::io::Write>(
        &self,
        writer: &mut W,
        version_map: &VersionMap,
        app_version: u16,
    ) -> VersionizeResult<()> {
        let bytes = encode(&self.0, version_for_app_version(app_version))
            .map_err(|e| VersionizeError::Serialize(e.to_string()))?;
        bytes.serialize(writer, version_map, app_version)
    }

    fn deserialize<R: std::io::Read>(
        reader: &mut R,
        version_map: &VersionMap,
        app_version: u16,
    ) -> VersionizeResult<Self> {
        let bytes: Vec<u8> = Vec::deserialize(reader, version_map, app_version)?;
        decode(&bytes)
            .map(|d| FramedClockState(d.state))
            .map_err(|e| VersionizeError::Deserialize(e.to_string()))
    }

    fn version() -> u16 {
        1
    }
}
