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
                tsc_ticks: 12_528_637_402,
                kvmclock_ns: 5_123_456_789,
                tsc_offset_ticks: 0xffff_f8a2_1c3b_5e47,
            },
            VcpuClockState {
                id: 1,
                tsc_ticks: 12_528_637_402,
                kvmclock_ns: 5_123_456_789,
                tsc_offset_ticks: 0xffff_f8a2_1c3b_5e47,
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
    }
}

const V1: &[u8] = include_bytes!("../vectors/clock-v1.bin");
const V2: &[u8] = include_bytes!("../vectors/clock-v2.bin");

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
    }
}

#[test]
fn golden_vectors_decode_and_reencode_byte_for_byte() {
    let d2 = decode(V2).unwrap();
    assert_eq!(d2.version, 2);
    assert_eq!(d2.state, golden_state());
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
        golden_state()
    );
    assert_eq!(encode(&d1.state, 1).unwrap(), V1);
}

#[test]
fn encoding_of_the_fixed_state_is_stable() {
    assert_eq!(
        encode(&golden_state(), 2).unwrap(),
        V2,
        "the v2 encoding changed: bump the version"
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
    for (v, bytes) in [(1u16, V1), (2, V2)] {
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
        if v == 2 {
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
    assert_eq!(decode(&encode(&s, 2).unwrap()).unwrap().state, s);
}

fn reframe(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 8;
    let crc = CRC.checksum(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn every_framing_error() {
    let good = V2.to_vec();
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
    b[8] = 3;
    assert!(matches!(
        decode(&b).unwrap_err(),
        FormatError::UnsupportedVersion {
            found: 3,
            newest: 2
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
            assert!(
                e.to_string().contains("vcpus")
                    || matches!(e, FormatError::Payload(_) | FormatError::TrailingBytes(_)),
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
        encode(&golden_state(), 3),
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
        .serialize(&mut buf, &version_map(), 2)
        .unwrap();
    let back = FramedClockState::deserialize(&mut buf.as_slice(), &version_map(), 2).unwrap();
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
        let d = decode(&encode(&s, 2).unwrap()).unwrap();
        prop_assert_eq!(d.state, s);
    }
}
