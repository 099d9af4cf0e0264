//! The clock section's encoding: round trips, v1↔v2, every framing error, golden vectors, and
//! SPEC.md's offsets read from the vector bytes.

use guest_clock_format::*;
use proptest::prelude::*;

/// The fixed state of the golden vectors: a 2-vCPU guest at 2.445404 GHz on a kvm_intel host.
fn golden_state() -> ClockState {
    ClockState {
        capture_kind: CaptureKind::KvmClockData,
        clock: KvmClockSample {
            clock_ns: 5_123_456_789,
            flags: KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC,
            realtime_ns: 1_764_032_400_123_456_789,
            host_tsc_ticks: 8_165_537_971_863,
        },
        tsc: TscScaling {
            guest_tsc_khz: 2_445_404,
            host_tsc_khz: 2_445_404,
            ratio: 1 << 48,
            frac_bits: 48,
        },
        vcpus: vec![
            VcpuClockState {
                id: 0,
                tsc_ticks: 12_528_921_725,
                kvmclock_ns: 5_123_456_789,
                tsc_offset_ticks: 0xffff_f895_baca_ade6,
            },
            VcpuClockState {
                id: 1,
                tsc_ticks: 12_528_921_725,
                kvmclock_ns: 5_123_456_789,
                tsc_offset_ticks: 0xffff_f895_baca_ade6,
            },
        ],
        host: HostIdentity {
            machine_id_hash: 0x1234_5678_9abc_def0,
            boot_id: [
                0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2,
                0xe1, 0xf0,
            ],
            host_tsc_khz: 2_445_404,
            clocksource: "tsc".into(),
        },
        ntp: NtpState {
            status: 0x2001,
            maxerror_us: 16_000,
            esterror_us: 12,
        },
        vmclock_disruption_marker: 3,
        capture_uncertainty_ns: 0,
        vm_id: GOLDEN_VM_ID,
    }
}

/// The golden vectors' VM id (v3): a fixed UUID v4, 5ec7c10c-0000-4000-8000-00000000c10c.
const GOLDEN_VM_ID: [u8; 16] = [
    0x5e, 0xc7, 0xc1, 0x0c, 0x00, 0x00, 0x40, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc1, 0x0c,
];

const V1: &[u8] = include_bytes!("../vectors/clock-v1.bin");
const V2: &[u8] = include_bytes!("../vectors/clock-v2.bin");
const V3: &[u8] = include_bytes!("../vectors/clock-v3.bin");

/// What a v1 or v2 stream of the golden state decodes to: the VM id unknown.
fn golden_state_without_vm_id() -> ClockState {
    ClockState {
        vm_id: [0; 16],
        ..golden_state()
    }
}

/// Regenerate the vectors: `GUEST_CLOCK_WRITE_VECTORS=1 cargo test -p guest-clock-format
/// --test format write_vectors`. Without the variable it checks nothing is stale.
#[test]
fn write_vectors() {
    if std::env::var_os("GUEST_CLOCK_WRITE_VECTORS").is_some() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors");
        std::fs::write(
            format!("{dir}/clock-v1.bin"),
            encode(&golden_state(), 1).unwrap(),
        )
        .unwrap();
        std::fs::write(
            format!("{dir}/clock-v2.bin"),
            encode(&golden_state(), 2).unwrap(),
        )
        .unwrap();
        std::fs::write(
            format!("{dir}/clock-v3.bin"),
            encode(&golden_state(), 3).unwrap(),
        )
        .unwrap();
    }
}

#[test]
fn golden_vectors_decode_and_reencode_byte_for_byte() {
    let d3 = decode(V3).unwrap();
    assert_eq!(d3.version, 3);
    assert_eq!(d3.state, golden_state());
    assert_eq!(encode(&d3.state, 3).unwrap(), V3);
    let d2 = decode(V2).unwrap();
    assert_eq!(d2.version, 2);
    assert_eq!(
        d2.state,
        golden_state_without_vm_id(),
        "v2 default: VM id unknown"
    );
    assert!(!d2.state.has_vm_id());
    assert_eq!(encode(&d2.state, 2).unwrap(), V2);
    let d1 = decode(V1).unwrap();
    assert_eq!(d1.version, 1);
    assert_eq!(
        d1.state.capture_uncertainty_ns,
        u64::MAX,
        "v1 default: unknown"
    );
    assert_eq!(
        ClockState {
            capture_uncertainty_ns: 0,
            ..d1.state.clone()
        },
        golden_state_without_vm_id()
    );
    assert_eq!(encode(&d1.state, 1).unwrap(), V1);
}

#[test]
fn encoding_of_the_fixed_state_is_stable() {
    assert_eq!(
        encode(&golden_state(), 3).unwrap(),
        V3,
        "the v3 encoding changed: bump the version"
    );
    assert_eq!(
        encode(&golden_state(), 2).unwrap(),
        V2,
        "the v2 encoding changed"
    );
    assert_eq!(
        encode(&golden_state(), 1).unwrap(),
        V1,
        "the v1 encoding changed"
    );
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// The offsets SPEC.md documents, read from the vector bytes.
#[test]
fn spec_offsets_match_the_vectors() {
    let s = golden_state();
    for (v, bytes) in [(1u16, V1), (2, V2), (3, V3)] {
        assert_eq!(&bytes[0..8], b"GCLKSECT");
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), v);
        let len = u32_at(bytes, 12) as usize;
        assert_eq!(bytes.len(), 16 + len + 8);
        let p = 16; // payload
        assert_eq!(u32_at(bytes, p), 0, "capture_kind KvmClockData = 0");
        assert_eq!(u64_at(bytes, p + 4), s.clock.clock_ns, "K at payload+4");
        assert_eq!(u32_at(bytes, p + 12), s.clock.flags, "flags at payload+12");
        assert_eq!(
            u64_at(bytes, p + 16),
            s.clock.realtime_ns,
            "W at payload+16"
        );
        assert_eq!(
            u64_at(bytes, p + 24),
            s.clock.host_tsc_ticks,
            "host TSC at payload+24"
        );
        assert_eq!(
            u32_at(bytes, p + 32),
            s.tsc.guest_tsc_khz,
            "guest kHz at payload+32"
        );
        assert_eq!(u32_at(bytes, p + 36), s.tsc.host_tsc_khz);
        assert_eq!(u64_at(bytes, p + 40), s.tsc.ratio);
        assert_eq!(bytes[p + 48], s.tsc.frac_bits);
        assert_eq!(
            u64_at(bytes, p + PAYLOAD_VCPU_COUNT_OFFSET),
            2,
            "vCPU count at payload+49"
        );
        let v0 = p + 57;
        assert_eq!(u32_at(bytes, v0), 0);
        assert_eq!(
            u64_at(bytes, v0 + 4),
            s.vcpus[0].tsc_ticks,
            "T0 at payload+61"
        );
        assert_eq!(
            u64_at(bytes, v0 + 12),
            s.vcpus[0].kvmclock_ns,
            "K0 at payload+69"
        );
        assert_eq!(u64_at(bytes, v0 + 20), s.vcpus[0].tsc_offset_ticks);
        let h = p + 57 + 2 * VCPU_ENCODED_LEN; // host identity at payload+113
        assert_eq!(u64_at(bytes, h), s.host.machine_id_hash);
        assert_eq!(&bytes[h + 8..h + 24], &s.host.boot_id);
        assert_eq!(u32_at(bytes, h + 24), s.host.host_tsc_khz);
        assert_eq!(u64_at(bytes, h + 28), 3, "clocksource length");
        assert_eq!(&bytes[h + 36..h + 39], b"tsc");
        let n = h + 39; // ntp
        assert_eq!(u32_at(bytes, n) as i32, s.ntp.status);
        assert_eq!(u64_at(bytes, n + 4) as i64, s.ntp.maxerror_us);
        assert_eq!(u64_at(bytes, n + 12) as i64, s.ntp.esterror_us);
        assert_eq!(u64_at(bytes, n + 20), s.vmclock_disruption_marker);
        let end = n + 28;
        if v == 3 {
            assert_eq!(u64_at(bytes, end), s.capture_uncertainty_ns, "v2 field");
            assert_eq!(&bytes[end + 8..end + 24], &s.vm_id, "v3 field");
            assert_eq!(end + 24, 16 + len);
        } else if v == 2 {
            assert_eq!(u64_at(bytes, end), s.capture_uncertainty_ns, "v2 field");
            assert_eq!(end + 8, 16 + len);
        } else {
            assert_eq!(end, 16 + len, "v1 ends after the vmclock marker");
        }
        let crc = u64_at(bytes, 16 + len);
        assert_eq!(crc, CRC.checksum(&bytes[..16 + len]));
    }
}

#[test]
fn v2_state_at_v1_drops_uncertainty() {
    let mut s = golden_state();
    s.capture_kind = CaptureKind::UserspaceBracket;
    s.clock.flags = KVM_CLOCK_TSC_STABLE;
    s.capture_uncertainty_ns = 750;
    let d = decode(&encode(&s, 1).unwrap()).unwrap();
    assert_eq!(d.state.capture_uncertainty_ns, u64::MAX);
    assert_eq!(decode(&encode(&s, 3).unwrap()).unwrap().state, s);
}

fn reframe(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 8;
    let crc = CRC.checksum(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn every_framing_error() {
    let good = V3.to_vec();
    for cut in 0..good.len() {
        let e = decode(&good[..cut]).unwrap_err();
        assert!(
            matches!(e, FormatError::Truncated { .. } | FormatError::BadMagic),
            "cut {cut}: {e}"
        );
    }
    let mut b = good.clone();
    b[0] = b'X';
    assert_eq!(decode(&b).unwrap_err(), FormatError::BadMagic);
    let mut b = good.clone();
    b[8] = 4;
    assert!(matches!(
        decode(&b).unwrap_err(),
        FormatError::UnsupportedVersion {
            found: 4,
            newest: 3
        }
    ));
    let mut b = good.clone();
    b[8] = 0;
    assert!(matches!(
        decode(&b).unwrap_err(),
        FormatError::UnsupportedVersion { found: 0, .. }
    ));
    let mut b = good.clone();
    b[10] = 1;
    assert_eq!(decode(&b).unwrap_err(), FormatError::ReservedNotZero(1));
    let mut b = good.clone();
    b.push(0);
    assert_eq!(decode(&b).unwrap_err(), FormatError::TrailingBytes(1));
    let mut b = good.clone();
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&b).unwrap_err(),
        FormatError::PayloadTooLarge(_)
    ));
    for bit in 0..(good.len() * 8) {
        let mut b = good.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(decode(&b).is_err(), "bit {bit} flipped and still decoded");
    }
    // Absurd vCPU counts, with a valid CRC.
    for count in [0u64, 5000, u64::MAX] {
        let mut b = good.clone();
        let off = 16 + PAYLOAD_VCPU_COUNT_OFFSET;
        b[off..off + 8].copy_from_slice(&count.to_le_bytes());
        let e = decode(&reframe(b)).unwrap_err();
        if count == 0 {
            // The vCPU bytes are then read as the host identity: some typed payload error.
            assert!(
                matches!(
                    e,
                    FormatError::Invalid { .. }
                        | FormatError::Payload(_)
                        | FormatError::TrailingBytes(_)
                ),
                "{e}"
            );
        } else {
            assert!(
                matches!(e, FormatError::TooManyVcpus { .. }),
                "{count}: {e}"
            );
        }
    }
    // REALTIME claimed with W = 0.
    let mut s = golden_state();
    s.clock.realtime_ns = 0;
    assert_eq!(encode(&s, 2).unwrap_err().field(), "clock.realtime_ns");
    assert!(matches!(
        encode(&golden_state(), 4),
        Err(FormatError::UnsupportedVersion { .. })
    ));
}

#[test]
fn validation_names_fields() {
    type Mutation = Box<dyn Fn(&mut ClockState)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("vcpus", Box::new(|s| s.vcpus.clear())),
        ("vcpus.id", Box::new(|s| s.vcpus[1].id = 0)),
        ("vcpus.id", Box::new(|s| s.vcpus[1].id = 9)),
        ("tsc.guest_tsc_khz", Box::new(|s| s.tsc.guest_tsc_khz = 0)),
        (
            "tsc.guest_tsc_khz",
            Box::new(|s| s.tsc.guest_tsc_khz = 20_000_000),
        ),
        ("tsc.frac_bits", Box::new(|s| s.tsc.frac_bits = 7)),
        ("clock.flags", Box::new(|s| s.clock.flags = 0x80)),
        (
            "clock.flags",
            Box::new(|s| s.clock.flags = KVM_CLOCK_TSC_STABLE),
        ),
        (
            "host.clocksource",
            Box::new(|s| s.host.clocksource = "x".repeat(40)),
        ),
        ("host.host_tsc_khz", Box::new(|s| s.host.host_tsc_khz = 0)),
    ];
    for (field, f) in cases {
        let mut s = golden_state();
        f(&mut s);
        assert_eq!(s.validate().unwrap_err().field(), field);
    }
    let mut big = golden_state();
    big.vcpus = (0..4097)
        .map(|id| VcpuClockState {
            id,
            ..Default::default()
        })
        .collect();
    assert!(matches!(
        big.validate(),
        Err(FormatError::TooManyVcpus { count: 4097, .. })
    ));
}

#[test]
fn json_round_trip_and_framed_versionize() {
    let s = golden_state();
    let j = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<ClockState>(&j).unwrap(), s);
    use versionize::Versionize;
    let mut buf = Vec::new();
    FramedClockState(s.clone())
        .serialize(&mut buf, &version_map(), 3)
        .unwrap();
    let back = FramedClockState::deserialize(&mut buf.as_slice(), &version_map(), 3).unwrap();
    assert_eq!(back.0, s);
    let mut buf1 = Vec::new();
    FramedClockState(s.clone())
        .serialize(&mut buf1, &version_map(), 1)
        .unwrap();
    assert_eq!(&buf1[8..], V1, "app version 1 writes the v1 frame");
    buf[20] ^= 1;
    assert!(FramedClockState::deserialize(&mut buf.as_slice(), &version_map(), 2).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_buffers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn mutated_frames_give_typed_errors(pos in 0usize..V2.len(), val in any::<u8>(), fix_crc in any::<bool>()) {
        let mut b = V2.to_vec();
        b[pos] = val;
        let b = if fix_crc && b.len() > 24 { reframe(b) } else { b };
        match decode(&b) {
            Ok(d) => prop_assert!(d.state.validate().is_ok()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn round_trip_any_valid_state(k in any::<u64>(), w in 1u64.., h in any::<u64>(), n in 1usize..64, khz in 1u32..=10_000_000, unc in any::<u64>()) {
        let mut s = golden_state();
        s.clock.clock_ns = k;
        s.clock.realtime_ns = w;
        s.clock.host_tsc_ticks = h;
        s.tsc.guest_tsc_khz = khz;
        s.capture_uncertainty_ns = unc;
        s.vcpus = (0..n as u32).map(|id| VcpuClockState { id, tsc_ticks: h ^ u64::from(id), kvmclock_ns: k, tsc_offset_ticks: 7 }).collect();
        let d = decode(&encode(&s, 3).unwrap()).unwrap();
        prop_assert_eq!(d.state, s);
    }
}

/// The v2 vector's payload, for building frames around altered payloads.
fn v2_payload() -> Vec<u8> {
    V2[16..V2.len() - 8].to_vec()
}

/// A valid frame (correct length and CRC) of `version` around any payload.
fn frame(version: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GCLKSECT");
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    let crc = CRC.checksum(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn frame_helper_reproduces_the_vector() {
    assert_eq!(frame(2, &v2_payload()), V2);
}

/// Every single-bit flip gives the error its position implies: the header parts their own
/// errors, the payload and the CRC a CRC mismatch.
#[test]
fn every_bit_flip_gives_the_expected_typed_error() {
    for bit in 0..(V2.len() * 8) {
        let mut b = V2.to_vec();
        let byte = bit / 8;
        b[byte] ^= 1 << (bit % 8);
        let e = decode(&b).unwrap_err();
        let ok = match byte {
            0..=7 => e == FormatError::BadMagic,
            // A flipped version bit gives another known version (the CRC then fails) or an
            // unknown one.
            8..=9 => matches!(
                e,
                FormatError::UnsupportedVersion { newest: 3, .. } | FormatError::BadCrc { .. }
            ),
            10..=11 => matches!(e, FormatError::ReservedNotZero(r) if r != 0),
            12..=15 => matches!(
                e,
                FormatError::PayloadTooLarge(_)
                    | FormatError::Truncated { .. }
                    | FormatError::TrailingBytes(_)
            ),
            _ => matches!(e, FormatError::BadCrc { stored, computed } if stored != computed),
        };
        assert!(ok, "bit {bit} (byte {byte}): unexpected {e:?}");
    }
}

#[test]
fn truncation_reports_needed_and_have() {
    for cut in 0..V2.len() {
        match decode(&V2[..cut]).unwrap_err() {
            FormatError::Truncated { needed, have } => {
                assert_eq!(have, cut);
                assert!(needed > have);
                if cut >= 16 {
                    assert_eq!(needed, V2.len(), "cut {cut}: the full frame is needed");
                }
            }
            e => panic!("cut {cut}: {e:?}"),
        }
    }
}

#[test]
fn declared_lengths_beyond_the_buffer_or_bound() {
    // Within the 1 MiB bound but beyond the buffer: truncated, nothing allocated.
    let mut b = V2.to_vec();
    b[12..16].copy_from_slice(&(MAX_PAYLOAD_LEN as u32).to_le_bytes());
    assert_eq!(
        decode(&b).unwrap_err(),
        FormatError::Truncated {
            needed: 16 + MAX_PAYLOAD_LEN + 8,
            have: V2.len()
        }
    );
    // One past the bound.
    b[12..16].copy_from_slice(&(MAX_PAYLOAD_LEN as u32 + 1).to_le_bytes());
    assert_eq!(
        decode(&b).unwrap_err(),
        FormatError::PayloadTooLarge(MAX_PAYLOAD_LEN + 1)
    );
    // Shorter than the buffer: the rest is trailing.
    let mut b = V2.to_vec();
    let len = u32::from_le_bytes(b[12..16].try_into().unwrap());
    b[12..16].copy_from_slice(&(len - 4).to_le_bytes());
    assert_eq!(decode(&b).unwrap_err(), FormatError::TrailingBytes(4));
}

#[test]
fn vcpu_counts_are_bounded_before_versionize() {
    let off = PAYLOAD_VCPU_COUNT_OFFSET;
    for (count, expect_max) in [(5000u64, 2u64), (4097, 2), (3, 2), (u64::MAX, 2)] {
        let mut p = v2_payload();
        p[off..off + 8].copy_from_slice(&count.to_le_bytes());
        assert_eq!(
            decode(&frame(2, &p)).unwrap_err(),
            FormatError::TooManyVcpus {
                count,
                max: expect_max
            },
            "count {count}"
        );
    }
    // 5000 vCPUs that really are in the payload: refused by the 4096 bound, not by size.
    let mut p = v2_payload()[..off].to_vec();
    p.extend_from_slice(&5000u64.to_le_bytes());
    p.extend(std::iter::repeat_n(0u8, 5000 * VCPU_ENCODED_LEN + 200));
    assert_eq!(
        decode(&frame(2, &p)).unwrap_err(),
        FormatError::TooManyVcpus {
            count: 5000,
            max: 4096
        }
    );
    // Zero vCPUs, consistently encoded: versionize accepts it, validation refuses it.
    let full = v2_payload();
    let mut p = full[..off].to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&full[off + 8 + 2 * VCPU_ENCODED_LEN..]);
    let e = decode(&frame(2, &p)).unwrap_err();
    assert!(
        matches!(e, FormatError::Invalid { field: "vcpus", .. }),
        "{e:?}"
    );
}

#[test]
fn clocksource_length_is_bounded_before_versionize() {
    let at = PAYLOAD_VCPU_COUNT_OFFSET + 8 + 2 * VCPU_ENCODED_LEN + HOST_CLOCKSOURCE_LEN_OFFSET;
    let mut p = v2_payload();
    assert_eq!(u64::from_le_bytes(p[at..at + 8].try_into().unwrap()), 3);
    for len in [33u64, 16_385, u64::MAX] {
        p[at..at + 8].copy_from_slice(&len.to_le_bytes());
        let e = decode(&frame(2, &p)).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::Invalid {
                    field: "host.clocksource",
                    ..
                }
            ),
            "{len}: {e:?}"
        );
    }
    // Within the bound but past the payload end: versionize reports it.
    p[at..at + 8].copy_from_slice(&32u64.to_le_bytes());
    assert!(matches!(
        decode(&frame(2, &p)).unwrap_err(),
        FormatError::Payload(_)
    ));
}

#[test]
fn payload_errors_are_typed() {
    // An unknown CaptureKind variant.
    let mut p = v2_payload();
    p[0..4].copy_from_slice(&7u32.to_le_bytes());
    assert!(matches!(
        decode(&frame(2, &p)).unwrap_err(),
        FormatError::Payload(_)
    ));
    // A v2 payload in a v1 frame: versionize alone would accept it; the frame sees 8 unread bytes.
    assert_eq!(
        decode(&frame(1, &v2_payload())).unwrap_err(),
        FormatError::TrailingBytes(8)
    );
    // A v1 payload in a v2 frame: 8 bytes short of the v2 layout, so the size check finds room
    // for one vCPU only.
    let v1_payload = &V1[16..V1.len() - 8];
    assert_eq!(
        decode(&frame(2, v1_payload)).unwrap_err(),
        FormatError::TooManyVcpus { count: 2, max: 1 }
    );
    // An empty payload.
    assert!(matches!(
        decode(&frame(2, &[])).unwrap_err(),
        FormatError::Payload(_)
    ));
    // A well-formed payload that fails validation: frac_bits 7 at payload+48.
    let mut p = v2_payload();
    p[48] = 7;
    assert_eq!(decode(&frame(2, &p)).unwrap_err().field(), "tsc.frac_bits");
    // Unknown flags at payload+12.
    let mut p = v2_payload();
    p[12] |= 0x10;
    assert_eq!(decode(&frame(2, &p)).unwrap_err().field(), "clock.flags");
}

#[test]
fn encode_refuses_bad_versions_and_states() {
    for v in [0u16, 4, u16::MAX] {
        assert_eq!(
            encode(&golden_state(), v).unwrap_err(),
            FormatError::UnsupportedVersion {
                found: v,
                newest: CURRENT_VERSION
            }
        );
    }
    let mut s = golden_state();
    s.tsc.guest_tsc_khz = MAX_TSC_KHZ + 1;
    assert_eq!(encode(&s, 2).unwrap_err().field(), "tsc.guest_tsc_khz");
    s.tsc.guest_tsc_khz = MAX_TSC_KHZ;
    assert!(encode(&s, 2).is_ok(), "10 GHz is allowed");
}

#[test]
fn version_map_matches_the_format_versions() {
    use versionize::Versionize;
    let vm = version_map();
    assert_eq!(vm.latest_version(), CURRENT_VERSION);
    assert_eq!(vm.get_type_version(1, ClockState::type_id()), 1);
    assert_eq!(vm.get_type_version(2, ClockState::type_id()), 2);
    assert_eq!(vm.get_type_version(3, ClockState::type_id()), 3);
    assert_eq!(vm.get_type_version(2, HostIdentity::type_id()), 1);
    assert_eq!(vm.get_type_version(3, HostIdentity::type_id()), 1);
    assert_eq!(ClockState::version(), 3);
    assert_eq!(OLDEST_VERSION, 1);
    assert_eq!(version_for_app_version(0), 1);
    assert_eq!(version_for_app_version(1), 1);
    assert_eq!(version_for_app_version(2), 2);
    assert_eq!(version_for_app_version(3), 3);
    assert_eq!(version_for_app_version(40), 3);
}

#[test]
fn v1_v2_round_trips() {
    // v2 → v2 keeps everything; v2 → v1 → v2 loses only the uncertainty.
    let mut s = golden_state();
    s.capture_uncertainty_ns = 1234;
    let via_v1 = decode(&encode(&s, 1).unwrap()).unwrap();
    assert_eq!(via_v1.version, 1);
    assert_eq!(
        ClockState {
            capture_uncertainty_ns: 1234,
            vm_id: s.vm_id,
            ..via_v1.state.clone()
        },
        s
    );
    // A v1-decoded state (uncertainty unknown) re-encodes at v2 and keeps the unknown marker.
    let again = decode(&encode(&via_v1.state, 2).unwrap()).unwrap();
    assert_eq!(again.version, 2);
    assert_eq!(again.state.capture_uncertainty_ns, u64::MAX);
    // v1 and v2 frames differ only in the version, the length, the v2 field and the CRC.
    assert_eq!(V2.len(), V1.len() + 8);
    assert_eq!(&V1[16..V1.len() - 8], &V2[16..V1.len() - 8]);
    // v2 → v3 adds only the VM id; v3 → v2 drops it (decoded as unknown).
    assert_eq!(V3.len(), V2.len() + 16);
    assert_eq!(&V2[16..V2.len() - 8], &V3[16..V2.len() - 8]);
    let via_v2 = decode(&encode(&s, 2).unwrap()).unwrap();
    assert_eq!(via_v2.state.vm_id, [0; 16]);
    assert_eq!(
        ClockState {
            vm_id: s.vm_id,
            ..via_v2.state
        },
        s
    );
}

#[test]
fn framed_versionize_bounds_and_versions() {
    use versionize::Versionize;
    let s = golden_state();
    // A VMM whose application version is ahead of ours writes v3.
    let mut buf = Vec::new();
    FramedClockState(s.clone())
        .serialize(&mut buf, &version_map(), 7)
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(buf[..8].try_into().unwrap()),
        V3.len() as u64
    );
    assert_eq!(&buf[8..], V3);
    // Invalid states are refused at serialize time.
    let mut bad = s.clone();
    bad.vcpus.clear();
    assert!(FramedClockState(bad)
        .serialize(&mut Vec::new(), &version_map(), 2)
        .is_err());
    // A huge length prefix, a truncated stream and an empty stream: errors, no panic.
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(V2);
    assert!(FramedClockState::deserialize(&mut huge.as_slice(), &version_map(), 2).is_err());
    assert!(FramedClockState::deserialize(&mut &buf[..buf.len() - 1], &version_map(), 2).is_err());
    assert!(FramedClockState::deserialize(&mut &[][..], &version_map(), 2).is_err());
    // A frame's error surfaces as a versionize deserialize error naming it.
    let mut wrong = buf.clone();
    wrong[8 + 8] = 9; // frame version 9
    match FramedClockState::deserialize(&mut wrong.as_slice(), &version_map(), 2) {
        Err(versionize::VersionizeError::Deserialize(m)) => assert!(m.contains("version 9"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_shape_is_readable() {
    let j = serde_json::to_value(golden_state()).unwrap();
    assert_eq!(j["capture_kind"], "KvmClockData");
    assert_eq!(j["tsc"]["guest_tsc_khz"], 2_445_404);
    assert_eq!(j["vcpus"].as_array().unwrap().len(), 2);
    assert_eq!(j["host"]["clocksource"], "tsc");
    let pretty = serde_json::to_string_pretty(&golden_state()).unwrap();
    assert_eq!(
        serde_json::from_str::<ClockState>(&pretty).unwrap(),
        golden_state()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Random payloads inside a valid frame (magic, version, length, CRC all right) reach
    /// versionize; they must give Ok with a valid state or a typed error, never a panic.
    #[test]
    fn random_payloads_in_valid_frames(version in 1u16..=3, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        match decode(&frame(version, &payload)) {
            Ok(d) => prop_assert!(d.state.validate().is_ok()),
            Err(e) => {
                let frame_error = matches!(e, FormatError::BadMagic | FormatError::BadCrc { .. } | FormatError::Truncated { .. });
                prop_assert!(!frame_error, "a valid frame gave {:?}", e);
            }
        }
    }

    /// Several byte changes, a cut or an extension of the valid payload, re-framed with a valid
    /// CRC: Ok with a valid state, or a typed error.
    #[test]
    fn mutated_payloads_in_valid_frames(
        edits in proptest::collection::vec((0usize..188, any::<u8>()), 1..8),
        cut in 0usize..=188,
        extra in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut p = v2_payload();
        for (pos, val) in edits {
            if let Some(b) = p.get_mut(pos) {
                *b = val;
            }
        }
        p.truncate(cut);
        p.extend_from_slice(&extra);
        match decode(&frame(2, &p)) {
            Ok(d) => {
                prop_assert!(d.state.validate().is_ok());
                prop_assert_eq!(encode(&d.state, 2).unwrap(), frame(2, &p), "decoding is injective");
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

/// The golden fixture is self-consistent: Tₙ = host TSC + offset (ratio 1:1) and Tₙ = K · f.
#[test]
fn golden_state_is_consistent() {
    let s = golden_state();
    for v in &s.vcpus {
        assert_eq!(
            s.clock.host_tsc_ticks.wrapping_add(v.tsc_offset_ticks),
            v.tsc_ticks
        );
        assert_eq!(
            u128::from(v.kvmclock_ns) * u128::from(s.tsc.guest_tsc_khz) / 1_000_000,
            u128::from(v.tsc_ticks)
        );
    }
    assert!(s.validate().is_ok());
}

const SPEC: &str = include_str!("../SPEC.md");

/// The rows of the markdown table that follows `heading` in SPEC.md: cells, trimmed, without
/// backticks; the header and separator rows skipped.
fn spec_table(heading: &str) -> Vec<Vec<String>> {
    let start = SPEC
        .find(heading)
        .unwrap_or_else(|| panic!("SPEC.md lacks {heading}"));
    SPEC[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().replace('`', ""))
                .collect()
        })
        .collect()
}

/// Evaluate an offset expression of SPEC.md (`57 + 28i`, `H = 57 + 28n`, `N+4`, `16+len`):
/// a sum of terms, each an integer, a variable, or an integer times a variable. `NAME = expr`
/// defines NAME.
fn spec_eval(expr: &str, vars: &mut std::collections::HashMap<String, usize>) -> usize {
    let (name, body) = match expr.split_once('=') {
        Some((n, b)) => (Some(n.trim().to_string()), b),
        None => (None, expr),
    };
    let value = body
        .split('+')
        .map(|t| {
            let t = t.trim();
            let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
            let var = &t[digits.len()..];
            let k: usize = if digits.is_empty() {
                1
            } else {
                digits.parse().unwrap()
            };
            if var.is_empty() {
                k
            } else {
                k * *vars
                    .get(var)
                    .unwrap_or_else(|| panic!("SPEC.md: unknown variable {var} in {expr}"))
            }
        })
        .sum();
    if let Some(n) = name {
        vars.insert(n, value);
    }
    value
}

/// The little-endian bytes a SPEC.md payload field holds in `s` (vCPU `i` for `vcpus[i].*`).
fn spec_field_bytes(s: &ClockState, field: &str, i: usize) -> Vec<u8> {
    let v = s.vcpus.get(i).copied().unwrap_or_default();
    match field {
        "capture_kind" => (s.capture_kind as u32).to_le_bytes().to_vec(),
        "clock.clock_ns" => s.clock.clock_ns.to_le_bytes().to_vec(),
        "clock.flags" => s.clock.flags.to_le_bytes().to_vec(),
        "clock.realtime_ns" => s.clock.realtime_ns.to_le_bytes().to_vec(),
        "clock.host_tsc_ticks" => s.clock.host_tsc_ticks.to_le_bytes().to_vec(),
        "tsc.guest_tsc_khz" => s.tsc.guest_tsc_khz.to_le_bytes().to_vec(),
        "tsc.host_tsc_khz" => s.tsc.host_tsc_khz.to_le_bytes().to_vec(),
        "tsc.ratio" => s.tsc.ratio.to_le_bytes().to_vec(),
        "tsc.frac_bits" => vec![s.tsc.frac_bits],
        "vcpus length" => (s.vcpus.len() as u64).to_le_bytes().to_vec(),
        "vcpus[i].id" => v.id.to_le_bytes().to_vec(),
        "vcpus[i].tsc_ticks" => v.tsc_ticks.to_le_bytes().to_vec(),
        "vcpus[i].kvmclock_ns" => v.kvmclock_ns.to_le_bytes().to_vec(),
        "vcpus[i].tsc_offset_ticks" => v.tsc_offset_ticks.to_le_bytes().to_vec(),
        "host.machine_id_hash" => s.host.machine_id_hash.to_le_bytes().to_vec(),
        "host.boot_id" => s.host.boot_id.to_vec(),
        "host.host_tsc_khz" => s.host.host_tsc_khz.to_le_bytes().to_vec(),
        "host.clocksource" => {
            let mut b = (s.host.clocksource.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(s.host.clocksource.as_bytes());
            b
        }
        "ntp.status" => s.ntp.status.to_le_bytes().to_vec(),
        "ntp.maxerror_us" => s.ntp.maxerror_us.to_le_bytes().to_vec(),
        "ntp.esterror_us" => s.ntp.esterror_us.to_le_bytes().to_vec(),
        "vmclock_disruption_marker" => s.vmclock_disruption_marker.to_le_bytes().to_vec(),
        "capture_uncertainty_ns" => s.capture_uncertainty_ns.to_le_bytes().to_vec(),
        "vm_id" => s.vm_id.to_vec(),
        f => panic!("SPEC.md names a field this test does not know: {f}"),
    }
}

/// The size SPEC.md's type column gives.
fn spec_type_size(ty: &str, c: usize) -> usize {
    match ty {
        "u8" => 1,
        "u32" | "i32" => 4,
        "u64" | "i64" => 8,
        "16 × u8" => 16,
        "u64 + c bytes" => 8 + c,
        t => panic!("SPEC.md type this test does not know: {t}"),
    }
}

/// SPEC.md's tables, parsed and checked against the vector bytes: every row's offset, size and
/// value, and that the rows tile the payload exactly.
#[test]
fn spec_tables_match_the_vectors() {
    let v1_rows = spec_table("## Payload, version 1");
    let v2_rows = spec_table("## Payload, version 2");
    let v3_rows = spec_table("## Payload, version 3");
    let frame_rows = spec_table("## Frame");
    assert!(
        v1_rows.len() >= 20 && v2_rows.len() == 1 && v3_rows.len() == 1 && frame_rows.len() == 6
    );
    for (version, bytes) in [(1u16, V1), (2, V2), (3, V3)] {
        // A v1/v2 vector holds the state its version can carry.
        let s = if version >= 3 {
            golden_state()
        } else {
            golden_state_without_vm_id()
        };
        let len = u32_at(bytes, 12) as usize;
        let mut vars = std::collections::HashMap::from([
            ("n".to_string(), s.vcpus.len()),
            ("c".to_string(), s.host.clocksource.len()),
            ("len".to_string(), len),
        ]);
        // Frame.
        let mut at = 0;
        for row in &frame_rows {
            let off = spec_eval(&row[0], &mut vars);
            assert_eq!(off, at, "frame row {row:?}: gap or overlap");
            let size = if row[1] == "payload_len" {
                len
            } else {
                row[1].parse::<usize>().unwrap()
            };
            let got = &bytes[off..off + size];
            match row[2].split(' ').next().unwrap() {
                "magic" => assert_eq!(got, b"GCLKSECT"),
                "version" => assert_eq!(got, version.to_le_bytes()),
                "reserved" => assert_eq!(got, [0, 0]),
                "payload_len" => assert_eq!(got, (len as u32).to_le_bytes()),
                "payload" => {}
                "crc64" => assert_eq!(got, CRC.checksum(&bytes[..16 + len]).to_le_bytes()),
                f => panic!("unknown frame field {f}"),
            }
            at = off + size;
        }
        assert_eq!(at, bytes.len(), "the frame table covers the whole file");
        // Payload: v1 rows, then (for v2) the v2 rows.
        let payload = &bytes[16..16 + len];
        let mut rows: Vec<&Vec<String>> = v1_rows.iter().collect();
        if version >= 2 {
            rows.extend(v2_rows.iter());
        }
        if version >= 3 {
            rows.extend(v3_rows.iter());
        }
        let mut at = 0;
        for row in rows {
            let (off_expr, ty, field) = (&row[0], &row[1], &row[2]);
            if ty == "—" {
                // "end of v1": only meaningful for a v1 payload.
                let end = spec_eval(off_expr, &mut vars);
                if version == 1 {
                    assert_eq!(end, payload.len(), "{field}");
                }
                continue;
            }
            let per_vcpu = off_expr.contains('i');
            for i in 0..if per_vcpu { s.vcpus.len() } else { 1 } {
                vars.insert("i".into(), i);
                let off = spec_eval(off_expr, &mut vars);
                let size = spec_type_size(ty, s.host.clocksource.len());
                let want = spec_field_bytes(&s, field, i);
                assert_eq!(want.len(), size, "{field}: type {ty} vs value size");
                assert_eq!(
                    &payload[off..off + size],
                    &want[..],
                    "v{version} {field}[{i}] at payload+{off}"
                );
                // vCPU rows interleave: the tiling check walks them in encoding order.
                if !per_vcpu {
                    assert_eq!(off, at, "v{version} {field}: gap or overlap before it");
                    at = off + size;
                }
            }
            if field == "vcpus length" {
                at += s.vcpus.len() * VCPU_ENCODED_LEN;
            }
        }
        assert_eq!(at, payload.len(), "v{version}: the rows cover the payload");
    }
    // The per-vCPU rows tile one VCPU_ENCODED_LEN record.
    let vcpu_rows: Vec<_> = v1_rows.iter().filter(|r| r[0].contains('i')).collect();
    let total: usize = vcpu_rows.iter().map(|r| spec_type_size(&r[1], 0)).sum();
    assert_eq!(total, VCPU_ENCODED_LEN);
}

/// SPEC.md's size formulas hold for other vCPU counts and clocksource lengths, and the enum
/// encoding (variant index as u32) holds for the other variant.
#[test]
fn spec_size_formulas_and_enum_encoding() {
    assert!(SPEC.contains("v1 payload = 121 + 28n + c bytes"));
    assert!(SPEC.contains("v2 payload = 129 + 28n + c bytes"));
    assert!(SPEC.contains("v3 payload = 145 + 28n + c bytes"));
    for n in [1usize, 2, 7, 64] {
        for cs in ["", "tsc", "kvm-clock", &"x".repeat(32)] {
            let mut s = golden_state();
            s.vcpus = (0..n as u32)
                .map(|id| VcpuClockState {
                    id,
                    ..Default::default()
                })
                .collect();
            s.host.clocksource = cs.to_string();
            let c = cs.len();
            assert_eq!(encode(&s, 1).unwrap().len(), 24 + 121 + 28 * n + c);
            assert_eq!(encode(&s, 2).unwrap().len(), 24 + 129 + 28 * n + c);
            assert_eq!(encode(&s, 3).unwrap().len(), 24 + 145 + 28 * n + c);
        }
    }
    let mut s = golden_state();
    s.capture_kind = CaptureKind::UserspaceBracket;
    s.clock.flags = 0;
    let b = encode(&s, 2).unwrap();
    assert_eq!(u32_at(&b, 16), 1, "UserspaceBracket = 1");
}
