//! All the clock math in one place: pure, exact, integer-only functions with 128-bit
//! intermediates and explicit rounding. Units are in the names (`_ns`, `_khz`, `_ticks`).
//!
//! Kernel references (arch/x86/kvm/x86.c, arch/x86/include/asm/pvclock.h):
//! `kvm_scale_tsc`, `kvm_compute_l1_tsc_offset`, `kvm_get_time_scale`, `__pvclock_read_cycles`,
//! `pvclock_scale_delta`, `kvm_set_tsc_khz`.

use guest_clock_format::ClockState;

use crate::backend::PvclockTimeInfo;

const NSEC_PER_SEC: u64 = 1_000_000_000;
/// kHz → Hz and ns → s meet at 1e6: `ticks = ns · khz / 1e6`.
const NS_KHZ_DIV: u128 = 1_000_000;

fn sat_u64(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------- TSC scaling

/// KVM's TSC scaling ratio for a guest rate (`kvm_set_tsc_khz` → `set_tsc_khz`):
/// `ratio = ⌊(1 << frac_bits) · guest_khz / host_khz⌋` (`mul_u64_u32_div`).
/// `None` when `host_khz == 0`, `frac_bits > 63`, or the ratio does not fit in 64 bits.
pub fn tsc_scaling_ratio(guest_khz: u32, host_khz: u32, frac_bits: u8) -> Option<u64> {
    if host_khz == 0 || frac_bits > 63 {
        return None;
    }
    let r = (1u128 << frac_bits) * u128::from(guest_khz) / u128::from(host_khz);
    u64::try_from(r).ok()
}

/// The ratio KVM actually uses: no scaling (`1 << frac_bits`) when the host has none
/// (`frac_bits == 0`: returns 1) or the guest rate is within 250 ppm of the host's
/// (`|guest − host| · 1e6 ≤ host · 250`, `kvm_set_tsc_khz`'s tolerance), else
/// [`tsc_scaling_ratio`] (1:1 where that is undefined).
pub fn effective_tsc_ratio(guest_khz: u32, host_khz: u32, frac_bits: u8) -> u64 {
    if frac_bits == 0 || frac_bits > 63 {
        return 1;
    }
    let one = 1u64 << frac_bits;
    let diff = u64::from(guest_khz.abs_diff(host_khz));
    if diff * 1_000_000 <= u64::from(host_khz) * 250 {
        return one;
    }
    tsc_scaling_ratio(guest_khz, host_khz, frac_bits).unwrap_or(one)
}

/// `kvm_scale_tsc`: `⌊host_tsc · ratio / 2^frac_bits⌋` with a 128-bit product (saturating).
/// `frac_bits == 0` means no scaling hardware: the host TSC is returned unchanged.
pub fn scale_tsc(host_tsc_ticks: u64, ratio: u64, frac_bits: u8) -> u64 {
    if frac_bits == 0 || frac_bits > 63 {
        return host_tsc_ticks;
    }
    sat_u64((u128::from(host_tsc_ticks) * u128::from(ratio)) >> frac_bits)
}

/// The guest TSC as KVM computes it: `scale_tsc(host) + offset` (wrapping, like the hardware).
pub fn guest_tsc_ticks(host_tsc_ticks: u64, ratio: u64, frac_bits: u8, offset_ticks: u64) -> u64 {
    scale_tsc(host_tsc_ticks, ratio, frac_bits).wrapping_add(offset_ticks)
}

/// `kvm_compute_l1_tsc_offset`: the offset that makes the guest TSC read `guest_tsc_ticks` at
/// host TSC `host_tsc_ticks`: `guest − scale_tsc(host)` (wrapping).
pub fn tsc_offset_for(guest_tsc_ticks: u64, host_tsc_ticks: u64, ratio: u64, frac_bits: u8) -> u64 {
    guest_tsc_ticks.wrapping_sub(scale_tsc(host_tsc_ticks, ratio, frac_bits))
}

// ---------------------------------------------------------------- ns ↔ ticks

/// `⌊ns · khz / 1e6⌋` (saturating).
pub fn ns_to_ticks_floor(ns: u64, khz: u32) -> u64 {
    sat_u64(u128::from(ns) * u128::from(khz) / NS_KHZ_DIV)
}

/// `round(ns · khz / 1e6)`, halves up (saturating).
pub fn ns_to_ticks_round(ns: u64, khz: u32) -> u64 {
    sat_u64((u128::from(ns) * u128::from(khz) + NS_KHZ_DIV / 2) / NS_KHZ_DIV)
}

/// `⌊ticks · 1e6 / khz⌋` (saturating; 0 kHz gives `u64::MAX` for non-zero ticks).
pub fn ticks_to_ns_floor(ticks: u64, khz: u32) -> u64 {
    if khz == 0 {
        return if ticks == 0 { 0 } else { u64::MAX };
    }
    sat_u64(u128::from(ticks) * NS_KHZ_DIV / u128::from(khz))
}

/// `round(ticks · 1e6 / khz)`, halves up (saturating; 0 kHz as in [`ticks_to_ns_floor`]).
pub fn ticks_to_ns_round(ticks: u64, khz: u32) -> u64 {
    if khz == 0 {
        return if ticks == 0 { 0 } else { u64::MAX };
    }
    let k = u128::from(khz);
    sat_u64((u128::from(ticks) * NS_KHZ_DIV + k / 2) / k)
}

fn sat_i64(x: i128) -> i64 {
    x.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Signed division rounding to nearest, halves away from zero.
fn div_round_i128(n: i128, d: i128) -> i128 {
    let q = (n.abs() + d / 2) / d;
    if n < 0 {
        -q
    } else {
        q
    }
}

/// A signed ns interval as ticks: `round(Δns · khz / 1e6)` (halves away from 0, saturating).
pub fn delta_ns_to_ticks(delta_ns: i64, khz: u32) -> i64 {
    sat_i64(div_round_i128(
        i128::from(delta_ns) * i128::from(khz),
        NS_KHZ_DIV as i128,
    ))
}

/// A signed tick interval as ns: `round(Δticks · 1e6 / khz)` (halves away from 0, saturating;
/// 0 kHz saturates).
pub fn delta_ticks_to_ns(delta_ticks: i64, khz: u32) -> i64 {
    if khz == 0 {
        return match delta_ticks.signum() {
            0 => 0,
            1 => i64::MAX,
            _ => i64::MIN,
        };
    }
    sat_i64(div_round_i128(
        i128::from(delta_ticks) * NS_KHZ_DIV as i128,
        i128::from(khz),
    ))
}

/// Floor midpoint of two values without overflow: `⌊(a + b) / 2⌋`.
pub fn midpoint_u64(a: u64, b: u64) -> u64 {
    (a & b) + ((a ^ b) >> 1)
}

/// `a + d`, saturating at 0 and `u64::MAX`.
pub fn add_signed(a: u64, d: i64) -> u64 {
    if d >= 0 {
        a.saturating_add(d as u64)
    } else {
        a.saturating_sub(d.unsigned_abs())
    }
}

/// `a − b` as a signed value, saturating at the i64 range.
pub fn diff_signed(a: u64, b: u64) -> i64 {
    sat_i64(i128::from(a) - i128::from(b))
}

// ---------------------------------------------------------------- pvclock

/// A pvclock multiplier and shift: `ns = ((delta << shift) · mul) >> 32` (right shift when
/// `shift < 0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeScale {
    /// 32.32 fixed-point multiplier.
    pub mul: u32,
    /// Power-of-two pre-shift.
    pub shift: i8,
}

/// `kvm_get_time_scale(scaled_hz, base_hz)`: `shift` and `mul` such that a count at `base_hz`
/// converts to a count at `scaled_hz` as `((count << shift) · mul) >> 32`.
///
/// The kernel's algorithm, step for step:
/// 1. `tps64 = base`, `scaled = scaled_hz`, `shift = 0`;
///    while `tps64 > 2·scaled` or `tps64 ≥ 2³²`: `tps64 >>= 1`, `shift −= 1`.
/// 2. `tps32 = tps64`; while `tps32 ≤ scaled` or `scaled ≥ 2³²`: if `scaled ≥ 2³²` or the top bit
///    of `tps32` is set, `scaled >>= 1`, else `tps32 <<= 1`; `shift += 1`.
/// 3. `mul = div_frac(scaled, tps32) = ⌊(scaled << 32) / tps32⌋` (a 64/32 `divl`).
///
/// Returns `{mul: 0, shift: 0}` for a zero rate.
pub fn kvm_get_time_scale(scaled_hz: u64, base_hz: u64) -> TimeScale {
    if base_hz == 0 || scaled_hz == 0 {
        return TimeScale { mul: 0, shift: 0 };
    }
    const HIGH: u64 = 0xffff_ffff_0000_0000;
    let mut shift: i32 = 0;
    let mut tps64 = base_hz;
    let mut scaled64 = scaled_hz;
    while tps64 > scaled64.saturating_mul(2) || tps64 & HIGH != 0 {
        tps64 >>= 1;
        shift -= 1;
    }
    let mut tps32 = tps64 as u32;
    while u64::from(tps32) <= scaled64 || scaled64 & HIGH != 0 {
        if scaled64 & HIGH != 0 || tps32 & 0x8000_0000 != 0 {
            scaled64 >>= 1;
        } else {
            tps32 <<= 1;
        }
        shift += 1;
    }
    // div_frac: (scaled:0) / tps32 in one divl; scaled < tps32 here so the quotient fits 32 bits.
    let mul = (u128::from(scaled64 as u32) << 32) / u128::from(tps32);
    TimeScale {
        mul: u32::try_from(mul).unwrap_or(u32::MAX),
        shift: shift.clamp(-128, 127) as i8,
    }
}

/// The pvclock scale kvmclock uses for a guest TSC rate:
/// `kvm_get_time_scale(NSEC_PER_SEC, tsc_khz · 1000)`.
pub fn pvclock_time_scale_for_khz(tsc_khz: u32) -> TimeScale {
    kvm_get_time_scale(NSEC_PER_SEC, u64::from(tsc_khz) * 1000)
}

/// `pvclock_scale_delta`: `delta` shifted left by `shift` (right by `−shift` when negative), then
/// `(delta · mul) >> 32` with a 128-bit product.
pub fn pvclock_scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift >= 0 {
        delta.checked_shl(shift as u32).unwrap_or(0)
    } else {
        delta
            .checked_shr(u32::from(shift.unsigned_abs()))
            .unwrap_or(0)
    };
    sat_u64((u128::from(d) * u128::from(mul)) >> 32)
}

/// What a guest computes from its pvclock at guest TSC `guest_tsc_ticks`
/// (`__pvclock_read_cycles`): `system_time + pvclock_scale_delta(tsc − tsc_timestamp, mul, shift)`.
/// A TSC before `tsc_timestamp` wraps in the kernel too (u64 subtraction).
pub fn pvclock_read_ns(info: &PvclockTimeInfo, guest_tsc_ticks: u64) -> u64 {
    let delta = guest_tsc_ticks.wrapping_sub(info.tsc_timestamp);
    info.system_time.wrapping_add(pvclock_scale_delta(
        delta,
        info.tsc_to_system_mul,
        info.tsc_shift,
    ))
}

/// The pvclock *function* evaluated at any TSC, signed, for measurements: like
/// [`pvclock_read_ns`] at or after `tsc_timestamp`, and extended backwards before it
/// (`system_time − scale(tsc_timestamp − tsc)`) where the guest's own u64 formula would wrap.
pub fn pvclock_eval_ns(info: &PvclockTimeInfo, tsc_ticks: u64) -> i128 {
    let mul = info.tsc_to_system_mul;
    if tsc_ticks >= info.tsc_timestamp {
        i128::from(info.system_time)
            + i128::from(pvclock_scale_delta(
                tsc_ticks - info.tsc_timestamp,
                mul,
                info.tsc_shift,
            ))
    } else {
        i128::from(info.system_time)
            - i128::from(pvclock_scale_delta(
                info.tsc_timestamp - tsc_ticks,
                mul,
                info.tsc_shift,
            ))
    }
}

// ---------------------------------------------------------------- the preserved relationships

/// Why the host TSC did not continue between a capture and a reading on the same machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum TscDiscontinuity {
    /// The section does not say how fast the source host's TSC ran.
    #[error("the source host TSC rate is unknown (0 kHz)")]
    UnknownRate,
    /// The host TSC is below the captured one: it was reset (reboot).
    #[error("the host TSC went back ({now_ticks} < {captured_ticks}): it was reset")]
    TscWentBack {
        /// Host TSC at the capture.
        captured_ticks: u64,
        /// Host TSC now.
        now_ticks: u64,
    },
    /// Host realtime is below the captured W.
    #[error("host realtime went back since the capture")]
    RealtimeWentBack,
    /// The TSC and realtime measured different elapsed times.
    #[error(
        "the host TSC is not continuous: it measured {tsc_elapsed_ns} ns where realtime measured \
         {realtime_elapsed_ns} ns (tolerance {tolerance_ns} ns)"
    )]
    ElapsedDisagree {
        /// Elapsed time by the host TSC, ns.
        tsc_elapsed_ns: u64,
        /// Elapsed time by host realtime, ns.
        realtime_elapsed_ns: u64,
        /// The tolerance applied, ns.
        tolerance_ns: u64,
    },
}

/// Whether the host TSC continued between a capture `(h₀, r₀)` and a reading `(h₁, r₁)` on the
/// same machine: `|ticks_to_ns(h₁ − h₀, khz) − (r₁ − r₀)| ≤ max(floor_ns, (r₁ − r₀) · ppm / 1e6)`.
/// Fails (with the reason) when realtime or the TSC went backwards (reboot, stepped clock) or the
/// two elapsed times disagree.
pub fn host_tsc_continuity(
    src_host_tsc_ticks: u64,
    src_realtime_ns: u64,
    host_khz: u32,
    dst_host_tsc_ticks: u64,
    dst_realtime_ns: u64,
    tolerance_ppm: u64,
    floor_ns: u64,
) -> Result<(), TscDiscontinuity> {
    if host_khz == 0 {
        return Err(TscDiscontinuity::UnknownRate);
    }
    if dst_host_tsc_ticks < src_host_tsc_ticks {
        return Err(TscDiscontinuity::TscWentBack {
            captured_ticks: src_host_tsc_ticks,
            now_ticks: dst_host_tsc_ticks,
        });
    }
    if dst_realtime_ns < src_realtime_ns {
        return Err(TscDiscontinuity::RealtimeWentBack);
    }
    let elapsed_rt = dst_realtime_ns - src_realtime_ns;
    let elapsed_tsc = ticks_to_ns_round(dst_host_tsc_ticks - src_host_tsc_ticks, host_khz);
    let tol = floor_ns.max(
        u64::try_from(u128::from(elapsed_rt) * u128::from(tolerance_ppm) / 1_000_000)
            .unwrap_or(u64::MAX),
    );
    if elapsed_tsc.abs_diff(elapsed_rt) > tol {
        return Err(TscDiscontinuity::ElapsedDisagree {
            tsc_elapsed_ns: elapsed_tsc,
            realtime_elapsed_ns: elapsed_rt,
            tolerance_ns: tol,
        });
    }
    Ok(())
}

/// One simultaneous reading of a destination: kvmclock, host realtime, host TSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationReading {
    /// kvmclock, ns.
    pub kvmclock_ns: u64,
    /// Host CLOCK_REALTIME, ns.
    pub realtime_ns: u64,
    /// Host TSC, ticks.
    pub host_tsc_ticks: u64,
}

/// The relationship a restore preserves, as the kvmclock value it asks for at a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relation {
    kind: RelationKind,
    /// Live migration only: how far the destination's wallclock was behind the capture, ns; the
    /// relationship was moved forward by this much so kvmclock never steps back below K.
    pub clamped_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelationKind {
    /// `E(h) = K + ticks_to_ns(h − h₀, host_khz)`: the identical kvmclock function of the host TSC.
    HostTsc {
        k_ns: u64,
        host_tsc_ticks: u64,
        host_khz: u32,
    },
    /// `E(r) = K + (r − W)`: kvmclock was K at wallclock W.
    Wallclock { k_ns: u64, w_ns: u64 },
}

impl Relation {
    /// Live update: `E(h) = K + ticks_to_ns(h − h_src, host_khz)` (signed, rounded to nearest).
    pub fn live_update(state: &ClockState) -> Self {
        Relation {
            kind: RelationKind::HostTsc {
                k_ns: state.clock.clock_ns,
                host_tsc_ticks: state.clock.host_tsc_ticks,
                host_khz: state.host.host_tsc_khz,
            },
            clamped_ns: 0,
        }
    }

    /// Live migration: `E(r) = K + (r + s − W)` where `s` is an injected wallclock skew (0 in
    /// production: the destination's wallclock *is* `r`). If the destination's wallclock
    /// `now + s` is behind W, kvmclock would step back below K; the relationship is then moved to
    /// `W' = now + s` (`clamped_ns = W − W'`) so kvmclock resumes at K.
    pub fn live_migration(state: &ClockState, skew_ns: i64, dest_realtime_now_ns: u64) -> Self {
        let k_ns = state.clock.clock_ns;
        // E(r) = K + (r + s − W) = K + (r − (W − s)).
        let mut w_ns = add_signed(state.clock.realtime_ns, -skew_ns);
        let mut clamped_ns = 0;
        if dest_realtime_now_ns < w_ns {
            clamped_ns = w_ns - dest_realtime_now_ns;
            w_ns = dest_realtime_now_ns;
        }
        Relation {
            kind: RelationKind::Wallclock { k_ns, w_ns },
            clamped_ns,
        }
    }

    /// The kvmclock the relationship asks for at host TSC `host_tsc_ticks` and realtime
    /// `realtime_ns` (each relationship uses one of them).
    pub fn kvmclock_at(&self, host_tsc_ticks: u64, realtime_ns: u64) -> u64 {
        match self.kind {
            RelationKind::HostTsc {
                k_ns,
                host_tsc_ticks: h0,
                host_khz,
            } => add_signed(
                k_ns,
                delta_ticks_to_ns(diff_signed(host_tsc_ticks, h0), host_khz),
            ),
            RelationKind::Wallclock { k_ns, w_ns } => {
                add_signed(k_ns, diff_signed(realtime_ns, w_ns))
            }
        }
    }

    /// `reading.kvmclock − E(reading)`, ns: how far the destination's kvmclock is from the
    /// relationship (positive: ahead).
    pub fn residual_ns(&self, reading: &DestinationReading) -> i64 {
        diff_signed(
            reading.kvmclock_ns,
            self.kvmclock_at(reading.host_tsc_ticks, reading.realtime_ns),
        )
    }
}

/// "vCPU n's TSC was Tₙ at kvmclock Kₙ" evaluated at kvmclock K':
/// `Tₙ' = Tₙ + ns_to_ticks(K' − Kₙ, khz)` (signed, rounded to nearest, wrapping like a TSC).
pub fn tsc_at_kvmclock(tsc_ticks: u64, kvmclock_ns: u64, at_kvmclock_ns: u64, khz: u32) -> u64 {
    tsc_ticks.wrapping_add(delta_ns_to_ticks(diff_signed(at_kvmclock_ns, kvmclock_ns), khz) as u64)
}

/// Live-migration TSC offsets: with kvmclock reading `kvmclock_ns` at host TSC `host_tsc_ticks`
/// on the destination, `offsetₙ = Tₙ' − scale(host_tsc)` where `Tₙ' = tsc_at_kvmclock(...)`.
/// vCPUs that had equal offsets on the source (were in sync) get the first one's offset, so they
/// stay exactly in sync whatever rounding their (Tₙ, Kₙ) pairs carry.
pub fn migration_tsc_offsets(
    state: &ClockState,
    kvmclock_ns: u64,
    host_tsc_ticks: u64,
    ratio: u64,
    frac_bits: u8,
) -> Vec<u64> {
    let khz = state.tsc.guest_tsc_khz;
    let scaled = scale_tsc(host_tsc_ticks, ratio, frac_bits);
    let mut out: Vec<u64> = Vec::with_capacity(state.vcpus.len());
    for (i, v) in state.vcpus.iter().enumerate() {
        let twin = state.vcpus[..i]
            .iter()
            .position(|p| p.tsc_offset_ticks == v.tsc_offset_ticks);
        let offset = match twin {
            Some(j) => out[j],
            None => {
                tsc_at_kvmclock(v.tsc_ticks, v.kvmclock_ns, kvmclock_ns, khz).wrapping_sub(scaled)
            }
        };
        out.push(offset);
    }
    out
}

// ---------------------------------------------------------------- vmclock (2⁻⁶⁴ s units)

/// A 256-bit unsigned integer, just enough for exact `a · b / c` with u128 factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct U256 {
    // Field order matters: the derived `Ord` compares `hi` first.
    hi: u128,
    lo: u128,
}

impl U256 {
    const ZERO: U256 = U256 { hi: 0, lo: 0 };

    fn from_u128(x: u128) -> Self {
        U256 { hi: 0, lo: x }
    }

    /// The full 256-bit product of two u128, by 64-bit limbs.
    fn mul(a: u128, b: u128) -> Self {
        const M: u128 = u64::MAX as u128;
        let (a1, a0) = (a >> 64, a & M);
        let (b1, b0) = (b >> 64, b & M);
        let mut r = U256 {
            hi: a1 * b1,
            lo: a0 * b0,
        };
        for mid in [a0 * b1, a1 * b0] {
            r = r.wrapping_add(U256 {
                hi: mid >> 64,
                lo: mid << 64,
            });
        }
        r
    }

    fn wrapping_add(self, o: U256) -> Self {
        let (lo, carry) = self.lo.overflowing_add(o.lo);
        U256 {
            hi: self.hi.wrapping_add(o.hi).wrapping_add(u128::from(carry)),
            lo,
        }
    }

    fn checked_add(self, o: U256) -> Option<Self> {
        let (lo, carry) = self.lo.overflowing_add(o.lo);
        let hi = self.hi.checked_add(o.hi)?.checked_add(u128::from(carry))?;
        Some(U256 { hi, lo })
    }

    fn wrapping_sub(self, o: U256) -> Self {
        let (lo, borrow) = self.lo.overflowing_sub(o.lo);
        U256 {
            hi: self.hi.wrapping_sub(o.hi).wrapping_sub(u128::from(borrow)),
            lo,
        }
    }

    /// `self << n` for `n < 256` (bits shifted out are lost).
    fn shl(self, n: u32) -> Self {
        match n {
            0 => self,
            1..=127 => U256 {
                hi: (self.hi << n) | (self.lo >> (128 - n)),
                lo: self.lo << n,
            },
            128..=255 => U256 {
                hi: self.lo << (n - 128),
                lo: 0,
            },
            _ => U256::ZERO,
        }
    }

    fn shr1(self) -> Self {
        U256 {
            hi: self.hi >> 1,
            lo: (self.lo >> 1) | (self.hi << 127),
        }
    }

    fn bit(self, i: u32) -> bool {
        if i < 128 {
            (self.lo >> i) & 1 == 1
        } else {
            (self.hi >> (i - 128)) & 1 == 1
        }
    }

    /// `⌊self / d⌋` by binary long division; `None` when `d == 0` or `d ≥ 2²⁵⁵` (so the running
    /// remainder can always be doubled).
    fn checked_div(self, d: U256) -> Option<Self> {
        if d == U256::ZERO || d.hi >> 127 != 0 {
            return None;
        }
        let mut q = U256::ZERO;
        let mut rem = U256::ZERO;
        for i in (0..256).rev() {
            rem = rem.shl(1);
            if self.bit(i) {
                rem.lo |= 1;
            }
            if rem >= d {
                rem = rem.wrapping_sub(d);
                q = q.wrapping_add(U256::from_u128(1).shl(i));
            }
        }
        Some(q)
    }

    /// `round(self / d)`, halves up.
    fn checked_div_round(self, d: U256) -> Option<Self> {
        self.checked_add(d.shr1())?.checked_div(d)
    }

    fn to_u64(self) -> Option<u64> {
        if self.hi != 0 {
            return None;
        }
        u64::try_from(self.lo).ok()
    }
}

/// A vmclock counter period: one counter tick lasts `frac_sec / 2^(64 + shift)` seconds
/// (`counter_period_frac_sec`, `counter_period_shift` of `struct vmclock_abi`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmclockPeriod {
    /// `counter_period_frac_sec`: seconds per tick in units of `2^-(64 + shift)`.
    pub frac_sec: u64,
    /// `counter_period_shift`.
    pub shift: u8,
}

/// The period of a tick lasting `num / den` seconds, with the largest shift that still fits:
/// `frac_sec = round(2^(64 + shift) · num / den)`, `shift` the largest in `0..=63` with
/// `frac_sec ≤ u64::MAX`. The relative precision is then better than `2⁻⁶³`: for a 10 GHz
/// counter shift is 33 and an hour of ticks carries < 1 fs of rounding error.
/// `None` when the period is 0, too long (`round(2⁶⁴ · num / den) > u64::MAX`, i.e. ≥ 1 s), or
/// too short to represent (`frac_sec` would be 0 even at shift 63).
fn vmclock_period_of(num: u128, den: U256) -> Option<VmclockPeriod> {
    let at = |shift: u8| -> Option<Option<u64>> {
        // 2^(64+shift) · num < 2^(127+127): no overflow.
        let n = U256::from_u128(num).shl(64 + u32::from(shift));
        Some(n.checked_div_round(den)?.to_u64())
    };
    at(0)??;
    let (mut lo, mut hi) = (0u8, 63u8);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if at(mid)?.is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let frac_sec = at(lo)??;
    (frac_sec != 0).then_some(VmclockPeriod {
        frac_sec,
        shift: lo,
    })
}

/// The period of a counter running at `hz` ticks per second: `round(2^(64+shift) / hz)` with
/// the shift chosen by the same rule as [`guest_tsc_period`]. `None` for 0 Hz or 1 Hz
/// (a period of ≥ 1 s does not fit `counter_period_frac_sec`).
pub fn counter_period_for_hz(hz: u64) -> Option<VmclockPeriod> {
    vmclock_period_of(1, U256::from_u128(u128::from(hz)))
}

/// How fast the host's CLOCK_REALTIME runs against its nominal clocksource rate:
/// `num / den` realtime seconds per nominal second.
///
/// From `adjtimex(2)` (`ntp_update_frequency` in kernel/time/ntp.c): the kernel makes a second
/// of nominal clocksource cycles last `tick_us · USER_HZ · 1000 + freq · 1000 / 2¹⁶` ns, where
/// `tick_us` is `timex.tick` (µs per `USER_HZ` tick, 10000 nominal) and `freq` is `timex.freq`
/// (scaled ppm, 2⁻¹⁶ ppm). So `num = tick_us · USER_HZ · 1000 · 2¹⁶ + freq · 1000`,
/// `den = 10⁹ · 2¹⁶`. The PLL's transient offset slew (`timex.offset` with `STA_PLL`) is not
/// included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealtimeRate {
    /// Realtime seconds (numerator).
    pub num: u64,
    /// Nominal seconds (denominator, non-zero).
    pub den: u64,
}

/// `USER_HZ` on x86 Linux: the unit of `timex.tick`.
pub const USER_HZ: i64 = 100;

impl RealtimeRate {
    /// Realtime runs at exactly the nominal rate.
    pub const NOMINAL: RealtimeRate = RealtimeRate { num: 1, den: 1 };

    /// The rate `adjtimex` reports (see the type's docs). `None` outside what the kernel
    /// accepts: `tick_us` within ±10 % of `1e6 / USER_HZ`, `|freq| ≤ 500 ppm` (`MAXFREQ_SCALED`).
    pub fn from_adjtimex(tick_us: i64, freq_scaled_ppm: i64) -> Option<Self> {
        const SCALE: i64 = 1 << 16;
        let nominal_tick = 1_000_000 / USER_HZ;
        if !(nominal_tick * 9 / 10..=nominal_tick * 11 / 10).contains(&tick_us)
            || freq_scaled_ppm.unsigned_abs() > 500 * (SCALE as u64)
        {
            return None;
        }
        let num = tick_us * USER_HZ * 1000 * SCALE + freq_scaled_ppm * 1000;
        Some(RealtimeRate {
            num: u64::try_from(num).ok()?,
            den: 1_000_000_000 * SCALE as u64,
        })
    }
}

/// The vmclock period of a guest TSC, in the host's realtime: with guest ticks
/// `guest = ((host · ratio) >> frac_bits) + offset` and the host TSC nominally at
/// `host_tsc_khz`, one guest tick lasts
/// `P = 2^frac_bits / ratio · 1 / (host_tsc_khz · 1000) · rate.num / rate.den` seconds
/// (`frac_bits == 0`: no scaling hardware, the guest TSC runs at the host's rate whatever its
/// nominal kHz). Computed exactly with a 256-bit intermediate, then as [`counter_period_for_hz`].
///
/// The guest's own `tsc_khz` is deliberately not used: KVM does not scale within 250 ppm (and
/// without scaling hardware not at all), so the ratio KVM applies is the truth.
pub fn guest_tsc_period(
    host_tsc_khz: u32,
    ratio: u64,
    frac_bits: u8,
    rate: RealtimeRate,
) -> Option<VmclockPeriod> {
    if host_tsc_khz == 0 || ratio == 0 || rate.den == 0 || rate.num == 0 {
        return None;
    }
    let host_hz = u128::from(host_tsc_khz) * 1000;
    let (num, den_a) = if frac_bits == 0 || frac_bits > 63 {
        (u128::from(rate.num), host_hz)
    } else {
        (
            u128::from(rate.num) << frac_bits,
            u128::from(ratio) * host_hz,
        )
    };
    vmclock_period_of(num, U256::mul(den_a, u128::from(rate.den)))
}

/// A period's error rate: `⌈frac_sec · ppm_scaled / (10⁶ · 2¹⁶)⌉` in the period's own units, for
/// `counter_period_{es,max}error_rate_frac_sec` (rounded up: an error bound). Saturates.
pub fn period_error_rate(period: VmclockPeriod, ppm_scaled: u64) -> u64 {
    let d: u128 = 1_000_000 << 16;
    sat_u64((u128::from(period.frac_sec) * u128::from(ppm_scaled)).div_ceil(d))
}

/// Nanoseconds within a second as a fraction of a second in 2⁻⁶⁴ units, rounded *up*:
/// `⌈ns · 2⁶⁴ / 10⁹⌉`, so that [`frac_sec_to_ns`] gives `ns` back exactly. `ns` ≥ 1e9 saturates.
pub fn ns_to_frac_sec(ns: u32) -> u64 {
    if u64::from(ns) >= NSEC_PER_SEC {
        return u64::MAX;
    }
    sat_u64((u128::from(ns) << 64).div_ceil(u128::from(NSEC_PER_SEC)))
}

/// A fraction of a second in 2⁻⁶⁴ units as nanoseconds, truncated as ptp_vmclock does
/// (`mul_u64_u64_shr(frac, NSEC_PER_SEC, 64)`): `⌊frac · 10⁹ / 2⁶⁴⌋`.
pub fn frac_sec_to_ns(frac_sec: u64) -> u32 {
    ((u128::from(frac_sec) * u128::from(NSEC_PER_SEC)) >> 64) as u32
}

/// CLOCK_REALTIME ns as vmclock `(time_sec, time_frac_sec)`: `(⌊ns / 10⁹⌋, ns_to_frac_sec(ns mod 10⁹))`.
pub fn realtime_ns_to_vmclock(ns: u64) -> (u64, u64) {
    (
        ns / NSEC_PER_SEC,
        ns_to_frac_sec((ns % NSEC_PER_SEC) as u32),
    )
}

/// The time a guest computes from a vmclock relationship at counter value `counter`, exactly as
/// Linux's ptp_vmclock does (`vmclock_get_crosststamp`):
/// `delta = counter − counter_value` (u64, wrapping),
/// `r = ((delta · frac_sec) >> shift) + time_frac_sec` (u128),
/// `sec = time_sec + (r >> 64)` (wrapping), `frac = r mod 2⁶⁴`. Returns `(sec, frac)`.
pub fn vmclock_time_at(
    counter_value: u64,
    period: VmclockPeriod,
    time_sec: u64,
    time_frac_sec: u64,
    counter: u64,
) -> (u64, u64) {
    let delta = counter.wrapping_sub(counter_value);
    let shift = u32::from(period.shift).min(127);
    let r =
        ((u128::from(delta) * u128::from(period.frac_sec)) >> shift) + u128::from(time_frac_sec);
    (time_sec.wrapping_add((r >> 64) as u64), r as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_clock_format::{KvmClockSample, TscScaling, VcpuClockState};
    use proptest::prelude::*;

    #[test]
    fn time_scale_known_values() {
        // 2.445404 GHz (this machine's kvm_pvm): one halving, mul ≈ 0.8179·2³².
        let ts = pvclock_time_scale_for_khz(2_445_404);
        assert_eq!(ts.shift, -1);
        let ns = pvclock_scale_delta(2_445_404_000, ts.mul, ts.shift);
        assert!(ns.abs_diff(1_000_000_000) <= 2, "{ns}");
        // 1 GHz: base == scaled → second loop doubles once: shift 1, mul = 2³¹.
        let ts = pvclock_time_scale_for_khz(1_000_000);
        assert_eq!((ts.shift, ts.mul), (1, 1 << 31));
        // 3 GHz: 3e9 > 2e9 → halve → 1.5e9: shift −1, mul = ⌊2³²·1e9/1.5e9⌋.
        let ts = pvclock_time_scale_for_khz(3_000_000);
        assert_eq!(ts.shift, -1);
        assert_eq!(
            ts.mul,
            ((1u128 << 32) * 1_000_000_000 / 1_500_000_000) as u32
        );
        assert_eq!(kvm_get_time_scale(1, 0), TimeScale { mul: 0, shift: 0 });
    }

    #[test]
    fn pvclock_eval_extends_backwards() {
        let p = PvclockTimeInfo {
            tsc_timestamp: 1_000,
            system_time: 5_000,
            tsc_to_system_mul: 1 << 31,
            tsc_shift: 0,
            ..Default::default()
        };
        assert_eq!(pvclock_eval_ns(&p, 3_000), 6_000);
        assert_eq!(
            pvclock_eval_ns(&p, 3_000),
            i128::from(pvclock_read_ns(&p, 3_000))
        );
        assert_eq!(pvclock_eval_ns(&p, 0), 4_500);
    }

    #[test]
    fn ratio_as_kvm_computes() {
        assert_eq!(tsc_scaling_ratio(2_000_000, 2_000_000, 48), Some(1 << 48));
        assert_eq!(tsc_scaling_ratio(1_000_000, 2_000_000, 32), Some(1 << 31));
        assert_eq!(tsc_scaling_ratio(1, 0, 48), None);
        // Within 250 ppm: no scaling.
        assert_eq!(effective_tsc_ratio(2_000_400, 2_000_000, 48), 1 << 48);
        assert_ne!(effective_tsc_ratio(2_001_000, 2_000_000, 48), 1 << 48);
        assert_eq!(effective_tsc_ratio(3_000_000, 2_000_000, 0), 1);
        assert_eq!(scale_tsc(1000, 1 << 47, 48), 500);
    }

    fn state_2vcpu() -> ClockState {
        ClockState {
            clock: KvmClockSample {
                clock_ns: 5_000_000_000,
                flags: 14,
                realtime_ns: 1_764_000_000_000_000_000,
                host_tsc_ticks: 9_000_000_000_000,
            },
            tsc: TscScaling {
                guest_tsc_khz: 2_000_000,
                host_tsc_khz: 3_000_000,
                ratio: 1 << 48,
                frac_bits: 48,
            },
            vcpus: vec![
                VcpuClockState {
                    id: 0,
                    tsc_ticks: 12_000_000_000,
                    kvmclock_ns: 5_000_000_000,
                    tsc_offset_ticks: 77,
                },
                VcpuClockState {
                    id: 1,
                    tsc_ticks: 12_000_000_001,
                    kvmclock_ns: 5_000_000_000,
                    tsc_offset_ticks: 77,
                },
            ],
            host: guest_clock_format::HostIdentity {
                host_tsc_khz: 3_000_000,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn live_update_relation_is_the_same_function() {
        let s = state_2vcpu();
        let rel = Relation::live_update(&s);
        // 3e9 host ticks later at 3 GHz = 1 s.
        let k = rel.kvmclock_at(s.clock.host_tsc_ticks + 3_000_000_000, 0);
        assert_eq!(k, s.clock.clock_ns + 1_000_000_000);
        assert_eq!(rel.kvmclock_at(s.clock.host_tsc_ticks, 0), s.clock.clock_ns);
    }

    #[test]
    fn migration_relation_and_clamp() {
        let s = state_2vcpu();
        let w = s.clock.realtime_ns;
        let rel = Relation::live_migration(&s, 0, w + 10);
        assert_eq!(rel.kvmclock_at(0, w + 2_000), s.clock.clock_ns + 2_000);
        assert_eq!(rel.clamped_ns, 0);
        // Destination 300 ns ahead (skew) → kvmclock 300 ns ahead.
        let rel = Relation::live_migration(&s, 300, w + 10);
        assert_eq!(rel.kvmclock_at(0, w), s.clock.clock_ns + 300);
        // Destination behind the capture: never below K.
        let rel = Relation::live_migration(&s, 0, w - 5_000);
        assert_eq!(rel.clamped_ns, 5_000);
        assert_eq!(rel.kvmclock_at(0, w - 5_000), s.clock.clock_ns);
        let reading = DestinationReading {
            kvmclock_ns: s.clock.clock_ns + 7,
            realtime_ns: w - 5_000,
            host_tsc_ticks: 0,
        };
        assert_eq!(rel.residual_ns(&reading), 7);
    }

    #[test]
    fn in_sync_vcpus_get_equal_offsets() {
        let s = state_2vcpu();
        let offs = migration_tsc_offsets(
            &s,
            s.clock.clock_ns + 1_000_000_000,
            123_456_789,
            1 << 48,
            48,
        );
        assert_eq!(offs[0], offs[1], "equal source offsets stay equal");
        // And vCPU 0 is consistent with kvmclock: T0 + 1 s · 2 GHz at that host TSC.
        assert_eq!(
            guest_tsc_ticks(123_456_789, 1 << 48, 48, offs[0]),
            s.vcpus[0].tsc_ticks + 2_000_000_000
        );
    }

    #[test]
    fn continuity() {
        let khz = 2_000_000;
        // 1 s later by both clocks.
        assert!(host_tsc_continuity(
            1_000,
            5_000,
            khz,
            1_000 + 2_000_000_000,
            5_000 + 1_000_000_000,
            1000,
            1_000_000
        )
        .is_ok());
        // TSC reset.
        assert!(host_tsc_continuity(1_000_000, 5_000, khz, 10, 6_000, 1000, 1_000_000).is_err());
        // TSC says 1 s, realtime says 2 s.
        assert!(
            host_tsc_continuity(0, 0, khz, 2_000_000_000, 2_000_000_000, 1000, 1_000_000).is_err()
        );
        assert!(host_tsc_continuity(0, 0, 0, 1, 1, 1000, 1).is_err());
    }

    #[test]
    fn u256_mul_div() {
        let a = 0xdead_beef_1234_5678_9abc_def0_1357_9bdfu128;
        let b = 0xffff_ffff_ffff_ffff_ffff_ffff_ffff_fff1u128;
        let p = U256::mul(a, b);
        assert_eq!(p.checked_div(U256::from_u128(b)), Some(U256::from_u128(a)));
        assert_eq!(p.checked_div(U256::from_u128(a)), Some(U256::from_u128(b)));
        assert_eq!(U256::mul(3, 5), U256::from_u128(15));
        assert_eq!(U256::mul(1 << 127, 2), U256 { hi: 1, lo: 0 });
        assert_eq!(
            U256::from_u128(7).checked_div_round(U256::from_u128(2)),
            Some(U256::from_u128(4))
        );
        assert_eq!(U256::from_u128(7).checked_div(U256::ZERO), None);
    }

    #[test]
    fn vmclock_period_known_values() {
        // The UAPI vmclock spec's example: 1 GHz is 0x89705F4136B4A597 >> (64 + 29).
        let p = counter_period_for_hz(1_000_000_000).unwrap();
        assert_eq!(p.shift, 29);
        assert!(
            p.frac_sec.abs_diff(0x8970_5F41_36B4_A597) <= 1,
            "{:#x}",
            p.frac_sec
        );
        assert_eq!(counter_period_for_hz(0), None);
        assert_eq!(counter_period_for_hz(1), None, "a 1 s period does not fit");
        assert_eq!(counter_period_for_hz(2).map(|p| p.shift), Some(0));
        // Guest at half the host rate by scaling = a counter at half the rate.
        assert_eq!(
            guest_tsc_period(2_000_000, 1 << 47, 48, RealtimeRate::NOMINAL),
            counter_period_for_hz(1_000_000_000)
        );
        // No scaling hardware (frac 0): the host rate, whatever the ratio says.
        assert_eq!(
            guest_tsc_period(2_000_000, 12345, 0, RealtimeRate::NOMINAL),
            counter_period_for_hz(2_000_000_000)
        );
        // adjtimex at nominal (tick 10000, freq 0) is the nominal rate exactly.
        assert_eq!(
            RealtimeRate::from_adjtimex(10_000, 0).map(|r| r.num == r.den),
            Some(true)
        );
        assert_eq!(
            guest_tsc_period(
                2_445_404,
                1 << 48,
                48,
                RealtimeRate::from_adjtimex(10_000, 0).unwrap()
            ),
            guest_tsc_period(2_445_404, 1 << 48, 48, RealtimeRate::NOMINAL)
        );
        assert_eq!(RealtimeRate::from_adjtimex(5_000, 0), None);
        assert_eq!(RealtimeRate::from_adjtimex(10_000, 501 << 16), None);
        assert_eq!(guest_tsc_period(0, 1, 48, RealtimeRate::NOMINAL), None);
    }

    #[test]
    fn realtime_rate_changes_the_period() {
        // +100 ppm: a second of nominal ticks at 1 GHz lasts 1.0001 s of realtime.
        let rate = RealtimeRate::from_adjtimex(10_000, 100 << 16).unwrap();
        let p = guest_tsc_period(1_000_000, 1 << 48, 48, rate).unwrap();
        let (s, f) = vmclock_time_at(0, p, 0, 0, 1_000_000_000);
        let ns = s * 1_000_000_000 + u64::from(frac_sec_to_ns(f));
        assert!(ns.abs_diff(1_000_100_000) <= 1, "{ns}");
        // tick 10001 µs: +100 ppm too.
        let p2 = guest_tsc_period(
            1_000_000,
            1 << 48,
            48,
            RealtimeRate::from_adjtimex(10_001, 0).unwrap(),
        )
        .unwrap();
        assert_eq!(p, p2);
        // The error rate of 500 ppm is 1/2000 of the period, rounded up.
        let pn = counter_period_for_hz(1_000_000_000).unwrap();
        assert_eq!(period_error_rate(pn, 500 << 16), pn.frac_sec.div_ceil(2000));
    }

    #[test]
    fn vmclock_time_carries_into_seconds() {
        let p = counter_period_for_hz(1_000_000_000).unwrap();
        let (s0, f0) = realtime_ns_to_vmclock(5_999_999_999);
        assert_eq!((s0, frac_sec_to_ns(f0)), (5, 999_999_999));
        let (s, f) = vmclock_time_at(100, p, s0, f0, 102);
        assert_eq!(s, 6);
        assert!(frac_sec_to_ns(f) <= 1);
        assert_eq!(ns_to_frac_sec(1_000_000_000), u64::MAX);
    }

    proptest! {
        #[test]
        fn frac_sec_round_trip(ns in 0u32..1_000_000_000) {
            prop_assert_eq!(frac_sec_to_ns(ns_to_frac_sec(ns)), ns);
        }

        /// time(counter_value + n) = time + n / f within 1 ns for 1 MHz..10 GHz over 4 hours;
        /// the shift is the largest that fits (the period's top bit is set, or shift is 63).
        #[test]
        fn vmclock_period_precise_over_hours(
            hz in 1_000_000u64..=10_000_000_000, frac in 0.0f64..1.0, t0 in 0u64..(1u64 << 62),
            c0 in any::<u64>(),
        ) {
            let p = counter_period_for_hz(hz).unwrap();
            prop_assert!(p.frac_sec >= 1 << 63 || p.shift == 63, "{:?}", p);
            let n = (frac * (hz as f64) * 14_400.0) as u64;
            let (ts, tf) = realtime_ns_to_vmclock(t0);
            let (s, f) = vmclock_time_at(c0, p, ts, tf, c0.wrapping_add(n));
            let got = u128::from(s) * 1_000_000_000 + u128::from(frac_sec_to_ns(f));
            // exact = t0 + n·1e9/hz (rational); got truncates, so it is ⌊exact⌋ or one below.
            let exact_num = u128::from(t0) * u128::from(hz) + u128::from(n) * 1_000_000_000;
            let floor = exact_num / u128::from(hz);
            prop_assert!(got <= floor + 1 && got + 1 >= floor, "got {} exact ⌊{}⌋", got, floor);
        }

        /// The guest-TSC period agrees with `ticks_to_ns` (same integer kHz rate).
        #[test]
        fn vmclock_agrees_with_ticks_to_ns(khz in 1_000u32..=10_000_000, ticks in 0u64..(1u64 << 46)) {
            let p = guest_tsc_period(khz, 1 << 48, 48, RealtimeRate::NOMINAL).unwrap();
            let (s, f) = vmclock_time_at(0, p, 0, 0, ticks);
            let got = u128::from(s) * 1_000_000_000 + u128::from(frac_sec_to_ns(f));
            let want = u128::from(ticks_to_ns_floor(ticks, khz));
            prop_assert!(got.abs_diff(want) <= 1, "{} vs {}", got, want);
        }

        /// Scaled guest TSCs: the period is 2^frac / (ratio · host_hz) to 2⁻⁶³ relative.
        #[test]
        fn vmclock_scaled_period(host in 1_000u32..=10_000_000, guest in 1_000u32..=10_000_000, amd in any::<bool>()) {
            let frac = if amd { 32 } else { 48 };
            let ratio = tsc_scaling_ratio(guest, host, frac).unwrap();
            prop_assume!(ratio > 0);
            if let Some(p) = guest_tsc_period(host, ratio, frac, RealtimeRate::NOMINAL) {
                // One second of guest ticks by the ratio: host_hz · ratio / 2^frac.
                let ticks = (u128::from(host) * 1000 * u128::from(ratio)) >> frac;
                let (s, f) = vmclock_time_at(0, p, 0, 0, ticks as u64);
                let ns = u128::from(s) * 1_000_000_000 + u128::from(frac_sec_to_ns(f));
                // Exactly: ticks · 2^frac / (host_hz · ratio) seconds.
                let want = (ticks << frac) * 1_000_000_000 / (u128::from(host) * 1000 * u128::from(ratio));
                prop_assert!(ns.abs_diff(want) <= 1, "{} vs {}", ns, want);
            }
        }

        #[test]
        fn ns_ticks_round_trip(ns in 0u64..(1u64 << 62), khz in 1u32..10_000_000) {
            prop_assume!(u128::from(ns) * u128::from(khz) / 1_000_000 < u128::from(u64::MAX) / 2);
            let t = ns_to_ticks_round(ns, khz);
            let back = ticks_to_ns_round(t, khz);
            // One tick is 1e6/khz ns: the round trip is within half a tick (+1 ns of rounding).
            let half_tick_ns = 1_000_000 / u64::from(khz) / 2 + 1;
            prop_assert!(back.abs_diff(ns) <= half_tick_ns, "{} -> {} -> {}", ns, t, back);
            let t2 = ns_to_ticks_round(ticks_to_ns_round(t, khz), khz);
            let half_ns_ticks = u64::from(khz) / 2_000_000 + 1;
            prop_assert!(t2.abs_diff(t) <= half_ns_ticks);
        }

        #[test]
        fn conversions_never_panic_and_are_monotonic(a in any::<u64>(), b in any::<u64>(), khz in 1u32..=10_000_000) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(ns_to_ticks_floor(lo, khz) <= ns_to_ticks_floor(hi, khz));
            prop_assert!(ticks_to_ns_floor(lo, khz) <= ticks_to_ns_floor(hi, khz));
            prop_assert!(ns_to_ticks_round(lo, khz) <= ns_to_ticks_round(hi, khz));
            let _ = delta_ns_to_ticks(a as i64, khz);
            let _ = delta_ticks_to_ns(b as i64, khz);
        }

        #[test]
        fn scale_monotonic_and_offset_inverse(h1 in any::<u64>(), h2 in any::<u64>(), g in 1u32..10_000_000, host in 1u32..10_000_000, amd in any::<bool>(), target in any::<u64>()) {
            let frac = if amd { 32 } else { 48 };
            let ratio = effective_tsc_ratio(g, host, frac);
            let (lo, hi) = if h1 <= h2 { (h1, h2) } else { (h2, h1) };
            prop_assert!(scale_tsc(lo, ratio, frac) <= scale_tsc(hi, ratio, frac));
            let off = tsc_offset_for(target, h1, ratio, frac);
            prop_assert_eq!(guest_tsc_ticks(h1, ratio, frac, off), target);
        }

        #[test]
        fn time_scale_converts_one_second(khz in 1_000u32..=10_000_000) {
            let ts = pvclock_time_scale_for_khz(khz);
            let ticks = u64::from(khz) * 1000;
            let ns = pvclock_scale_delta(ticks, ts.mul, ts.shift);
            // mul ≥ 2³¹ is truncated: relative error < 2⁻³¹, i.e. < 0.5 ns per second, plus
            // the final truncation: never high, at most 2 ns low.
            prop_assert!(ns <= 1_000_000_000);
            prop_assert!(1_000_000_000 - ns <= 2, "{} kHz: {} ns", khz, ns);
        }

        #[test]
        fn migration_plan_keeps_tsc_and_kvmclock_consistent(
            k in 0u64..(1u64 << 60), dk in 0u64..(1u64 << 40), h in any::<u64>(),
            t0 in any::<u64>(), khz in 1_000u32..10_000_000, host in 1_000u32..10_000_000,
        ) {
            let mut s = state_2vcpu();
            s.tsc.guest_tsc_khz = khz;
            s.vcpus[0].tsc_ticks = t0;
            s.vcpus[0].kvmclock_ns = k;
            s.vcpus[1].tsc_offset_ticks = 1; // not in sync with vCPU 0
            let ratio = effective_tsc_ratio(khz, host, 48);
            let kp = k + dk;
            let offs = migration_tsc_offsets(&s, kp, h, ratio, 48);
            let got = guest_tsc_ticks(h, ratio, 48, offs[0]);
            let want = t0.wrapping_add(ns_to_ticks_round(dk, khz));
            prop_assert!((got.wrapping_sub(want) as i64).abs() <= 1);
        }
    }
}
